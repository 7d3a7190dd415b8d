# Two rules, one per backend: ask for engine.plan (TensorRT) or engine.pt2 (PyTorch) directly,
# or let `engine.backend: auto` pick for bench. A missing TensorRT is an error, never a fallback.
rule engine_tensorrt:
    input:
        onnx="results/{model}/{precision}/unet.onnx",
        model=model_dir,
        code=package_modules("engines", "device"),
    output:
        plan="results/{model}/{precision}/engine.plan",
        record="results/{model}/{precision}/engine_tensorrt.json",
    params:
        engine=engine_params("tensorrt"),
    log:
        "logs/{model}/{precision}/engine_tensorrt.log",
    benchmark:
        "benchmarks/{model}/{precision}/engine_tensorrt.tsv"
    resources:
        gpu=1,
    conda:
        "../envs/tensorrt.yaml"
    script:
        "../scripts/engine_tensorrt.py"


rule engine_torch:
    input:
        model=model_dir,
        calib=calibrated_or_model,
        code=package_modules("engines", "device", "models", "quant"),
    output:
        engine="results/{model}/{precision}/engine.pt2",
        record="results/{model}/{precision}/engine_torch.json",
    params:
        engine=engine_params("torch"),
    log:
        "logs/{model}/{precision}/engine_torch.log",
    benchmark:
        "benchmarks/{model}/{precision}/engine_torch.tsv"
    resources:
        gpu=1,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/engine_torch.py"
