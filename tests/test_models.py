"""The model stage: builtin tiny-xl, tokenizer, arch UNet on meta, UNet inputs, sources, prompt files."""
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from quantdiff.errors import ConfigError, CorruptArtifactError, MissingWeightsError
from quantdiff.models import (INFO_FILE, UNET_INPUT_NAMES, arch_component, arch_unet, flatten_unet_inputs,
                              load_pipeline, load_tokenizer, materialize, read_model_info, unet_example_inputs,
                              unflatten_unet_inputs)
from quantdiff.models import shapes, stage
from quantdiff.models.tokenizer import EOS, BOS, learn_merges, read_merges, vocabulary

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = {"pipeline": "sdxl", "source": "builtin:tiny-xl", "resolution": 64}
TINY_PARAMS = {"unet": 2035908, "vae": 248079, "text_encoder": 73408, "text_encoder_2": 224640}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny-xl"
    info = materialize("tiny-xl", TINY_CFG, out)
    assert info["parameters"] == TINY_PARAMS
    return out


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    return load_pipeline(tiny_dir)


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_xl_is_deterministic_and_records_its_info(tiny_dir, tmp_path):
    again = tmp_path / "again"
    materialize("tiny-xl", TINY_CFG, again)
    first, second = _files(tiny_dir), _files(again)
    weights = [name for name in first if name.endswith(".safetensors")]
    assert sorted(weights) == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                               "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert first == second  # every file, weights included, byte for byte
    info = read_model_info(tiny_dir)
    assert info["source_kind"] == "builtin" and info["seed"] == 0 and info["architecture_only"] is False
    assert info["pipeline_class"] == "StableDiffusionXLPipeline" and info["parameters"] == TINY_PARAMS
    # nothing half-written left beside the folder
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_interrupted_materialize_leaves_nothing(tmp_path, monkeypatch):
    def crash(folder, spec, seed, dtype):
        (Path(folder) / "unet").mkdir(parents=True)
        (Path(folder) / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "write_random_pipeline", crash)
    with pytest.raises(KeyboardInterrupt):
        materialize("tiny-xl", TINY_CFG, tmp_path / "tiny-xl")
    assert list(tmp_path.iterdir()) == []


