import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def check_labels(name, entry):
    """A dataset's cell types come from its label column or from clustering its cells: one of the two."""
    if ("label_column" in entry) == ("cluster" in entry):
        raise ValueError(
            f"config: dataset {name}: give label_column (where its cell types are) or cluster (Leiden "
            f"clusters of its cells as the cell types), "
            f"{'not both' if 'cluster' in entry else 'one of the two'}"
        )
    if "cluster" in entry and "annotation" in entry:
        raise ValueError(
            f"config: dataset {name}: cluster types its cells by their clusters, so its annotation "
            f"would go unread; give label_column for the annotation's cell types, or drop the annotation"
        )


def check_selected_labels():
    """Before the schema, whose message for a selected matrix without labels ("'annotation' is a required
    property") would not name the other way to type its cells."""
    names = config.get("dataset", [])
    for name in [names] if isinstance(names, str) else names:
        if isinstance(config.get("datasets", {}).get(name), dict):
            check_labels(name, config["datasets"][name])


check_selected_labels()
validate(config, schema="../config/schemas/config.schema.yaml")


# The sections a dataset's entry may override, key by key, for its own results.
PER_DATASET_SECTIONS = ("filter", "image", "train", "simulate", "qc", "evaluate")


def dataset_settings(name):
    """The settings a dataset runs with: the top-level seed and sections, with the keys its
    entry overrides (a key replaces the top-level one whole, a cells_per_type mapping too).
    """
    entry = config["datasets"][name]
    settings = {"seed": entry.get("seed", config["seed"])}
    for section in PER_DATASET_SECTIONS:
        settings[section] = {**config[section], **entry.get(section, {})}
    return settings


def setting(section, key=None):
    """A params function: the wildcards' dataset's section of its settings, or one key of it."""

    def of_dataset(wildcards):
        values = dataset_settings(wildcards.dataset)[section]
        return values if key is None else values[key]

    return of_dataset


def dataset_seed(wildcards):
    return dataset_settings(wildcards.dataset)["seed"]


def check_setting_combinations(settings, where):
    """Combinations the train or simulate job would refuse, refused before any job starts."""
    train, image, simulate = settings["train"], settings["image"], settings["simulate"]
    loss = train["reconstruction_loss"]
    if image["side"] is not None and image["side"] % train["strides"] ** 2:
        raise ValueError(
            f"{where}: image.side {image['side']} must be a multiple of train.strides squared "
            f"({train['strides'] ** 2}): the encoder's two strided convolutions each divide the side by the stride"
        )
    if train["count_split"] and loss == "mse":
        raise ValueError(
            f"{where}: train.count_split splits each cell's counts between the encoder and the loss; "
            "it needs a count loss (train.reconstruction_loss 'multinomial' or 'negative_binomial')"
        )
    if simulate["library_sizes"] == "decoded" and loss != "mse":
        raise ValueError(
            f"{where}: simulate.library_sizes 'decoded' needs train.reconstruction_loss 'mse'; "
            f"a {loss} model decodes proportions, not totals"
        )
    if (
        simulate["library_sizes"] == "decoded"
        and image["scaling"] == "log1p_cp10k_gene_max"
    ):
        raise ValueError(
            f"{where}: simulate.library_sizes 'decoded' cannot be used with image.scaling "
            "'log1p_cp10k_gene_max': its images, and so the decoder, carry no library size"
        )
    if simulate["library_sizes"] == "paired" and simulate["latent"] != "posterior":
        raise ValueError(
            f"{where}: simulate.library_sizes 'paired' takes the library size of the training cell "
            "whose posterior gives the latent; it needs simulate.latent 'posterior'"
        )
    if (
        simulate["count_sampling"] == "negative_binomial"
        and loss != "negative_binomial"
    ):
        raise ValueError(
            f"{where}: simulate.count_sampling 'negative_binomial' needs the dispersions learned with "
            f"train.reconstruction_loss 'negative_binomial' (it is {loss!r})"
        )
    if simulate["cells"] is not None and isinstance(simulate["cells_per_type"], dict):
        raise ValueError(
            f"{where}: simulate.cells ({simulate['cells']} cells split as the real cells are) and a "
            "simulate.cells_per_type mapping each say how many cells of which type; set simulate.cells: "
            "null to simulate the mapping's cells"
        )
    if (
        simulate["calibration"] == "type_moments"
        and simulate["count_sampling"] != "poisson"
    ):
        raise ValueError(
            f"{where}: simulate.calibration 'type_moments' draws its own negative binomial in place of "
            f"simulate.count_sampling 'poisson' (it is {simulate['count_sampling']!r}); "
            f"set simulate.calibration: type_means or type_quantiles to keep that count sampling"
        )


