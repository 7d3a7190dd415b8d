rule export:
    input:
        model=model_dir,
        calib=calibrated_or_model,
        code=package_modules("export", "models"),
    output:
        onnx="results/{model}/{precision}/unet.onnx",
        record="results/{model}/{precision}/export.json",
    params:
        export=export_params,
    log:
        "logs/{model}/{precision}/export.log",
    benchmark:
        "benchmarks/{model}/{precision}/export.tsv"
    resources:
        mem_mb=16000,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/export.py"
