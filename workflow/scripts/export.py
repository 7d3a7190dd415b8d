"""Rule `export`: the UNet (calibrated for int8/fp8) as ONNX with Q/DQ nodes."""
from quantdiff.export.stage import run_export
from quantdiff.stage import stage

with stage(snakemake) as log:
    ckpt = snakemake.input.calib[0] if snakemake.input.calib else None
    record = ckpt.replace("calib.pt", "calib.json") if ckpt else None
    run_export(snakemake.input.model, ckpt, record, snakemake.params.export, snakemake.output.onnx,
               snakemake.output.record, log=log)
