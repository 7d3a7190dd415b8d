"""Rule `engine_tensorrt`: a TensorRT plan from the Q/DQ ONNX (needs TensorRT and a GPU)."""
from quantdiff.engines.stage import run_tensorrt_engine
from quantdiff.stage import stage

with stage(snakemake) as log:
    run_tensorrt_engine(snakemake.input.model, snakemake.input.onnx, snakemake.params.engine,
                        snakemake.output.plan, snakemake.output.record, log=log)
