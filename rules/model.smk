rule reshape:
    input:
        "results/{dataset}/filtered.h5ad",
    output:
        store="results/{dataset}/images/images.h5ad",
        layout="results/{dataset}/images/layout.tsv",
    log:
        "logs/{dataset}/reshape.log",
    benchmark:
        "benchmarks/{dataset}/reshape.tsv"
    conda:
        "../envs/scanpy.yaml"
    resources:
        mem_mb=4000,
    params:
        side=setting("image", "side"),
        side_multiple=lambda w: dataset_settings(w.dataset)["train"]["strides"] ** 2,
        scaling=setting("image", "scaling"),
        gene_order=setting("image", "gene_order"),
        test_fraction=setting("image", "test_fraction"),
        seed=dataset_seed,
    script:
        "../scripts/reshape.py"


rule train:
    input:
        "results/{dataset}/images/images.h5ad",
    output:
        model="results/{dataset}/model/cvae.keras",
        posteriors="results/{dataset}/model/posteriors.npz",
        history="results/{dataset}/model/history.tsv",
        plot=report(
            "results/{dataset}/model/history.png",
            caption="../report/history.rst",
            category="Training",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/train.log",
    benchmark:
        "benchmarks/{dataset}/train.tsv"
    conda:
        tensorflow_env
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    params:
        settings=setting("train"),
        seed=dataset_seed,
        simulation=simulation_request,
    script:
        "../scripts/train.py"


rule simulate:
    input:
        model="results/{dataset}/model/cvae.keras",
        posteriors="results/{dataset}/model/posteriors.npz",
        store="results/{dataset}/images/images.h5ad",
    output:
        simulated="results/{dataset}/simulated/simulated.h5ad",
        expected="results/{dataset}/simulated/expected.tsv",
    log:
        "logs/{dataset}/simulate.log",
    benchmark:
        "benchmarks/{dataset}/simulate.tsv"
    conda:
        tensorflow_env
    threads: 2
    resources:
        mem_mb=4000,
    params:
        cells_per_type=setting("simulate", "cells_per_type"),
        cells=setting("simulate", "cells"),
        batch_size=setting("simulate", "batch_size"),
        count_sampling=setting("simulate", "count_sampling"),
        library_sizes=setting("simulate", "library_sizes"),
        latent=setting("simulate", "latent"),
        calibration=setting("simulate", "calibration"),
        origins=setting("simulate", "origins"),
        write_table=setting("simulate", "write_table"),
        seed=dataset_seed,
    script:
        "../scripts/simulate.py"


rule original_table:
    input:
        "results/{dataset}/simulated/simulated.h5ad",
    output:
        "results/{dataset}/simulated/simulated_table.h5",
    log:
        "logs/{dataset}/original_table.log",
    benchmark:
        "benchmarks/{dataset}/original_table.tsv"
    conda:
        "../envs/scanpy.yaml"
    resources:
        mem_mb=4000,
    script:
        "../scripts/original_table.py"


rule simulated_10x:
    input:
        "results/{dataset}/simulated/simulated.h5ad",
    output:
        directory("results/{dataset}/simulated/simulated_10x"),
    log:
        "logs/{dataset}/simulated_10x.log",
    benchmark:
        "benchmarks/{dataset}/simulated_10x.tsv"
    conda:
        "../envs/scanpy.yaml"
    resources:
        mem_mb=4000,
    script:
        "../scripts/simulated_10x.py"