def check_dataset_settings():
    """Each selected dataset's own settings, merged into the top-level ones, against the same schema
    and combination checks (a dataset's section is validated whole, so a misspelt key is named).
    """
    check_setting_combinations(config, "config")
    for name in selected_datasets():
        entry = config["datasets"][name]
        if not any(key in entry for key in ("seed", *PER_DATASET_SECTIONS)):
            continue
        settings = dataset_settings(name)
        try:
            validate(  # with this dataset's entry alone: validating all of them for each would be quadratic
                {**config, "datasets": {name: entry}, **settings},
                schema="../config/schemas/config.schema.yaml",
                set_default=False,
            )
        except WorkflowError as error:
            raise ValueError(
                f"config: dataset {name}'s own settings: {error}"
            ) from None
        check_setting_combinations(settings, f"config: dataset {name}")


DOWNLOAD_NAMES = {
    "10x_tarball": {"matrix": "matrix.tar.gz", "annotation": "annotation.tsv"},
    "10x_h5": {"matrix": "matrix.h5", "annotation": "annotation.tsv"},
    # A text table keeps its bytes, gzipped or not; the filter reads either.
    "counts_table": {"matrix": "matrix.txt", "annotation": "annotation.tsv"},
    "h5ad": {"matrix": "matrix.h5ad", "annotation": "annotation.tsv"},
    "loom": {"matrix": "matrix.loom", "annotation": "annotation.tsv"},
}
# An h5ad's labels are an obs column (a loom's a column attribute), unless an annotation table is given to
# label its cells.
OPTIONAL_ROLES = {"h5ad": {"annotation"}, "loom": {"annotation"}}
# By the rules' folder, as a rule's own conda path is.
TENSORFLOW_ENVS = {
    "cpu": "../envs/tensorflow.yaml",
    "cuda": "../envs/tensorflow-cuda.yaml",
}


def selected_datasets():
    names = config["dataset"]
    names = [names] if isinstance(names, str) else names
    unknown = [name for name in names if name not in config["datasets"]]
    if unknown:
        raise ValueError(
            f"config: dataset {', '.join(unknown)} is not among the datasets "
            f"({', '.join(config['datasets'])})"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"config: dataset lists {', '.join(repeated)} more than once; each dataset's "
            f"results are made once (for a replicate, add an entry with its own seed)"
        )
    return names


check_dataset_settings()


def check_empty_mappings():
    """An empty simulate.cells_per_type mapping in a --configfile names no cell type, and Snakemake's key-by-key
    merge of the files would silently keep the earlier file's value in its place."""
    for path in workflow.overwrite_configfiles:
        overlay = yaml.safe_load(Path(path).read_text()) or {}
        datasets = overlay.get("datasets") or {}
        sections = [("", overlay)] + [
            (f"datasets.{name}.", entry)
            for name, entry in datasets.items()
            if isinstance(entry, dict)
        ]
        for where, section in sections:
            simulate = section.get("simulate")
            if isinstance(simulate, dict) and simulate.get("cells_per_type") == {}:
                raise ValueError(
                    f"config: {path}: {where}simulate.cells_per_type is an empty mapping, which "
                    f"names no cell type; give a number for every type, or name types with theirs"
                )