def test_tiny_xl_structure_matches_sdxl(tiny_pipe):
    unet, te1, te2 = tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.text_encoder_2
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size == 96
    assert unet.config.addition_embed_type == "text_time"
    assert tiny_pipe.vae_scale_factor == 8 and tiny_pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    attention = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert attention and all(m.heads == 4 and m.inner_dim // m.heads == 16 for m in attention)
    assert type(tiny_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert tiny_pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert te1.config.vocab_size == len(tiny_pipe.tokenizer) == 1024


def test_tiny_xl_makes_an_image(tiny_pipe):
    start = time.perf_counter()
    out = tiny_pipe("a red bicycle leaning against a wall", num_inference_steps=3, height=64, width=64,
                    guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()
    assert seconds < 10


def test_round_trip_keeps_weights(tiny_dir, tiny_pipe):
    from safetensors.torch import load_file

    saved = load_file(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = tiny_pipe.unet.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_tokenizer_uses_merges_and_specials():
    tok = load_tokenizer()
    prompt = "a portrait of an old man with a beard, warm light"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.convert_tokens_to_ids(BOS) == 1022
    assert ids[-1] == tok.convert_tokens_to_ids(EOS) == 1023
    assert len(ids) - 2 < len(prompt) / 3  # merges make whole words single tokens
    for word in ("a", "of", "with", "light", "portrait"):
        assert tok.tokenize(word) == [word + "</w>"]
    padded = tok(prompt, padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 1023
    assert load_tokenizer(pad_token="!")(prompt, padding="max_length", max_length=77).input_ids[-1] == ord("!")
    assert tok.decode(ids, skip_special_tokens=True) == "a portrait of an old man with a beard , warm light"


def test_merges_are_clip_shaped_and_learned_deterministically():
    merges = read_merges()
    assert len(merges) == 510
    vocab = vocabulary(merges)
    assert len(vocab) == 1024
    for left, right in merges:
        assert "</w>" not in left and right != "</w>" and left in vocab and right in vocab
    lines = (REPO / "config/prompts/calibration.txt").read_text().splitlines()
    assert learn_merges(lines, 50) == learn_merges(lines, 50)


def test_meta_sdxl_unet_has_the_published_size():
    unet = arch_unet("sdxl-base-1.0")
    assert next(unet.parameters()).device.type == "meta"
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    counts = {c: sum(p.numel() for p in arch_component("sdxl-base-1.0", c).parameters())
              for c in ("vae", "text_encoder", "text_encoder_2")}
    assert counts == {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    inputs = unet_example_inputs(unet, batch=2, resolution=1024, device="meta")
    assert inputs["encoder_hidden_states"].shape == (2, 77, 2048)
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    with torch.no_grad():
        assert unet(**inputs).sample.shape == (2, 4, 128, 128)


def test_example_inputs_drive_the_tiny_unet(tiny_pipe):
    unet = tiny_pipe.unet
    inputs = unet_example_inputs(unet, batch=3, resolution=64, dtype=torch.float32, device="cpu")
    assert inputs["sample"].shape == (3, 4, 8, 8) and inputs["timestep"].shape == (3,)
    assert inputs["added_cond_kwargs"]["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
    flat = flatten_unet_inputs(inputs)
    assert list(flat) == UNET_INPUT_NAMES["sdxl"]
    with torch.no_grad():
        out = unet(**unflatten_unet_inputs(flat)).sample
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()


def test_example_inputs_for_sd_style_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                                attention_head_dim=8).eval()
    inputs = unet_example_inputs(unet, batch=2, resolution=64)
    assert list(flatten_unet_inputs(inputs)) == UNET_INPUT_NAMES["sd"] and "added_cond_kwargs" not in inputs
    with torch.no_grad():
        assert unet(**inputs).sample.shape == (2, 4, 8, 8)


def test_hub_id_not_in_cache_says_how_to_provide_it(empty_hf_home, tmp_path):
    out = tmp_path / "xl-1.0"
    with pytest.raises(MissingWeightsError) as err:
        materialize("xl-1.0", {"pipeline": "sdxl", "source": "stabilityai/stable-diffusion-xl-base-1.0"}, out)
    message = str(err.value)
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "hf download" in message and "HF_HOME" in message and "source:" in message
    assert str(empty_hf_home / "hub") in message
    assert not out.exists()


def test_hub_id_in_cache_is_linked_not_copied(tiny_dir, empty_hf_home, tmp_path):
    repo = empty_hf_home / "hub" / "models--acme--tiny-xl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(INFO_FILE))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    info = materialize("acme", {"pipeline": "sdxl", "source": "acme/tiny-xl"}, tmp_path / "acme")
    assert info["source_kind"] == "hub" and info["parameters"] == TINY_PARAMS
    assert Path(info["resolved_from"]).name == commit
    unet_link = tmp_path / "acme" / "unet"
    assert unet_link.is_symlink() and Path(os.readlink(unet_link)) == repo / "snapshots" / commit / "unet"
    # a snapshot missing the UNet weights is reported as missing weights, by component
    (repo / "snapshots" / commit / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"unet/ \(no .safetensors or .bin weights\)"):
        materialize("acme", {"pipeline": "sdxl", "source": "acme/tiny-xl"}, tmp_path / "acme2")


def test_local_folder_is_linked_and_loads(tiny_dir, tmp_path):
    out = tmp_path / "local"
    info = materialize("local", {"pipeline": "sdxl", "source": str(tiny_dir)}, out)
    assert info["source_kind"] == "local" and info["parameters"] == TINY_PARAMS
    for name in ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"):
        assert (out / name).is_symlink() and (out / name).resolve() == (tiny_dir / name).resolve()
    assert (out / INFO_FILE).is_file() and not (out / INFO_FILE).is_symlink()
    assert list(load_pipeline(out).unet.config.block_out_channels) == [32, 64]


def test_config_errors_name_what_is_known(tmp_path):
    with pytest.raises(ConfigError, match="builtin:tiny-xl, builtin:tiny-xl-shapes, arch:sdxl-base-1.0"):
        materialize("x", {"pipeline": "sdxl", "source": "builtin:huge-xl"}, tmp_path / "x")
    with pytest.raises(ConfigError, match="expects StableDiffusionPipeline"):
        materialize("x", {"pipeline": "sd", "source": "builtin:tiny-xl"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_arch_variant_is_flagged_and_stored_in_fp16(tmp_path, monkeypatch):
    seen = {}

    def record(folder, spec, seed, dtype):  # the real build needs ~10 GB and minutes
        seen.update(spec=spec, seed=seed, dtype=dtype)
        return {"unet": 0}

    monkeypatch.setattr(stage, "write_random_pipeline", record)
    info = materialize("xl-1.0-arch", {"pipeline": "sdxl", "source": "arch:sdxl-base-1.0"}, tmp_path / "arch")
    assert info["architecture_only"] is True and info["dtype"] == "float16"
    assert seen["dtype"] == torch.float16 and seen["spec"]["unet"]["cross_attention_dim"] == 2048
    assert read_model_info(tmp_path / "arch")["architecture_only"] is True


def test_load_pipeline_rejects_bad_folders(tiny_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptArtifactError, match="empty.*model_index.json"):
        load_pipeline(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptArtifactError, match="broken"):
        load_pipeline(broken)


def test_prompt_files_are_sized_and_disjoint():
    def read(name):
        lines = (REPO / "config" / "prompts" / name).read_text().splitlines()
        assert all(line.strip() == line and line for line in lines)
        assert len(set(lines)) == len(lines)
        return set(lines)

    calibration, evaluation = read("calibration.txt"), read("evaluation.txt")
    assert len(calibration) >= 160 and len(evaluation) == 32
    assert not calibration & evaluation
    # the shapes model's own prompts: captions of its training set, evaluation held out of calibration
    shapes_calibration, shapes_evaluation = read("shapes-calibration.txt"), read("shapes-evaluation.txt")
    assert len(shapes_calibration) == 128 and len(shapes_evaluation) == 16
    assert not shapes_calibration & shapes_evaluation
    assert shapes_calibration | shapes_evaluation <= set(shapes.all_captions())
