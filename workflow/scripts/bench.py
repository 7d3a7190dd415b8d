"""Rule `bench`: latency against torch.compile in the same job, quality against the fp16 reference."""
from quantdiff.bench.run import run_bench
from quantdiff.stage import stage

with stage(snakemake) as log:
    settings = dict(snakemake.params.bench, prompts=snakemake.input.prompts)
    outputs = {k: snakemake.output[k] for k in ("record", "images", "grid", "sqnr")}
    run_bench(snakemake.input.model, snakemake.input.engine, snakemake.params.backend, snakemake.input.reference,
              settings, outputs, log=log)
