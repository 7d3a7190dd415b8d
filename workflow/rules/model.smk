rule model:
    output:
        directory("resources/models/{model}"),
    params:
        model=model_params,
    input:
        code=model_inputs,
    log:
        "logs/{model}/model.log",
    benchmark:
        "benchmarks/{model}/model.tsv"
    conda:
        "../envs/quantdiff.yaml"
    script:
        "../scripts/model.py"
