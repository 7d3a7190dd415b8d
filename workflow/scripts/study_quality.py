"""Rule `study_quality`: one study variant's fake-quant UNet against the fp16 reference images."""
from quantdiff.bench.study import run_study_quality
from quantdiff.stage import stage

with stage(snakemake) as log:
    settings = dict(snakemake.params.bench, prompts=snakemake.input.prompts)
    run_study_quality(snakemake.input.model, snakemake.input.calib, snakemake.input.reference, settings,
                      snakemake.output.record, snakemake.output.images, log=log)
