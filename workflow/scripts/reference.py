"""Rule `reference`: fp16 images of the evaluation prompts, the target every 8-bit build is judged against."""
from quantdiff.bench.reference import write_reference
from quantdiff.stage import stage

with stage(snakemake) as log:
    settings = dict(snakemake.params.reference, prompts=snakemake.input.prompts)
    write_reference(snakemake.input.model, settings, snakemake.output[0], log=log)