check_empty_mappings()


def dataset(name):
    return config["datasets"][name]


def roles(name):
    """The files of a dataset: its matrix and, but for an h5ad or loom file without one or cells to be
    clustered, its annotation."""
    format = dataset(name)["format"]
    return [
        role
        for role in DOWNLOAD_NAMES[format]
        if role in dataset(name)
        or not (role in OPTIONAL_ROLES.get(format, ()) or "cluster" in dataset(name))
    ]


def from_entry(key, default=None):
    """A params function: the value of ``key`` in the job's dataset entry."""
    return lambda wildcards: dataset(wildcards.dataset).get(key, default)


def label_column(wildcards):
    """Where the filter finds a dataset's cell types: its own column, or the cluster rule's."""
    entry = dataset(wildcards.dataset)
    return "cluster" if "cluster" in entry else entry["label_column"]


def tensorflow_env(wildcards):
    """The conda environment of the rules that run TensorFlow: its CPU or its CUDA build (``conda_tensorflow``)."""
    return TENSORFLOW_ENVS[config["conda_tensorflow"]]


def excluded_types(wildcards):
    """The cell types the filter leaves out, as text: YAML reads a cluster's name, ``[7]``, as a number."""
    return [str(name) for name in dataset(wildcards.dataset).get("exclude_types", [])]


def barcode_column(wildcards):
    entry = dataset(wildcards.dataset)
    return "barcode" if "cluster" in entry else entry.get("barcode_column", "barcodes")


def downloaded(name, role):
    """Where a dataset's matrix or annotation is downloaded to, in the folder of the first dataset
    of the config that shares its download (see ``sharing_download``)."""
    owner = sharing_download(name, role)[0]
    filename = DOWNLOAD_NAMES[dataset(name)["format"]][role]
    return f"resources/datasets/{owner}/{filename}"


def sharing_download(name, role):
    """The datasets of the config (``name`` among them, in the config's order) whose download of
    ``role`` fetches the same file: the same file name, sources (local paths made absolute) and,
    for a matrix, sample. A variant of a dataset (another seed or other settings, the same
    sources) reads the first one's files rather than downloading them again."""

    def download_key(other):
        sources = local_source(dataset(other)[role]["source"])
        return (
            DOWNLOAD_NAMES[dataset(other)["format"]][role],
            [
                source if "://" in source else str(Path(source).absolute())
                for source in ([sources] if isinstance(sources, str) else sources)
            ],
            dataset(other).get("sample") if role == "matrix" else None,
        )

    key = download_key(name)
    return [
        other
        for other in config["datasets"]
        if "format" in dataset(other)
        and role in dataset(other)
        and download_key(other) == key
    ]


def download_pin(name, role):
    """The SHA-256 that any dataset sharing the download pins (None where none does); refused
    where two pin different ones."""
    pins = {
        other: dataset(other)[role]["sha256"].lower()
        for other in sharing_download(name, role)
        if dataset(other)[role].get("sha256")
    }
    if len(set(pins.values())) > 1:
        raise ValueError(
            f"config: datasets {' and '.join(pins)} share the download of their {role} "
            f"({dataset(name)[role]['source']}) but pin different SHA-256 digests; correct the "
            f"wrong one"
        )
    return next(iter(pins.values()), None)


# The workflow's own folder: a relative source missing from the working directory is looked up
# there, so the shipped example data is found when the workflow runs from another directory.
WORKFLOW_ROOT = Path(workflow.current_basedir.get_path_or_uri(secret_free=True)).parent


def local_source(source):
    """A local path with ~ expanded; a relative one from the working directory, else from the
    workflow's folder (each of a list of files)."""
    if isinstance(source, list):
        return [local_source(each) for each in source]
    if "://" in source:
        return source
    source = str(Path(source).expanduser())
    if Path(source).is_absolute() or Path(source).exists():
        return source
    shipped = WORKFLOW_ROOT / source
    return str(shipped) if shipped.exists() else source


