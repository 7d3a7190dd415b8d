# The quality study: `snakemake --cores 1 results/study/{model}/QUALITY.md` calibrates every variant of
# `config.study.variants` and measures its fake-quant UNet against the model's fp16 reference images.
rule study_calibrate:
    input:
        model=model_dir,
        prompts=calibration_prompts,
        code=package_modules("quant", "models"),
    output:
        ckpt="results/study/{model}/{variant}/calib.pt",
        record="results/study/{model}/{variant}/calib.json",
    params:
        quant=study_calibration_params,
    log:
        "logs/study/{model}/{variant}/calibrate.log",
    benchmark:
        "benchmarks/study/{model}/{variant}/calibrate.tsv"
    resources:
        gpu=1,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/calibrate.py"


rule study_quality:
    input:
        model=model_dir,
        calib="results/study/{model}/{variant}/calib.pt",
        reference="results/{model}/reference",
        prompts=evaluation_prompts,
        code=package_modules("bench/quality", "bench/study", "bench/reference", "metrics"),
    output:
        record="results/study/{model}/{variant}/quality.json",
        images=directory("results/study/{model}/{variant}/images"),
    params:
        bench=study_bench_params,
    log:
        "logs/study/{model}/{variant}/quality.log",
    resources:
        gpu=1,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/study_quality.py"


rule study:
    input:
        records=study_records,
        code=package_modules("bench/study_report"),
    output:
        markdown="results/study/{model}/QUALITY.md",
        plot="results/study/{model}/QUALITY-sqnr.png",
    log:
        "logs/study/{model}/report.log",
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/study_report.py"
