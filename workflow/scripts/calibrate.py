"""Rule `calibrate`: ModelOpt post-training quantization of the UNet."""
from quantdiff.quant.calibrate import calibrate
from quantdiff.stage import stage

with stage(snakemake) as log:
    settings = dict(snakemake.params.quant, prompts=snakemake.input.prompts)
    calibrate(snakemake.input.model, settings, snakemake.output.ckpt, snakemake.output.record, log=log)