def local_files(wildcards):
    """The local files a download copies (of a folder, every file in it), as its inputs: one
    edited in place is copied again, and what follows reruns (Snakemake reruns a job whose
    input is newer than its output). Addresses on the web are not inputs."""
    sources = local_source(source_entry(wildcards)["source"])
    paths = [
        Path(unquote(urlparse(source).path) if source.startswith("file://") else source)
        for source in (sources if isinstance(sources, list) else [sources])
        if "://" not in source or source.startswith("file://")
    ]
    return [
        str(file)
        for path in paths
        for file in (sorted(path.rglob("*")) if path.is_dir() else [path])
        if file.is_file() or not path.is_dir()
    ]


def source_entry(wildcards):
    return dataset(wildcards.dataset)[download_role(wildcards)]


def download_role(wildcards):
    """The role (matrix or annotation) of the file a download job fetches."""
    format = dataset(wildcards.dataset)["format"]
    role_of_file = {
        DOWNLOAD_NAMES[format][role]: role for role in roles(wildcards.dataset)
    }
    if wildcards.filename not in role_of_file:
        raise ValueError(
            f"{wildcards.dataset} ({format}) has no file {wildcards.filename}"
        )
    return role_of_file[wildcards.filename]


def simulation_request(wildcards, output):
    """The simulate settings that the train job checks against the cell types before training,
    so that a misspelt type in cells_per_type fails in seconds rather than after the training.
    Taking ``output`` makes Snakemake count them as derived, not as train settings: changing
    them reruns simulate, not train (see ``pinned_digest``)."""
    simulate = dataset_settings(wildcards.dataset)["simulate"]
    return {key: simulate[key] for key in ("cells_per_type", "cells", "write_table")}


def pinned_digest(wildcards, output):
    """The SHA-256 the dataset's config pins for this download, checked by the download
    job. Taking ``output`` makes Snakemake count it as derived from the output, not as a
    setting whose change reruns the download and all that follows: pinning the digest
    that the download recorded (as its .sha256 file invites) reruns nothing, and a pin
    that differs from that record is refused when the workflow loads. A pin of another dataset
    that shares the download counts too."""
    return download_pin(wildcards.dataset, download_role(wildcards))


def check_pinned_digest(name, role):
    """A digest pinned after the download agrees with the one the download recorded beside its file."""
    pinned = dataset(name)[role].get("sha256")
    record = Path(downloaded(name, role) + ".sha256")
    if not pinned or not record.exists():
        return
    recorded = record.read_text().split()[0]
    if recorded != pinned.lower():
        raise ValueError(
            f"config: dataset {name}: {role}.sha256 is {pinned}, but {downloaded(name, role)} was "
            f"downloaded with SHA-256 {recorded} (its record {record}); delete the file to download "
            f"and check the source again, or correct the digest"
        )


def source_sample(wildcards):
    """The dataset's sample key for its matrix (a folder source is packed for that sample alone, and an
    archive of HDF5 files gives that sample's)."""
    if wildcards.filename not in (
        DOWNLOAD_NAMES["10x_tarball"]["matrix"],
        DOWNLOAD_NAMES["10x_h5"]["matrix"],
    ):
        return None
    return dataset(wildcards.dataset).get("sample")


def zarr_hint(folder):
    """An AnnData zarr store is a folder too: say how to make it the .h5ad the workflow reads."""
    if not any((Path(folder) / marker).exists() for marker in (".zgroup", "zarr.json")):
        return ""
    return (
        "; it is a zarr store: write it as an .h5ad with "
        "anndata.read_zarr(store).write_h5ad(path) and give that file as the source"
    )


