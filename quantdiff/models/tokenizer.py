"""A CLIP BPE tokenizer whose vocabulary the project writes itself.

Builtin models need a real `CLIPTokenizer`, and we download nothing, so we learn byte-level BPE
merges from our own prompt files and write `vocab.json` + `merges.txt` in CLIP's format. In
transformers 5 the only reliable way to get a working tokenizer from such files is
`CLIPTokenizer.from_pretrained(folder)` (the positional-path and keyword forms both break).

The learned files are kept in `quantdiff/data/tokenizer/` so a builtin model does not change when
someone edits the prompt lists. Regenerate them with
`python -m quantdiff.models.tokenizer config/prompts/calibration.txt config/prompts/evaluation.txt`.
"""
import collections
import json
import sys
from pathlib import Path

import regex

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
N_MERGES = 510  # with 2 x 256 byte symbols and 2 specials: a 1024-entry vocabulary
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "data" / "tokenizer"

# CLIP's pre-tokenizer split (the same pattern the transformers tokenizer applies after lowercasing).
_WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def byte_symbols():
    """The byte-level BPE alphabet: one printable unicode character per byte value.

    Printable latin-1 bytes stand for themselves; the rest (controls, space, a few others) are
    shifted to code points from 256 up, in byte order. This must equal the table tokenizers'
    ByteLevel pre-tokenizer uses, since that is what turns text into these symbols at encode time.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def words_of(lines):
    """Word counts as CLIP sees them: whitespace collapsed, lowercased, split by its pattern."""
    counts = collections.Counter()
    for line in lines:
        counts.update(_WORD.findall(" ".join(line.split()).lower()))
    return counts


def learn_merges(lines, n_merges=N_MERGES):
    """Learn up to `n_merges` BPE merges from text lines, deterministically.

    Each word becomes its byte symbols with the end-of-word mark fused onto the last one (so merges
    read `t h` or `th e</w>`, never `a </w>`). The most frequent adjacent pair is merged each round;
    ties go to the lexicographically smallest pair. Pairs seen only once are not worth a token.
    """
    table = byte_symbols()
    words = {}
    for word, count in words_of(lines).items():
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        words[tuple(symbols)] = words.get(tuple(symbols), 0) + count

    merges = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge_pair(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def vocabulary(merges):
    """CLIP's vocabulary layout: bytes, bytes + end-of-word, one entry per merge, then the specials.

    The end-of-text token gets the highest id, as in CLIP: text encoders configured the legacy way
    pool at `argmax(input_ids)`, which then lands on the first end-of-text token.
    """
    byte_chars = [byte_symbols()[b] for b in range(256)]
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_tokenizer_files(folder, merges):
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` loadable by `CLIPTokenizer.from_pretrained`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary(merges), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_merges(folder=TOKENIZER_DIR):
    lines = (Path(folder) / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]


def load_tokenizer(folder=TOKENIZER_DIR, pad_token=EOS):
    """The project's CLIP tokenizer. SDXL's second tokenizer pads with "!"; pass `pad_token="!"` for it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)


def main(argv):
    """Relearn the packaged tokenizer from prompt files (run from the repository root)."""
    if not argv:
        print("usage: python -m quantdiff.models.tokenizer PROMPTS.txt [...]", file=sys.stderr)
        return 2
    lines = [line for path in argv for line in Path(path).read_text(encoding="utf-8").splitlines()]
    merges = learn_merges(lines)
    write_tokenizer_files(TOKENIZER_DIR, merges)
    print(f"{len(merges)} merges, {len(vocabulary(merges))} tokens -> {TOKENIZER_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
