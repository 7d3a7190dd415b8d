"""Rule `model`: materialize a model version as a diffusers folder."""
from quantdiff.models import materialize
from quantdiff.stage import stage

with stage(snakemake) as log:
    info = materialize(snakemake.wildcards.model, snakemake.params.model, snakemake.output[0])
    log(f"model {snakemake.wildcards.model}: {info}")