def check_local_sources(names):
    """Fail at start-up, not mid-run, when a local source file is missing."""
    for name in names:
        if dataset(name).get("sample") and dataset(name)["format"] not in (
            "10x_tarball",
            "10x_h5",
        ):
            raise ValueError(
                f"config: dataset {name}: sample picks one of several matrices in a 10x_tarball "
                f"or 10x_h5 source (a folder or archive); its {dataset(name)['format']} source holds one"
            )
        for role in roles(name):
            entry = dataset(name).get(role)
            if entry is None:
                raise ValueError(
                    f"config: dataset {name} ({dataset(name)['format']}) needs a '{role}' entry"
                )
            sources = local_source(entry["source"])
            if isinstance(sources, list) and (
                dataset(name)["format"] != "10x_tarball" or role != "matrix"
            ):
                raise ValueError(
                    f"config: dataset {name}: {role} source is a list of files; only a 10x_tarball "
                    f"matrix may be given as its files (matrix, barcodes, genes or features)"
                )
            download_pin(name, role)  # the datasets sharing the download agree
            if Path(downloaded(name, role)).exists():
                check_pinned_digest(name, role)
                continue
            if isinstance(sources, list):
                for source in sources:
                    check_local_source(name, role, source, may_be_folder=False)
            else:
                check_local_source(
                    name,
                    role,
                    sources,
                    may_be_folder=dataset(name)["format"] == "10x_tarball"
                    and role == "matrix",
                )


# The https:// address of a public file given under a scheme the download job does not read: GEO's and EBI's
# FTP servers serve the same paths over https, and public buckets have https addresses.
HTTPS_ADDRESSES = {
    "ftp": "https://{host}{path}",
    "s3": "https://{host}.s3.amazonaws.com{path}",
    "gs": "https://storage.googleapis.com/{host}{path}",
}


def check_local_source(name, role, source, may_be_folder):
    """A local source is there, and a folder only where it may be (a 10x_tarball matrix); a web source has an
    address the download job reads."""
    if "://" in source:
        address = urlparse(source)
        if address.scheme not in ("https", "http", "file"):
            https = HTTPS_ADDRESSES.get(address.scheme, "")
            raise ValueError(
                f"config: dataset {name}: {role} source {source}: the download job reads https://, "
                f"http://, file:// addresses or local paths, not {address.scheme}://"
                + (
                    f"; a public file there is mostly also at "
                    f"{https.format(host=address.netloc, path=address.path)}"
                    if https
                    else ""
                )
            )
        return
    if Path(source).is_dir():
        # Cell Ranger's matrix folder: the download job packs it into the tarball.
        if may_be_folder:
            return
        raise ValueError(
            f"config: dataset {name}: {role} source {source} is a folder; only a "
            f"10x_tarball matrix may be a folder (of matrix.mtx, barcodes, genes or features)"
            f"{zarr_hint(source)}"
        )
    if not Path(source).is_file():
        raise ValueError(
            f"config: dataset {name}: {role} source {source} does not exist (relative "
            f"paths are read from the working directory {Path.cwd()}, or else from "
            f"the workflow's folder {WORKFLOW_ROOT})"
        )


def filter_inputs(wildcards):
    inputs = {
        role: downloaded(wildcards.dataset, role) for role in roles(wildcards.dataset)
    }
    if "cluster" in dataset(wildcards.dataset):  # the clusters are its annotation
        inputs["annotation"] = f"results/{wildcards.dataset}/clusters.tsv"
    return inputs


def all_outputs():
    names = selected_datasets()
    check_local_sources(names)
    outputs = []
    for name in names:
        outputs += [
            f"results/{name}/simulated/simulated.h5ad",
            f"results/{name}/simulated/expected.tsv",
            f"results/{name}/qc/summary.tsv",
            f"results/{name}/evaluation/overall.tsv",
            f"results/{name}/model/history.png",
        ]
        simulate = dataset_settings(name)["simulate"]
        if simulate["write_table"]:
            outputs.append(f"results/{name}/simulated/simulated_table.h5")
        if simulate["write_10x"]:
            outputs.append(f"results/{name}/simulated/simulated_10x")
    return outputs + ["results/overall_by_dataset.tsv"]


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    filename="|".join(
        re.escape(name) for names in DOWNLOAD_NAMES.values() for name in names.values()
    ),
