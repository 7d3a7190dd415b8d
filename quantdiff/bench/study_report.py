"""QUALITY.md of the quality study: a table over the variants, findings in words, an SQNR plot."""
import math
from pathlib import Path

from ..io import atomic_path
from ..metrics import from_json_number


def _num(value):
    return from_json_number(value) if value is not None else math.nan


def _fmt(value, digits=2):
    value = _num(value)
    return "inf" if value == math.inf else ("-" if math.isnan(value) else f"{value:.{digits}f}")


# the calibration settings the study's variants differ in (besides fused_scales)
CALIBRATION_KEYS = ("percentile", "collect_method", "alpha")


def _calibration_note(record, baseline):
    """The calibration settings where they differ from the study's baseline variant."""
    keys = (*CALIBRATION_KEYS, "fused_scales")
    calib = record["calibration"]
    diffs = [f"{k} {calib.get(k)}" for k in keys if baseline and calib.get(k) != baseline["calibration"].get(k)]
    return ", ".join(diffs) or "-"


def _best(records, names):
    present = [records[n] for n in names if n in records]
    return max(present, key=lambda r: _num(r["quality"]["psnr_db_mean"])) if present else None


def _shared_scales(record):
    return record["calibration"].get("fused_scales", True)  # records from before the setting: shared by default


def fused_scale_findings(records):
    """Each variant calibrated with `fused_scales: false` against the variant of the same precision,
    level and other calibration settings with the default (one scale per fused projection group)."""
    lines = []
    for own in (r for r in records.values() if not _shared_scales(r)):
        same = [r for r in records.values() if _shared_scales(r) and r["precision"] == own["precision"]
                and r["quant_level"] == own["quant_level"]
                and all(r["calibration"].get(k) == own["calibration"].get(k) for k in CALIBRATION_KEYS)]
        if not same:
            continue
        shared = same[0]
        a, b = _num(shared["quality"]["psnr_db_mean"]), _num(own["quality"]["psnr_db_mean"])
        lines.append(f"One scale per fused projection group ({shared['variant']}) {a:.2f} dB against each layer's "
                     f"own ({own['variant']}) {b:.2f} dB: {a - b:+.2f} dB.")
    return lines


def findings(records, baseline="int8-L3", goal_db=26.0):
    """The study's conclusions in words, from the numbers (each says what it compares)."""
    lines = []
    if baseline in records:
        psnr = _num(records[baseline]["quality"]["psnr_db_mean"])
        verdict = "meets" if psnr >= goal_db else "misses"
        lines.append(f"INT8 level 3 ({baseline}): mean PSNR {psnr:.2f} dB vs fp16, which {verdict} the "
                     f"{goal_db:.0f} dB goal.")
    lines += fused_scale_findings(records)
    # (the comparisons below are among variants with calibration's default, shared projection scales)
    int8 = {n: r for n, r in records.items() if r["precision"] == "int8" and _shared_scales(r)}
    # alpha: auto against the best global alpha, within each conv calibration (same level too)
    groups = {}
    for n, r in int8.items():
        c = r["calibration"]
        groups.setdefault((r["quant_level"], c["collect_method"], c["percentile"]), []).append(n)
    for (_, method, percentile), names in sorted(groups.items(), key=str):
        autos = [n for n in names if int8[n]["calibration"]["alpha"] == "auto"]
        globals_ = [n for n in names if int8[n]["calibration"]["alpha"] != "auto"]
        best_global, auto = _best(records, globals_), _best(records, autos)
        if not (best_global and auto):
            continue
        a, g = _num(auto["quality"]["psnr_db_mean"]), _num(best_global["quality"]["psnr_db_mean"])
        lines.append(f"SmoothQuant ({method}, percentile {percentile}): `alpha: auto` ({auto['variant']}) {a:.2f} dB "
                     f"against the best global alpha ({best_global['variant']}, alpha "
                     f"{best_global['calibration']['alpha']}) {g:.2f} dB: "
                     + ("auto is better." if a > g else "auto is **not** better here."))
    same_alpha = records.get(baseline, {}).get("calibration", {}).get("alpha", 0.8)
    plain_max = [n for n, r in int8.items() if r["quant_level"] == 3 and r["calibration"]["collect_method"] == "max-max"
                 and r["calibration"]["alpha"] == same_alpha]
    percentiles = [n for n, r in int8.items() if r["quant_level"] == 3 and r["calibration"]["collect_method"] != "max-max"
                   and r["calibration"]["alpha"] == same_alpha]
    best_max, best_pct = _best(records, plain_max), _best(records, percentiles)
    if best_max and best_pct:
        m, p = _num(best_max["quality"]["psnr_db_mean"]), _num(best_pct["quality"]["psnr_db_mean"])
        lines.append(f"Conv calibration (alpha {same_alpha}): best step-range percentile ({best_pct['variant']}, percentile "
                     f"{best_pct['calibration']['percentile']}) {p:.2f} dB against plain max ({best_max['variant']}) "
                     f"{m:.2f} dB: " + ("the step-range percentile is better." if p > m
                                        else "the step-range percentile is **not** better here."))
    return lines


def write_study_report(records, out_md, out_plot, title):
    """QUALITY.md: one table row per variant, the findings, and the SQNR-by-step plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {r["variant"]: r for r in records}
    baseline = records.get("int8-L3")
    rows = ["| variant | precision | level | calibration (vs int8-L3) | mean PSNR dB | mean SSIM | mean SQNR dB | SQNR first / last step dB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in records.items():
        q = r["quality"]
        steps = q["sqnr_db_by_step"]
        rows.append(f"| {name} | {r['precision']} | {r['quant_level']} | {_calibration_note(r, baseline)} | "
                    f"{_fmt(q['psnr_db_mean'])} | {_fmt(q['ssim_mean'], 4)} | {_fmt(q['sqnr_db_mean'])} | "
                    f"{_fmt(steps[0])} / {_fmt(steps[-1])} |")
    any_record = next(iter(records.values()))
    auto = [r for r in records.values() if r["alphas"]]
    alpha_lines = [f"- `{r['variant']}` chose, per layer: " + ", ".join(f"alpha {a}: {n}" for a, n in r["alphas"].items())
                   for r in auto]
    text = "\n".join([
        f"# {title}",
        "",
        "Produced by the workflow: `snakemake --cores 1 " + str(out_md) + "` (config `study:`).",
        f"Each variant's fake-quant UNet against the fp16 reference images of {len(any_record['quality']['psnr_db'])} "
        "held-out prompts (same seeds); SQNR is the noise prediction's, per denoising step, on the same latents.",
        f"Quality meaningful: {any_record['quality']['meaningful']} ({any_record['quality']['note']}).",
        "",
        *rows,
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in findings(records)],
        *alpha_lines,
        "",
        f"![SQNR by step]({Path(out_plot).name})",
        "",
    ])
    with atomic_path(out_md) as tmp:
        tmp.write_text(text)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in records.items():
        ax.plot(range(1, len(r["quality"]["sqnr_db_by_step"]) + 1),
                [_num(v) for v in r["quality"]["sqnr_db_by_step"]], label=name, marker=".")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("noise-prediction SQNR vs fp16 (dB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out_plot) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return text
