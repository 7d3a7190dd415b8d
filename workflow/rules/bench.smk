rule reference:
    input:
        model=model_dir,
        prompts=evaluation_prompts,
        code=package_modules("bench/reference", "models"),
    output:
        directory("results/{model}/reference"),
    params:
        reference=reference_params,
    log:
        "logs/{model}/reference.log",
    resources:
        gpu=1,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/reference.py"


rule bench:
    input:
        model=model_dir,
        engine=engine_file,
        reference="results/{model}/reference",
        prompts=evaluation_prompts,
        code=package_modules("bench", "metrics", "device"),
    output:
        record="results/{model}/{precision}/bench.json",
        images=directory("results/{model}/{precision}/images"),
        grid=report(
            "results/{model}/{precision}/grid.png",
            caption="../report/grid.rst",
            category="Images",
            subcategory="{model}",
            labels={"model": "{model}", "precision": "{precision}", "figure": "fp16 vs 8-bit"},
        ),
        sqnr=report(
            "results/{model}/{precision}/sqnr.png",
            caption="../report/sqnr.rst",
            category="SQNR",
            subcategory="{model}",
            labels={"model": "{model}", "precision": "{precision}", "figure": "SQNR by step"},
        ),
    params:
        bench=bench_params,
        backend=engine_backend,
    log:
        "logs/{model}/{precision}/bench.log",
    benchmark:
        "benchmarks/{model}/{precision}/bench.tsv"
    resources:
        gpu=1,
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/bench.py"


rule summary:
    input:
        benches=bench_targets,
        code=package_modules("bench/report"),
    output:
        markdown="results/summary.md",
        html=report("results/summary.html", caption="../report/summary.rst", category="Summary"),
    log:
        "logs/summary.log",
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/summary.py"
