localrules:
    download,


rule download:
    input:
        local_files,
    output:
        "resources/datasets/{dataset}/{filename}",
    log:
        "logs/{dataset}/download_{filename}.log",
    benchmark:
        "benchmarks/{dataset}/download_{filename}.tsv"
    conda:
        "../envs/scanpy.yaml"
    params:
        source=lambda wildcards: local_source(source_entry(wildcards)["source"]),
        sha256=pinned_digest,
        sample=source_sample,
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
    conda:
        "../envs/scanpy.yaml"
    resources:
        mem_mb=4000,
    params:
        format=from_entry("format"),
        label_column=label_column,
        barcode_column=barcode_column,
        counts_layer=from_entry("counts_layer"),
        round_counts=from_entry("round_counts", False),
        sample=from_entry("sample"),
        exclude_types=excluded_types,
        thresholds=setting("filter"),
    script:
        "../scripts/filter.py"


rule cluster:
    input:
        matrix=lambda wildcards: downloaded(wildcards.dataset, "matrix"),
    output:
        "results/{dataset}/clusters.tsv",
    log:
        "logs/{dataset}/cluster.log",
    benchmark:
        "benchmarks/{dataset}/cluster.tsv"
    conda:
        "../envs/scanpy.yaml"
    resources:
        mem_mb=4000,
    params:
        format=from_entry("format"),
        resolution=lambda wildcards: dataset(wildcards.dataset)["cluster"]["resolution"],
        counts_layer=from_entry("counts_layer"),
        round_counts=from_entry("round_counts", False),
        sample=from_entry("sample"),
        thresholds=setting("filter"),
        seed=dataset_seed,
    script:
        "../scripts/cluster.py"
