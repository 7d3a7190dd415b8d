"""Human-facing bench outputs: the FP16 | 8-bit image grid, the SQNR-by-step plot, summary tables.

All files are written atomically. matplotlib is driven through its Agg canvas directly, so no
GUI backend is ever touched and the global pyplot state stays alone.
"""
import html
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_path
from ..metrics import from_json_number

# Grid layout, in pixels. Width = PAD + columns * (cell + PAD);
# height = PAD + HEADER_H + rows * (cell + CAPTION_H + PAD).
PAD = 8
HEADER_H = 24
CAPTION_H = 20
MIN_CELL = 128  # small images (64x64 test models) are upscaled by an integer factor to at least this
FONT_SIZE = 12
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)

PRECISION_ORDER = {"fp16": 0, "int8": 1, "fp8": 2}
ARCHITECTURE_ONLY_NOTE = "architecture only: random weights, quality not meaningful"


def _as_pil(image):
    """A PIL image from a PIL image, an HxW / HxWxC uint8 array, or a file path; always RGB."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def _upscale(image):
    """Nearest-neighbour upscale by the smallest integer factor reaching MIN_CELL on the short side."""
    factor = max(1, math.ceil(MIN_CELL / min(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: bitmap font, no size
        return ImageFont.load_default()


def _fit_text(draw, text, font, width):
    """Text shortened with '...' so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def format_caption(prompt: str, psnr_db, ssim: float) -> str:
    """'PSNR 31.20 dB | SSIM 0.9412 | prompt' (metrics first: long prompts are cut at the right)."""
    psnr_db = from_json_number(psnr_db)
    psnr_text = "PSNR inf (identical)" if psnr_db == math.inf else f"PSNR {psnr_db:.2f} dB"
    return f"{psnr_text} | SSIM {ssim:.4f} | {prompt}"


