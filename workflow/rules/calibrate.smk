rule calibrate:
    input:
        model=model_dir,
        prompts=calibration_prompts,
        code=package_modules("quant", "models"),
    output:
        ckpt="results/{model}/{quant}/calib.pt",
        record="results/{model}/{quant}/calib.json",
    params:
        quant=calibration_params,
    log:
        "logs/{model}/{quant}/calibrate.log",
    benchmark:
        "benchmarks/{model}/{quant}/calibrate.tsv"
    resources:
        gpu=1,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/calibrate.py"
