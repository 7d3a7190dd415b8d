"""Rule `engine_torch`: real 8-bit modules, exported and packaged with AOTInductor (engine.pt2)."""
from quantdiff.engines.stage import run_torch_engine
from quantdiff.stage import stage

with stage(snakemake) as log:
    ckpt = snakemake.input.calib[0] if snakemake.input.calib else None
    run_torch_engine(snakemake.input.model, ckpt, snakemake.params.engine, snakemake.output.engine,
                     snakemake.output.record, log=log)
