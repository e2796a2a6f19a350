localrules:
    download,


rule download:
    output:
        "resources/datasets/{dataset}/{filename}",
    log:
        "logs/{dataset}/download_{filename}.log",
    params:
        source=lambda wildcards: source_entry(wildcards)["source"],
        sha256=lambda wildcards: source_entry(wildcards).get("sha256"),
    conda:
        "../envs/scanpy.yaml"
    script:
        "../scripts/download.py"


rule filter:
    input:
        unpack(filter_inputs),
    output:
        "results/{dataset}/filtered.h5ad",
    log:
        "logs/{dataset}/filter.log",
    benchmark:
        "benchmarks/{dataset}/filter.tsv"
    params:
        format=lambda wildcards: dataset(wildcards.dataset)["format"],
        label_column=lambda wildcards: dataset(wildcards.dataset)["label_column"],
        barcode_column=lambda wildcards: dataset(wildcards.dataset).get(
            "barcode_column", "barcodes"
        ),
        counts_layer=lambda wildcards: dataset(wildcards.dataset).get("counts_layer"),
        thresholds=config["filter"],
    resources:
        mem_mb=4000,
    conda:
        "../envs/scanpy.yaml"
    script:
        "../scripts/filter.py"