def save_grid(reference_images, test_images, captions, path, labels=("fp16", "int8")):
    """PNG grid: one row per prompt, reference | test side by side, a caption line under each row.

    Images may be PIL images, uint8 arrays or paths. Column headers come from `labels`.
    """
    refs = [_upscale(_as_pil(i)) for i in reference_images]
    tests = [_upscale(_as_pil(i)) for i in test_images]
    captions = list(captions)
    if not (len(refs) == len(tests) == len(captions)):
        raise ValueError(f"grid needs as many test images and captions as reference images: "
                         f"{len(refs)} reference, {len(tests)} test, {len(captions)} captions")
    if not refs:
        raise ValueError("grid needs at least one image pair")
    if len(labels) != 2:
        raise ValueError(f"grid has two columns, got labels {labels!r}")

    cell_w = max(i.width for i in refs + tests)
    cell_h = max(i.height for i in refs + tests)
    width = PAD + 2 * (cell_w + PAD)
    height = PAD + HEADER_H + len(refs) * (cell_h + CAPTION_H + PAD)
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()

    for col, label in enumerate(labels):
        x0 = PAD + col * (cell_w + PAD)
        text = _fit_text(draw, str(label), font, cell_w)
        draw.text((x0 + cell_w / 2, PAD + HEADER_H / 2), text, fill=INK, font=font, anchor="mm")

    for row, (ref, test, caption) in enumerate(zip(refs, tests, captions)):
        y0 = PAD + HEADER_H + row * (cell_h + CAPTION_H + PAD)
        for col, image in enumerate((ref, test)):
            x0 = PAD + col * (cell_w + PAD)
            grid.paste(image, (x0 + (cell_w - image.width) // 2, y0 + (cell_h - image.height) // 2))
        text = _fit_text(draw, str(caption), font, width - 2 * PAD)
        draw.text((PAD, y0 + cell_h + CAPTION_H / 2), text, fill=INK, font=font, anchor="lm")

    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def plot_sqnr(sqnr_by_step, path, title: str):
    """PNG line plot of noise-prediction SQNR (dB) against denoising step (1 = first step).

    Steps whose SQNR is infinite ("inf": identical predictions) are drawn as triangles along the top.
    """
    values = [from_json_number(v) for v in sqnr_by_step]
    steps = np.arange(1, len(values) + 1)
    finite = np.array([math.isfinite(v) for v in values], dtype=bool)
    y = np.array([v if math.isfinite(v) else np.nan for v in values], dtype=np.float64)

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if finite.any():
        ax.plot(steps[finite], y[finite], marker="o", markersize=3, label="SQNR")
    if (~finite).any():
        top = np.nanmax(y) + max(1.0, 0.1 * (np.nanmax(y) - np.nanmin(y))) if finite.any() else 1.0
        ax.scatter(steps[~finite], np.full((~finite).sum(), top), marker="^", color="tab:green",
                   label="inf (identical)")
        ax.legend(loc="lower right")
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(values):
        ax.set_xlim(0.5, len(values) + 0.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# Summary tables: (row key, column header).
COLUMNS = [
    ("model", "model"),
    ("precision", "precision"),
    ("quant_level", "quant level"),
    ("backend", "backend"),
    ("device", "device"),
    ("unet_ms", "UNet step ms (median)"),
    ("baseline_ms", "baseline UNet step ms"),
    ("speedup", "speedup (UNet)"),
    ("speedup_graph", "speedup (UNet, CUDA graphs)"),
    ("pipeline_ms", "pipeline ms (median)"),
    ("psnr_mean", "PSNR mean dB"),
    ("ssim_mean", "SSIM mean"),
    ("sqnr_mean", "SQNR mean dB"),
    ("note", "note"),
]


def _order(record):
    level = record.get("quant_level")
    return (record["model"], PRECISION_ORDER.get(record["precision"], len(PRECISION_ORDER)),
            -math.inf if level is None else level, record["backend"], record["device"]["name"])


def _device_label(device):
    cc = device.get("compute_capability")
    return f"{device['name']} (sm {cc})" if cc else device["name"]


CPU_TIMING_NOTE = "CPU timing: checks the machinery, not a speed claim"


def _note(record):
    notes = []
    if record.get("architecture_only"):
        notes.append(ARCHITECTURE_ONLY_NOTE)
    elif not record["quality"].get("meaningful", True):
        notes.append(record["quality"].get("note", ""))
    if record["device"]["kind"] == "cpu":
        notes.append(CPU_TIMING_NOTE)
    return "; ".join(n for n in notes if n)


def summary_table(records) -> list:
    """One dict per bench record (keys of COLUMNS, raw values), ordered model, then fp16/int8/fp8."""
    return [
        {
            "model": r["model"],
            "precision": r["precision"],
            "quant_level": r["quant_level"],
            "backend": r["backend"],
            "device": _device_label(r["device"]),
            "unet_ms": r["unet_step_ms"]["median"],
            "baseline_ms": r["baseline"]["unet_step_ms"]["median"],
            "speedup": r["speedup_vs_baseline"]["unet"],
            "speedup_graph": (r.get("cuda_graph") or {}).get("speedup"),
            "pipeline_ms": r["pipeline_ms"]["median"],
            "psnr_mean": r["quality"]["psnr_db_mean"],
            "ssim_mean": r["quality"]["ssim_mean"],
            "sqnr_mean": r["quality"]["sqnr_db_mean"],
            "note": _note(r),
        }
        for r in sorted(records, key=_order)
    ]


_NUMBER_FORMATS = {
    "unet_ms": "{:.2f}", "baseline_ms": "{:.2f}", "pipeline_ms": "{:.2f}", "speedup": "{:.2f}x", "speedup_graph": "{:.2f}x",
    "psnr_mean": "{:.2f}", "ssim_mean": "{:.4f}", "sqnr_mean": "{:.2f}", "quant_level": "{:g}",
}


def _cell_text(key, value):
    if value is None:
        return "-"
    if value == "inf":
        return "inf"
    if key in _NUMBER_FORMATS and isinstance(value, (int, float)):
        return _NUMBER_FORMATS[key].format(value)
    return str(value)


def summary_markdown(records) -> str:
    """A Markdown table, one row per record, header first."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line([header for _, header in COLUMNS]), "|" + "---|" * len(COLUMNS)]
    for row in summary_table(records):
        lines.append(line([_cell_text(key, row[key]) for key, _ in COLUMNS]))
    return "\n".join(lines) + "\n"


def summary_html(records) -> str:
    """A standalone HTML page holding <table id="bench-results"> (header row + one row per record)."""
    header = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell_text(key, row[key]))}</td>" for key, _ in COLUMNS) + "</tr>"
        for row in summary_table(records)
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<title>quantdiff benchmark results</title>\n<style>\n"
        "table#bench-results { border-collapse: collapse; font-family: sans-serif; font-size: 13px; }\n"
        "#bench-results th, #bench-results td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }\n"
        "#bench-results th { background: #f2f2f2; }\n"
        "#bench-results td:nth-child(-n+5), #bench-results td:last-child { text-align: left; }\n"
        "</style>\n</head>\n<body>\n"
        "<table id=\"bench-results\">\n"
        f"<thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n</body>\n</html>\n"
    )
