localrules:
    compare_datasets,


rule qc:
    input:
        real="results/{dataset}/filtered.h5ad",
        simulated="results/{dataset}/simulated/simulated.h5ad",
    output:
        summary=report(
            "results/{dataset}/qc/summary.tsv",
            caption="../report/qc_summary.rst",
            category="QC",
            subcategory="{dataset}",
        ),
        markers="results/{dataset}/qc/markers.tsv",
        marker_overlap=report(
            "results/{dataset}/qc/marker_overlap.tsv",
            caption="../report/marker_overlap.rst",
            category="QC",
            subcategory="{dataset}",
        ),
        violins=report(
            "results/{dataset}/qc/violins.png",
            caption="../report/violins.rst",
            category="QC",
            subcategory="{dataset}",
        ),
        pca=report(
            "results/{dataset}/qc/pca.png",
            caption="../report/pca.rst",
            category="QC",
            subcategory="{dataset}",
        ),
        umap=report(
            "results/{dataset}/qc/umap.png",
            caption="../report/umap.rst",
            category="QC",
            subcategory="{dataset}",
        ),
        marker_dotplot=report(
            "results/{dataset}/qc/marker_dotplot.png",
            caption="../report/marker_dotplot.rst",
            category="QC",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/qc.log",
    benchmark:
        "benchmarks/{dataset}/qc.tsv"
    conda:
        "../envs/scanpy.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    params:
        seed=dataset_seed,
        max_real_cells=setting("qc", "max_real_cells"),
        n_markers=setting("qc", "n_markers"),
    script:
        "../scripts/qc.py"


rule evaluate:
    input:
        real="results/{dataset}/filtered.h5ad",
        store="results/{dataset}/images/images.h5ad",
        simulated="results/{dataset}/simulated/simulated.h5ad",
    output:
        overall=report(
            "results/{dataset}/evaluation/overall.tsv",
            caption="../report/overall.rst",
            category="1. Realism",
            subcategory="{dataset}",
        ),
        metrics="results/{dataset}/evaluation/metrics.tsv",
        json="results/{dataset}/evaluation/metrics.json",
        confusion="results/{dataset}/evaluation/confusion.tsv",
        per_type=report(
            "results/{dataset}/evaluation/per_type.png",
            caption="../report/per_type.rst",
            category="1. Realism",
            subcategory="{dataset}",
        ),
        mean_variance=report(
            "results/{dataset}/evaluation/mean_variance.png",
            caption="../report/mean_variance.rst",
            category="1. Realism",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/evaluate.log",
    benchmark:
        "benchmarks/{dataset}/evaluate.tsv"
    conda:
        "../envs/scanpy.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    params:
        settings=setting("evaluate"),
        seed=dataset_seed,
    script:
        "../scripts/evaluate.py"


rule compare_datasets:
    input:
        expand("results/{dataset}/evaluation/overall.tsv", dataset=selected_datasets()),
    output:
        table=report(
            "results/overall_by_dataset.tsv",
            caption="../report/overall_by_dataset.rst",
            category="1. Realism",
            subcategory="all datasets",
        ),
        figure=report(
            "results/overall_by_dataset.png",
            caption="../report/overall_by_dataset.rst",
            category="1. Realism",
            subcategory="all datasets",
        ),
    log:
        "logs/compare_datasets.log",
    benchmark:
        "benchmarks/compare_datasets.tsv"
    conda:
        "../envs/scanpy.yaml"
    params:
        datasets=selected_datasets(),
    script:
        "../scripts/compare_datasets.py"
