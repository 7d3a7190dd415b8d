"""Train the embedded `tiny-xl-shapes` model on the shapes set (quantdiff.models.shapes).

    python -m quantdiff.models.train --out quantdiff/data/weights/tiny-xl-shapes

The architecture is tiny-xl's. The text encoders and tokenizers stay as the builtin seed makes them
(random but fixed: a caption's token states still tell its words apart, and the UNet's
cross-attention learns to read them). The VAE is trained first (reconstruction + a small KL term),
its latent scale set from the data, then the UNet learns epsilon prediction on SDXL's noise schedule
with 10% of captions dropped to zeros (SDXL's empty-prompt embedding) for classifier-free guidance.
Only the trained VAE and UNet are written (fp16 safetensors); the rest regenerates from the seed.
Seeded throughout: the same command on the same device and library versions gives the same weights.
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import shapes
from .builtin import TINY_XL
from .generate import seeded_component
from .tokenizer import load_tokenizer

RESOLUTION = 64
DEFAULT_SEED = 0
TRAINED = ("vae", "unet")


def text_components(seed=DEFAULT_SEED):
    """The builtin text encoders and tokenizers of tiny-xl (what materialize writes)."""
    return {"text_encoder": seeded_component("text_encoder", TINY_XL["text_encoder"], seed).eval(),
            "text_encoder_2": seeded_component("text_encoder_2", TINY_XL["text_encoder_2"], seed).eval(),
            "tokenizer": load_tokenizer(pad_token=TINY_XL["tokenizer"]["pad_token"]),
            "tokenizer_2": load_tokenizer(pad_token=TINY_XL["tokenizer_2"]["pad_token"])}


@torch.no_grad()
def encode_captions(captions, text, device):
    """(prompt_embeds (n, 77, 96), pooled (n, 64)) exactly as StableDiffusionXLPipeline.encode_prompt."""
    from diffusers import StableDiffusionXLPipeline

    encoders = {name: text[name].to(device) for name in ("text_encoder", "text_encoder_2")}
    pipe = StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, tokenizer=text["tokenizer"],
                                     tokenizer_2=text["tokenizer_2"], **encoders)
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
    return embeds.float(), pooled.float()


def _images(captions, seed, device):
    return torch.from_numpy(shapes.batch(captions, RESOLUTION, seed)).to(device)


def train_vae(vae, steps, batch_size, lr, device, log, seed):
    captions = shapes.all_captions()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        pick = torch.randint(len(captions), (batch_size,), generator=g).tolist()
        x = _images([captions[i] for i in pick], seed * 1_000_003 + step, device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"vae {step:6d}/{steps} loss {loss.item():.5f}")
    return vae.eval()


@torch.no_grad()
def latent_scale(vae, device, seed, n=256):
    captions = shapes.all_captions()
    x = _images([captions[i % len(captions)] for i in range(n)], seed + 7, device)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


@torch.no_grad()
def latent_pool(vae, device, seed, variants=8):
    """(caption index, posterior mean, posterior std) of `variants` jittered images per caption,
    encoded once: the UNet then trains on latents alone, which is most of the speed on a CPU."""
    captions = shapes.all_captions()
    index = torch.arange(len(captions)).repeat(variants)
    means, stds = [], []
    for start in range(0, len(index), 256):
        chunk = index[start:start + 256].tolist()
        posterior = vae.encode(_images([captions[i] for i in chunk], seed * 13 + start, device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return index.to(device), torch.cat(means), torch.cat(stds)


def train_unet(unet, vae, embeds, pooled, steps, batch_size, lr, device, log, seed, ema_decay=0.999):
    from diffusers import DDPMScheduler

    from .builtin import SDXL_SCHEDULER
    from .inputs import sdxl_time_ids

    schedule = DDPMScheduler.from_config(SDXL_SCHEDULER)  # the noise schedule the pipelines sample with
    schedule.alphas_cumprod = schedule.alphas_cumprod.to(device)
    index, means, stds = latent_pool(vae, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    time_ids = sdxl_time_ids(RESOLUTION, batch_size, device=device)
    sf = vae.config.scaling_factor
    unet.train()
    for step in range(steps):
        rows = torch.randint(len(index), (batch_size,), generator=g).to(device)
        pick = index[rows]
        eps = torch.randn(means[rows].shape, generator=g).to(device)
        latents = (means[rows] + stds[rows] * eps) * sf
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
        noisy = schedule.add_noise(latents, noise, t)
        keep = (torch.rand(batch_size, generator=g) > 0.1).float().to(device)  # 10% unconditional
        ctx = embeds[pick] * keep[:, None, None]
        pool = pooled[pick] * keep[:, None]
        pred = unet(noisy, t, encoder_hidden_states=ctx,
                    added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (step + 1) / (step + 10))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            log(f"unet {step:6d}/{steps} loss {loss.item():.5f}")
    return ema


def sample_grid(model_dir, prompts, path, seed=1234, steps=20, guidance=5.0):
    """Grid of each prompt drawn (what it means) beside the model's image of it; returns the
    fraction of images showing the prompt's colour at its place."""
    from ..bench.reference import generate
    from ..bench.report import save_grid
    from .loading import load_pipeline

    pipe = load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    settings = {"steps": steps, "guidance": guidance, "resolution": RESOLUTION}
    images = [generate(pipe, p, seed + i, settings) for i, p in enumerate(prompts)]
    hits = [shapes.follows_prompt(image, p) for image, p in zip(images, prompts)]
    captions = [f"{p} ({'follows' if hit else 'MISSES'})" for p, hit in zip(prompts, hits)]
    save_grid([shapes.draw(p) for p in prompts], images, captions, path, labels=("the caption, drawn", "tiny-xl-shapes"))
    return sum(hits) / len(hits)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for vae/ and unet/ (diffusers format, fp16)")
    parser.add_argument("--grid", help="instead of training: write a sample grid of --model-dir for --prompts")
    parser.add_argument("--model-dir", help="a materialized tiny-xl-shapes folder (with --grid)")
    parser.add_argument("--prompts", default="config/prompts/shapes-evaluation.txt")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=64, help="UNet batch")
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.grid:
        prompts = Path(args.prompts).read_text().splitlines()
        log(f"prompt accuracy {sample_grid(args.model_dir, prompts, args.grid):.3f} -> {args.grid}")
        return
    if not args.out:
        parser.error("--out is required to train")
    torch.manual_seed(args.seed)
    start = time.time()

    text = text_components(args.seed)
    embeds, pooled = encode_captions(shapes.all_captions(), text, args.device)
    vae = seeded_component("vae", TINY_XL["vae"], args.seed).to(args.device)
    vae = train_vae(vae, args.vae_steps, args.vae_batch_size, args.vae_lr, args.device, log, args.seed)
    vae.register_to_config(scaling_factor=latent_scale(vae, args.device, args.seed))
    log(f"vae latent scaling factor {vae.config.scaling_factor:.4f}")
    unet = seeded_component("unet", TINY_XL["unet"], args.seed).to(args.device)
    unet = train_unet(unet, vae, embeds, pooled, args.unet_steps, args.batch_size, args.unet_lr,
                      args.device, log, args.seed)

    out = Path(args.out)
    for name, model in (("vae", vae), ("unet", unet)):
        model.to("cpu", torch.float16).save_pretrained(out / name, safe_serialization=True)
    about = {"seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
             "batch_size": args.batch_size, "vae_batch_size": args.vae_batch_size, "vae_lr": args.vae_lr, "unet_lr": args.unet_lr,
             "device": args.device, "torch": torch.__version__, "minutes": round((time.time() - start) / 60, 1)}
    (out / "training.json").write_text(json.dumps(about, indent=2) + "\n")
    log(f"wrote {out} in {about['minutes']} min")


if __name__ == "__main__":
    main()
