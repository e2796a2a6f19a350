import csv
import gzip
import io
import itertools
import logging
import re
import tarfile
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

import cvaesim.io
from cvaesim import InputError
from cvaesim.filtering import attach_labels
from cvaesim.archives import pack_10x_folder
from cvaesim.download import container_problem
from cvaesim.io import atomic_output, read_10x_h5, read_10x_tarball, read_h5ad_counts, read_loom_counts
from cvaesim.matrix_checks import counts_problem
from cvaesim.tables import read_annotation, read_counts_table

from conftest import (EMBEDDED_ANNOTATION, EMBEDDED_H5AD, EMBEDDED_TARBALL, add_member, write_10x_h5, write_loom,
                      write_tarball)


def test_embedded_tarball_holds_the_bundled_pbmc_counts():
    adata = read_10x_tarball(EMBEDDED_TARBALL)
    assert adata.shape == (700, 765)
    assert adata.X.dtype == np.int32 and adata.X.min() >= 0
    # Same cells and counts as the .h5ad written from the same recovery.
    h5ad = ad.read_h5ad(EMBEDDED_H5AD)
    assert list(adata.obs_names) == list(h5ad.obs_names)
    assert (adata.X != sp.csr_matrix(h5ad.X)).nnz == 0
    assert "CD4+/CD45RA+/CD25- Naive T" in set(read_annotation(EMBEDDED_ANNOTATION, "barcodes", "celltype"))


@pytest.mark.parametrize("v3", [False, True])
def test_reads_v2_and_v3_layouts(tmp_path, small_cells, v3):
    path = write_tarball(tmp_path / "m.tar.gz", small_cells, v3=v3)
    adata = read_10x_tarball(path)
    assert list(adata.var_names) == list(small_cells.var_names)
    assert adata.var["gene_ids"].iloc[0] == "ENSG00000000000"
    assert list(adata.obs_names) == list(small_cells.obs_names)
    assert np.array_equal(adata.X.toarray(), small_cells.X.toarray())


def test_truncated_tarball_is_a_clear_error(tmp_path, small_cells):
    whole = write_tarball(tmp_path / "m.tar.gz", small_cells).read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated.tar.gz.*(truncated|corrupt|complete)"):
        read_10x_tarball(truncated)


def test_non_gzip_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "page.tar.gz"
    bogus.write_text("<html>Access denied</html>")
    with pytest.raises(InputError, match="page.tar.gz: not a readable tar archive"):
        read_10x_tarball(bogus)


def test_a_matrix_of_another_format_is_named_in_the_error(tmp_path, small_cells):
    tarball = write_tarball(tmp_path / "m.tar.gz", small_cells)
    h5 = write_10x_h5(tmp_path / "m.h5", small_cells, v3=True)
    # Each file given as the formats it is not: the error says what it is.
    with pytest.raises(InputError, match="not a readable .h5ad file .*; it is gzip-compressed, as a 10x tarball is, "
                                         "so the dataset's format \\(or evaluate's --format\\) may be 10x_tarball"):
        read_h5ad_counts(tarball, "cell_type", None)
    with pytest.raises(InputError, match="it is an AnnData .h5ad file, so the dataset's format \\(or evaluate's --format\\) may be h5ad"):
        read_10x_h5(EMBEDDED_H5AD)
    with pytest.raises(InputError, match=r"not a readable tar archive \(file could not be opened successfully\); it is "
                                         "a 10x HDF5 matrix, so the dataset's format \\(or evaluate's --format\\) may be 10x_h5$"):
        read_10x_tarball(h5)
    assert "may be h5ad" in container_problem(EMBEDDED_H5AD, "matrix.tar.gz")
    assert "may be 10x_tarball" in container_problem(tarball, "matrix.h5")
    # Compressed whole, an .h5ad or .h5 is no format's file as it is: the download decompresses it for the HDF5
    # formats (test_download), and the error says so, whichever format is set.
    gzipped_h5ad = tmp_path / "cells.h5ad.gz"
    gzipped_h5ad.write_bytes(gzip.compress(EMBEDDED_H5AD.read_bytes()))
    for expected in ("matrix.h5ad", "matrix.h5", "matrix.tar.gz"):
        assert container_problem(gzipped_h5ad, expected).endswith(
            "; it is a gzip-compressed HDF5 file: the download decompresses one given as an h5ad, loom or 10x_h5 "
            "dataset's source; else decompress it (gunzip) and give the uncompressed file")
    with pytest.raises(InputError, match="it is a gzip-compressed HDF5 file: the download decompresses"):
        read_h5ad_counts(gzipped_h5ad, "cell_type", None)
    # A gzipped matrix.mtx is no tarball either: the error says what a 10x_tarball source is.
    gzipped_mtx = tmp_path / "matrix.mtx.gz"
    gzipped_mtx.write_bytes(gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n" + b"1 1 1\n" * 200))
    assert container_problem(gzipped_mtx, "matrix.tar.gz").endswith(
        "; it is a gzip-compressed Matrix Market file alone: a 10x_tarball source is the folder (or tarball) that "
        "holds it with its barcodes and genes or features lists")
    # R's saveRDS (gzipped by default, or not) and zip archives (as Zenodo and figshare serve folders).
    serialised = b"X\n\x00\x00\x00\x03\x00\x04\x02\x01" + bytes(600)
    (tmp_path / "seurat.rds").write_bytes(gzip.compress(serialised))
    (tmp_path / "plain.rds").write_bytes(serialised)
    with zipfile.ZipFile(tmp_path / "matrix.zip", "w") as archive:
        archive.writestr("filtered_feature_bc_matrix/matrix.mtx", "%%MatrixMarket matrix coordinate integer general\n")
    with zipfile.ZipFile(tmp_path / "counts.xlsx", "w") as workbook:  # the parts of an .xlsx that tell it
        workbook.writestr("[Content_Types].xml", "<Types/>")
        workbook.writestr("xl/workbook.xml", "<workbook/>")
    for expected in ("matrix.h5ad", "matrix.tar.gz", "matrix.txt"):
        for name in ("seurat.rds", "plain.rds"):
            assert "; it is an R data file (.rds or .RData, as Seurat objects are saved): write its counts and " \
                   "metadata from R (DropletUtils::write10xCounts(" in container_problem(tmp_path / name, expected)
        assert container_problem(tmp_path / "matrix.zip", expected).endswith(
            "; it is a zip archive: unzip it and give the folder it makes (a 10x matrix folder) or the file in it as "
            "the source")
        assert container_problem(tmp_path / "counts.xlsx", expected).endswith(
            "; it is an Excel workbook: save its sheet as CSV (comma- or tab-separated text) and give that file as "
            "the source (a count matrix as a counts_table)")
    # Gzipped bytes that are none of these.
    gzipped_binary = tmp_path / "binary.gz"
    gzipped_binary.write_bytes(gzip.compress(bytes(range(256)) * 4))
    assert container_problem(gzipped_binary, "matrix.tar.gz").endswith(
        "; it is gzip-compressed, but neither a tar archive nor an HDF5 file nor text")
    # HDF5 files of other tools: a loom file's root 'matrix' is a dataset, not Cell Ranger's group (it crashed the
    # 10x reader and was called a 10x HDF5 matrix); written here as the loom specification lays them out.
    loom, h5seurat = tmp_path / "cells.loom", tmp_path / "cells.h5Seurat"
    with h5py.File(loom, "w") as h5:
        h5["matrix"] = small_cells.X.T.toarray()
        h5["row_attrs/Gene"] = small_cells.var_names.to_numpy().astype("S")
        h5["col_attrs/CellID"] = small_cells.obs_names.to_numpy().astype("S")
        h5.create_group("layers")
    with h5py.File(h5seurat, "w") as h5:
        h5.create_group("assays/RNA")
        h5.create_group("meta.data")
    # MuData's .h5mu: an AnnData per modality under mod/ (anndata's reader said to update anndata).
    h5mu = tmp_path / "cells.h5mu"
    small_cells.write_h5ad(tmp_path / "rna.h5ad")
    with h5py.File(h5mu, "w") as h5, h5py.File(tmp_path / "rna.h5ad", "r") as rna:
        h5.attrs["encoding-type"], h5.attrs["encoding-version"] = "MuData", "0.1.0"
        rna.copy(rna["/"], h5, "mod/rna")
        rna.copy(rna["obs"], h5, "obs")
    # A pandas table (the original's simulated_table.h5 is one), written by pandas through PyTables.
    table = tmp_path / "cells.h5"
    small_cells.to_df().to_hdf(table, key="counts", format="fixed")
    for path, advice in [(loom, r"it is a loom file, so the dataset's format \(or evaluate's --format\) may be loom$"),
                         (table, r"it is a pandas HDF5 table \(as DataFrame.to_hdf writes one, .*\): read it with "
                                 r"pandas.read_hdf and write its counts as an .h5ad or a CSV \(a counts_table\)$"),
                         (h5seurat, r"it is a Seurat .h5Seurat file: convert it to an .h5ad \(SeuratDisk"),
                         (h5mu, r"it is a MuData .h5mu file: write its RNA modality as an .h5ad \(mudata: "
                                r"mudata.read_h5mu\(path\)\[\"rna\"\].write_h5ad")]:
        for read in (read_10x_h5, lambda source: read_h5ad_counts(source, "cell_type", None)):
            with pytest.raises(InputError, match=advice):
                read(path)
    # A file of no known format gets no guess.
    bogus = tmp_path / "page.h5ad"
    bogus.write_text("<html>Access denied</html>")
    assert "may be" not in container_problem(bogus, "matrix.h5ad")


def test_member_outside_the_folder_is_refused(tmp_path, small_cells):
    path = write_tarball(tmp_path / "evil.tar.gz", small_cells, extra={"../x": b"boom"})
    with pytest.raises(InputError, match=r"evil.tar.gz: refusing archive member '\.\./x'"):
        read_10x_tarball(path)
    assert not (tmp_path.parent / "x").exists()


def test_links_are_refused(tmp_path, small_cells):
    path = tmp_path / "link.tar.gz"
    write_tarball(path, small_cells)
    with tarfile.open(tmp_path / "link2.tar.gz", "w:gz") as archive, tarfile.open(path) as source:
        for member in source:
            archive.addfile(member, source.extractfile(member))
        link = tarfile.TarInfo("filtered_matrices_mex/hg19/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(InputError, match="links are not allowed"):
        read_10x_tarball(tmp_path / "link2.tar.gz")


def test_missing_matrix_and_inconsistent_sizes(tmp_path, small_cells):
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as archive:
        add_member(archive, "readme.txt", b"hi")
    with pytest.raises(InputError, match=r"empty.tar.gz: holds no matrix named as the workflow reads them \(.*all_genes.csv\)$"):
        read_10x_tarball(empty)
    # GEO's RAW tar of each sample's Cell Ranger HDF5 file: the error says to give one as a 10x_h5 source.
    with tarfile.open(hdf5_only := tmp_path / "GSE1_RAW.tar", "w") as archive:
        for sample in range(1, 6):
            add_member(archive, f"GSM{sample}_filtered_feature_bc_matrix.h5", b"\x89HDF")
    with pytest.raises(InputError, match=r"GSE1_RAW.tar: holds no matrix .*; it holds HDF5 files "
                                         r"\(GSM1_filtered_feature_bc_matrix.h5, GSM2_filtered_feature_bc_matrix.h5, "
                                         r"GSM3_filtered_feature_bc_matrix.h5, ...\): give it as a 10x_h5 source "
                                         r"\(the sample key naming the file where it holds several\)"):
        read_10x_tarball(hdf5_only)
    members = tarball_members(write_tarball(tmp_path / "m.tar.gz", small_cells[:10]))
    members["filtered_matrices_mex/hg19/barcodes.tsv"] += b"EXTRA-1\n"
    with pytest.raises(InputError, match=r"11 barcodes; the barcode list has one line too many: a header line\?"):
        read_10x_tarball(tarball_of(tmp_path / "broken.tar.gz", members))


def test_geo_files_with_a_sample_prefix_are_read(tmp_path, small_cells):
    # GEO's GSE..._RAW.tar: an uncompressed tar of each sample's gzipped GSM..._matrix.mtx.gz and lists.
    raw = write_tarball(tmp_path / "GSE1_RAW.tar", small_cells, folder="", v3=True, prefix="GSM1_sample_",
                        compression="")
    adata = read_10x_tarball(raw)
    assert (adata.X != small_cells.X).nnz == 0 and list(adata.obs_names) == list(small_cells.obs_names)
    assert list(adata.var_names) == list(small_cells.var_names)
    # Some uploads prefix the matrix only.
    members = {name.replace("GSM1_sample_features", "features").replace("GSM1_sample_barcodes", "barcodes"): payload
               for name, payload in tarball_members(raw).items()}
    assert sorted(members) == ["GSM1_sample_matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"]
    assert (read_10x_tarball(tarball_of(tmp_path / "matrix_only.tar.gz", members)).X != small_cells.X).nnz == 0
    # Some name the matrix with more words than its lists (GSE1_count_matrix.mtx.gz beside GSE1_barcodes.tsv.gz).
    longer = {name.replace("GSM1_sample_features", "GSM1_features").replace("GSM1_sample_barcodes", "GSM1_barcodes"):
              payload for name, payload in tarball_members(raw).items()}
    assert sorted(longer) == ["GSM1_barcodes.tsv.gz", "GSM1_features.tsv.gz", "GSM1_sample_matrix.mtx.gz"]
    assert (read_10x_tarball(tarball_of(tmp_path / "longer.tar.gz", longer)).X != small_cells.X).nnz == 0
    # A prefixed matrix whose lists are missing says which names were looked for.
    del members["barcodes.tsv.gz"]
    with pytest.raises(InputError, match=r"has no barcode file \(GSM1_sample_barcodes.tsv or .* or barcodes.tsv.gz"):
        read_10x_tarball(tarball_of(tmp_path / "nobarcodes.tar.gz", members))


def test_the_sample_key_picks_one_of_several_samples_or_genomes(tmp_path, small_cells):
    samples = {"GSM1_sample_": small_cells, "GSM2_": small_cells[:5], "GSM10_": small_cells[5:8]}
    members = {}
    for prefix, cells in samples.items():
        members |= tarball_members(write_tarball(tmp_path / f"{prefix}.tar", cells, folder="", v3=True, prefix=prefix,
                                                 compression=""))
    raw = tarball_of(tmp_path / "GSE1_RAW.tar.gz", members)
    # Unnamed, several samples are refused, naming each and the key.
    with pytest.raises(InputError, match=r"GSE1_RAW.tar.gz: holds more than one matrix folder or sample "
                                         r"\(GSM10_matrix.mtx, GSM1_sample_matrix.mtx, GSM2_matrix.mtx\); name the "
                                         r"one to read with the dataset's sample key"):
        read_10x_tarball(raw)
    # A prefix names a sample up to a separator: GSM1 is not GSM10.
    for sample, prefix in (("GSM1", "GSM1_sample_"), ("GSM1_sample", "GSM1_sample_"), ("GSM1_sample_", "GSM1_sample_"),
                           ("GSM10", "GSM10_"), ("GSM2_", "GSM2_")):
        adata = read_10x_tarball(raw, sample=sample)
        assert list(adata.obs_names) == list(samples[prefix].obs_names), sample
        assert (adata.X != samples[prefix].X).nnz == 0
    for sample, problem in (("GSM", "no"), ("GSM3", "no"), ("sample", "no")):
        with pytest.raises(InputError, match=rf"GSE1_RAW.tar.gz: {problem} matrix is named by sample '{sample}' "
                                             r"\(it holds GSM10_matrix.mtx, GSM1_sample_matrix.mtx, GSM2_matrix.mtx\)"):
            read_10x_tarball(raw, sample=sample)
    # A name that must match the one matrix there is: a wrong one is refused rather than ignored.
    with pytest.raises(InputError, match=r"no matrix is named by sample 'GSM2' \(it holds filtered_matrices_mex"):
        read_10x_tarball(write_tarball(tmp_path / "one.tar.gz", small_cells), sample="GSM2")
    # Cell Ranger 2's mixed-species tarball: a folder per genome, picked by its name.
    genomes = {**tarball_members(write_tarball(tmp_path / "h.tar.gz", small_cells[:6], folder="matrices/hg19")),
               **tarball_members(write_tarball(tmp_path / "m.tar.gz", small_cells[6:], folder="matrices/mm10"))}
    barnyard = tarball_of(tmp_path / "barnyard.tar.gz", genomes)
    assert list(read_10x_tarball(barnyard, sample="mm10").obs_names) == list(small_cells[6:].obs_names)
    with pytest.raises(InputError, match=r"more than one matrix is named by sample 'matrices' \(it holds "
                                         r"matrices/hg19, matrices/mm10\)"):
        read_10x_tarball(barnyard, sample="matrices")


def tarball_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as source:
        return {member.name: source.extractfile(member).read() for member in source}


def tarball_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            add_member(archive, name, payload)
    return path


def write_mtx(path: Path, matrix) -> None:
    """A Matrix Market file of ``matrix`` as it is (rows as rows), gzipped where the name ends in .gz."""
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, sp.coo_matrix(matrix), field="integer")
    path.write_bytes(gzip.compress(buffer.getvalue()) if path.name.endswith(".gz") else buffer.getvalue())


@pytest.mark.parametrize("suffix", ["", ".gz"])  # kb-python gzips its output where asked (--gzip)
def test_kallisto_bustools_folders_are_read(tmp_path, small_cells, caplog, suffix):
    """kb count's counts_unfiltered/: a row per cell, gene ids in one list and their names in another."""
    ids = [f"ENSG{i:011d}" for i in range(small_cells.n_vars)]
    folder = tmp_path / "kb_out" / "counts_unfiltered"
    folder.mkdir(parents=True)
    write_mtx(folder / f"cells_x_genes.mtx{suffix}", small_cells.X)
    for name, lines in (("barcodes", small_cells.obs_names), ("genes", ids), ("genes.names", small_cells.var_names)):
        text = "".join(f"{line}\n" for line in lines).encode()
        (folder / f"cells_x_genes.{name}.txt{suffix}").write_bytes(gzip.compress(text) if suffix else text)
    (tmp_path / "kb_out" / "run_info.json").write_text("{}")
    pack_10x_folder(tmp_path / "kb_out", tmp_path / "kb.tar.gz")
    with caplog.at_level(logging.WARNING):
        adata = read_10x_tarball(tmp_path / "kb.tar.gz")
    assert "read transposed" not in caplog.text  # a row per cell is kb's own layout
    assert list(adata.obs_names) == list(small_cells.obs_names) and list(adata.var_names) == list(small_cells.var_names)
    assert list(adata.var["gene_ids"]) == ids and (adata.X != small_cells.X).nnz == 0
    # A names list that does not fit the ids is refused.
    names_file = folder / f"cells_x_genes.genes.names.txt{suffix}"
    short = "".join(f"{name}\n" for name in small_cells.var_names[1:]).encode()
    names_file.write_bytes(gzip.compress(short) if suffix else short)
    pack_10x_folder(tmp_path / "kb_out", tmp_path / "short.tar.gz")
    with pytest.raises(InputError, match=f"short.tar.gz: kb_out/counts_unfiltered/ lists {small_cells.n_vars} genes but "
                                         f"{small_cells.n_vars - 1} gene names"):
        read_10x_tarball(tmp_path / "short.tar.gz")
    # Without the names list (kb-python before 0.28), the ids name the genes.
    names_file.unlink()
    pack_10x_folder(tmp_path / "kb_out", tmp_path / "ids.tar.gz")
    assert list(read_10x_tarball(tmp_path / "ids.tar.gz").var_names) == ids
    # The nac workflow's three matrices (one per RNA species) are not one cell's whole counts: refused saying so.
    for species in ("mature", "nascent", "ambiguous"):
        (folder / f"cells_x_genes.mtx{suffix}").rename(folder / f"cells_x_genes.{species}.mtx{suffix}")
        write_mtx(folder / f"cells_x_genes.mtx{suffix}", small_cells.X)
    (folder / f"cells_x_genes.mtx{suffix}").unlink()
    with pytest.raises(InputError, match=r"kb_out: holds no matrix named as .*; its Matrix Market files "
                                         r"\(counts_unfiltered/cells_x_genes\.\w+\.mtx.*kb count's nac"):
        pack_10x_folder(tmp_path / "kb_out", tmp_path / "nac.tar.gz")
    # alevin-fry's folder, whose gene list is that of each RNA species in turn in USA mode: pointed to its loader.
    fry = tmp_path / "fry_out" / "alevin"
    fry.mkdir(parents=True)
    write_mtx(fry / "quants_mat.mtx", small_cells.X)
    with pytest.raises(InputError, match=r"\(alevin/quants_mat.mtx\) are named otherwise: .* pyroe.load_fry"):
        pack_10x_folder(tmp_path / "fry_out", tmp_path / "fry.tar.gz")
    # One sample's matrix under names of its own, as some GEO uploads have it: told how to name its files, and read
    # once they are so named.
    geo = tmp_path / "geo"
    geo.mkdir()
    write_mtx(geo / "GSE1_counts.mtx.gz", small_cells.X.T)
    for name, lines in (("GSE1_genes.tsv.gz", [f"{gene}\t{gene}" for gene in small_cells.var_names]),
                        ("GSE1_cells.tsv.gz", list(small_cells.obs_names))):
        (geo / name).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(InputError, match=r"\(GSE1_counts.mtx.gz\) are named otherwise: .* is read once its files are "
                                         r"named as Cell Ranger names them: <prefix>matrix.mtx.gz"):
        pack_10x_folder(geo, tmp_path / "geo.tar.gz")
    for old_name, new_name in (("counts.mtx", "matrix.mtx"), ("genes.tsv", "features.tsv"),
                               ("cells.tsv", "barcodes.tsv")):
        (geo / f"GSE1_{old_name}.gz").rename(geo / f"GSE1_{new_name}.gz")
    pack_10x_folder(geo, tmp_path / "geo.tar.gz")
    renamed = read_10x_tarball(tmp_path / "geo.tar.gz")
    assert list(renamed.obs_names) == list(small_cells.obs_names) and (renamed.X != small_cells.X).nnz == 0


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_a_matrix_folder_is_read_in_place_as_its_packed_tarball_is(tmp_path, small_cells, suffix):
    """As `cvaesim evaluate` reads a folder of simulated cells; a dataset's folder is packed by its download."""
    folder = tmp_path / "outs" / "filtered_feature_bc_matrix"
    folder.mkdir(parents=True)
    write_mtx(folder / f"matrix.mtx{suffix}", small_cells.X.T)
    features = [f"ENSG{i:011d}\t{gene}\tGene Expression" for i, gene in enumerate(small_cells.var_names)]
    for name, lines in (("features.tsv", features), ("barcodes.tsv", small_cells.obs_names)):
        text = "".join(f"{line}\n" for line in lines).encode()
        (folder / f"{name}{suffix}").write_bytes(gzip.compress(text) if suffix else text)
    (tmp_path / "outs" / "web_summary.html").write_text("<html></html>")
    pack_10x_folder(tmp_path / "outs", tmp_path / "packed.tar.gz")
    packed, in_place = read_10x_tarball(tmp_path / "packed.tar.gz"), read_10x_tarball(tmp_path / "outs")
    assert in_place.obs_names.equals(packed.obs_names) and in_place.var.equals(packed.var)
    assert (in_place.X != packed.X).nnz == 0 and (in_place.X != small_cells.X).nnz == 0
    assert list(in_place.var_names) == list(small_cells.var_names)
    # What is refused is named by the folder.
    text = "".join(f"{barcode}\n" for barcode in small_cells.obs_names[1:]).encode()
    (folder / f"barcodes.tsv{suffix}").write_bytes(gzip.compress(text) if suffix else text)
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'outs'))}: matrix.mtx{suffix} is "
                                         f"{small_cells.n_vars} genes x {small_cells.n_obs} cells but its lists name "
                                         f"{small_cells.n_vars} genes and {small_cells.n_obs - 1} barcodes"):
        read_10x_tarball(tmp_path / "outs")
    if suffix:  # a gzip file cut off, as an interrupted copy leaves it
        (folder / "barcodes.tsv.gz").write_bytes(gzip.compress(text)[:-12])
        with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'outs'))}: a file in it is truncated or "
                                             f"corrupt"):
            read_10x_tarball(tmp_path / "outs")


def test_parse_biosciences_folders_are_read(tmp_path, small_cells):
    """split-pipe's output: DGE_filtered/ and DGE_unfiltered/ folders per sample and for all of them, each matrix
    a row per cell, with CSV tables of the cells and the genes (their genome beside them)."""
    genomes = np.where(np.arange(small_cells.n_vars) < 30, "hg38", "mm39")
    halves = {"sample1": small_cells[:60], "sample2": small_cells[60:], "all-sample": small_cells}
    for (sample, cells), kind in itertools.product(halves.items(), ("filtered", "unfiltered")):
        folder = tmp_path / "split_pipe" / sample / f"DGE_{kind}"
        folder.mkdir(parents=True)
        write_mtx(folder / "DGE.mtx", cells.X)
        pd.DataFrame({"gene_id": [f"G{i}" for i in range(cells.n_vars)], "gene_name": cells.var_names,
                      "genome": genomes}).to_csv(folder / "all_genes.csv", index=False)
        pd.DataFrame({"bc_wells": cells.obs_names, "sample": sample, "species": "hg38",
                      "gene_count": 1}).to_csv(folder / "cell_metadata.csv", index=False)
    with pytest.raises(InputError, match=r"more than one matrix folder or sample \(all-sample/DGE_filtered, "
                                         r"all-sample/DGE_unfiltered, sample1/DGE_filtered, .*\)"):
        pack_10x_folder(tmp_path / "split_pipe", tmp_path / "parse.tar.gz")
    # Each sample's folder holds a filtered and an unfiltered matrix: the sample key names the folders in turn.
    with pytest.raises(InputError, match=r"more than one matrix is named by sample 'sample2' \(it holds .*\); give "
                                         r"the sample's file-name prefix, its folder's name or its folders' path"):
        pack_10x_folder(tmp_path / "split_pipe", tmp_path / "parse.tar.gz", sample="sample2")
    pack_10x_folder(tmp_path / "split_pipe", tmp_path / "parse.tar.gz", sample="sample2/DGE_filtered")
    adata = read_10x_tarball(tmp_path / "parse.tar.gz", sample="sample2/DGE_filtered")
    assert list(adata.obs_names) == list(small_cells.obs_names[60:])
    assert list(adata.var_names) == list(small_cells.var_names) and (adata.X != small_cells[60:].X).nnz == 0
    assert list(adata.var["gene_ids"][:2]) == ["G0", "G1"] and list(adata.var["genome"]) == list(genomes)
    # split-pipe 1.1 names the matrix count_matrix.mtx, which ends as Cell Ranger's matrix.mtx; GEO's uploads prefix
    # each condition's files and gzip them.
    geo = tmp_path / "geo"
    geo.mkdir()
    for condition, cells in (("NAP", small_cells[:60]), ("HAP", small_cells[60:])):
        for name in ("DGE.mtx", "all_genes.csv", "cell_metadata.csv"):
            (geo / f"{condition}_{name.replace('DGE', 'count_matrix')}.gz").write_bytes(
                gzip.compress((tmp_path / "split_pipe" / ("sample1" if condition == "NAP" else "sample2") /
                               "DGE_filtered" / name).read_bytes()))
    with pytest.raises(InputError, match=r"more than one matrix folder or sample \(HAP_count_matrix.mtx, "
                                         r"NAP_count_matrix.mtx\)"):
        pack_10x_folder(geo, tmp_path / "geo.tar.gz")
    pack_10x_folder(geo, tmp_path / "geo.tar.gz", sample="HAP")
    assert list(read_10x_tarball(tmp_path / "geo.tar.gz").obs_names) == list(small_cells.obs_names[60:])


def test_hand_made_matrix_folders_that_do_not_fit_their_lists_say_why(tmp_path, small_cells, caplog):
    """A matrix written cells x genes (as scipy.io.mmwrite of an AnnData's X, or Parse's DGE.mtx) is read
    transposed where only that fits its lists; lists written with a header line (R's write.table by default) are
    read without it, and another extra line is refused saying it may be a header."""
    cells = small_cells[:10, :7].copy()
    members = tarball_members(write_tarball(tmp_path / "m.tar.gz", cells))
    transposed = tarball_members(write_tarball(tmp_path / "t.tar.gz", ad.AnnData(X=sp.csr_matrix(cells.X).T)))
    matrix = "filtered_matrices_mex/hg19/matrix.mtx"
    with caplog.at_level(logging.WARNING):
        read = read_10x_tarball(tarball_of(tmp_path / "transposed.tar.gz", {**members, matrix: transposed[matrix]}))
    assert (read.X != cells.X).nnz == 0 and list(read.obs_names) == list(cells.obs_names)
    assert "matrix.mtx has a row per cell (Cell Ranger's has a row per gene): read transposed" in caplog.text
    genes, barcodes = "filtered_matrices_mex/hg19/genes.tsv", "filtered_matrices_mex/hg19/barcodes.tsv"
    caplog.clear()
    for gene_header, barcode_header in ((b"gene_id\tgene_name\tfeature_type\n", b"x\n"),  # write.table's defaults
                                        (b'"gene_ids"\t"gene_symbols"\n', b'"Barcode"\n')):  # quoted, shorter
        headed = {**members, genes: gene_header + members[genes], barcodes: barcode_header + members[barcodes]}
        with caplog.at_level(logging.WARNING):
            read = read_10x_tarball(tarball_of(tmp_path / "headed.tar.gz", headed))
        assert (read.X != cells.X).nnz == 0 and list(read.obs_names) == list(cells.obs_names)
        assert list(read.var_names) == list(cells.var_names)
    assert caplog.text.count("read as a header line and skipped") == 4 and "barcodes.tsv: its first line ('x')" in caplog.text
    with pytest.raises(InputError, match=r"the gene and barcode lists have one line too many: a header line\?"):
        headed = {**members, genes: b"Accession\tSymbol\tType\n" + members[genes], barcodes: b"cell barcode\n" + members[barcodes]}
        read_10x_tarball(tarball_of(tmp_path / "headed.tar.gz", headed))  # header words not recognised: refused
    with pytest.raises(InputError, match=r"lists name 7 genes and 12 barcodes$"):  # no guess for other differences
        read_10x_tarball(tarball_of(tmp_path / "other.tar.gz", {**members, barcodes: members[barcodes] + b"A\nB\n"}))
    gene_lines = members[genes].split(b"\n")
    gene_lines[3] += b"\tGene Expression"  # a row longer than those above it
    ragged = {**members, genes: b"\n".join(gene_lines)}
    with pytest.raises(InputError, match=r"ragged.tar.gz: the gene list in filtered_matrices_mex/hg19/ could not"):
        read_10x_tarball(tarball_of(tmp_path / "ragged.tar.gz", ragged))
    with pytest.raises(InputError, match=r"empty.tar.gz: the barcode list in filtered_matrices_mex/hg19/ is empty"):
        read_10x_tarball(tarball_of(tmp_path / "empty.tar.gz", {**members, barcodes: b""}))


def test_annotations_after_comment_lines_are_read(tmp_path):
    # BD Rhapsody's Sample_Tag_Calls.csv opens with '##' lines; a '#' within a label is kept.
    path = tmp_path / "Sample_Tag_Calls.csv"
    path.write_text("##########\n## BD Rhapsody Sequence Analysis Pipeline Version 1.10\n##########\n"
                    "Cell_Index,Sample_Tag,Sample_Name\n1234,SampleTag01_hs,Donor #1\n5678,Multiplet,Multiplet\n")
    labels = read_annotation(path, "Cell_Index", "Sample_Name")
    assert labels.to_dict() == {"1234": "Donor #1", "5678": "Multiplet"}


def test_a_matrix_or_other_file_given_as_the_annotation_is_named(tmp_path):
    # Swapped sources are told at download (container_problem) and again when read.
    with pytest.raises(InputError, match=r"counts.h5ad: not a table of barcodes and cell types, as an annotation "
                                         r"is; it is an AnnData .h5ad file \(are the matrix and annotation sources "
                                         r"swapped\?\)"):
        read_annotation(EMBEDDED_H5AD, "barcodes", "celltype")
    assert container_problem(EMBEDDED_TARBALL, "annotation.tsv").endswith(
        "it is gzip-compressed, as a 10x tarball is (are the matrix and annotation sources swapped?)")
    page = tmp_path / "page.tsv"
    page.write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>\n")
    assert container_problem(page, "annotation.tsv").endswith("it is a web page, not data (a server's error or "
                                                               "sign-in page?)")
    assert container_problem(EMBEDDED_ANNOTATION, "annotation.tsv") is None


def test_annotation_errors_name_the_file_and_columns(tmp_path):
    path = tmp_path / "annotation.tsv"
    path.write_text("barcodes\tlabel\nA-1\tT\n")
    with pytest.raises(InputError, match=r"annotation.tsv: no column 'celltype'; the columns are 'barcodes', 'label'$"):
        read_annotation(path, "barcodes", "celltype")
    path.write_text("Barcode\tCellType\nA-1\tT\n")
    with pytest.raises(InputError, match=r"no column 'barcodes', 'celltype'; the columns are 'Barcode', 'CellType' "
                                         r"\(did you mean 'Barcode' and 'CellType'\?\)"):
        read_annotation(path, "barcodes", "celltype")
    # Without a header line: a barcode and its label on each line (Seurat's write.table of Idents, col.names FALSE).
    for text in ("AAACATACAACCAC-1\tCD8 T\nAAACATTGAGCTAC-1\tB\n", "ctrl_AAACATACAACCAC-1,CD8 T\nctrl_AAACATTGAGCTAC-1,B\n"):
        path.write_text(text)
        headerless = read_annotation(path, "barcodes", "celltype")
        assert headerless.index.str.endswith(("AAACATACAACCAC-1", "AAACATTGAGCTAC-1")).all()
        assert headerless.tolist() == ["CD8 T", "B"]
    path.write_text("cell_1\tT\ncell_2\tB\n")  # names that are no barcodes: the first line may be a header
    with pytest.raises(InputError, match=r"no column 'barcodes', 'celltype'; the columns are 'cell_1', 'T'"):
        read_annotation(path, "barcodes", "celltype")
    for text, what in (("", "an empty file"), ("\n\n", "blank lines only")):
        path.write_text(text)
        with pytest.raises(InputError, match=rf"annotation.tsv: holds no table \({what}\); a header line naming its "
                                             r"columns \('barcodes', 'celltype'\) should open it"):
            read_annotation(path, "barcodes", "celltype")
    path.write_text("barcodes\tcelltype\nA-1\tT\nA-1\tB\n")
    with pytest.raises(InputError, match="appear more than once.*'A-1'"):
        read_annotation(path, "barcodes", "celltype")
    csv = tmp_path / "annotation.csv"
    csv.write_text("barcodes,celltype\nA-1,T cell\nB-1,\n")
    labels = read_annotation(csv, "barcodes", "celltype")
    assert labels["A-1"] == "T cell" and pd.isna(labels["B-1"])
    # As users export them: semicolons (spreadsheets in many locales), gzipped, or both.
    semicolons = tmp_path / "semicolons.tsv"
    semicolons.write_text("barcodes;celltype\nA-1;T cell\nB-1;\n")
    zipped = tmp_path / "zipped.tsv"
    zipped.write_bytes(gzip.compress(csv.read_bytes()))
    for table in (semicolons, zipped):
        assert read_annotation(table, "barcodes", "celltype").equals(labels)
    padded = tmp_path / "padded.csv"  # as spreadsheets export them: spaces after commas, a byte-order mark, CRLF
    padded.write_bytes("\ufeffbarcodes, celltype\r\nA-1 , T cell\r\nB-1,\r\n".encode())
    assert read_annotation(padded, "barcodes", "celltype").index.tolist() == ["A-1", "B-1"]
    unicode_text = tmp_path / "unicode.txt"  # Excel's "Unicode Text" export: UTF-16 with a byte-order mark
    unicode_text.write_bytes("barcodes\tcelltype\r\nA-1\tT cell\r\nB-1\t\r\n".encode("utf-16"))
    assert read_annotation(unicode_text, "barcodes", "celltype").equals(labels)
    windows = tmp_path / "windows.csv"  # Excel's CSV on Windows: Windows-1252, not UTF-8 (was refused)
    windows.write_bytes("barcodes,celltype\r\nA-1,Naïve T cell\r\nB-1,\r\n".encode("cp1252"))
    windows_labels = read_annotation(windows, "barcodes", "celltype")
    assert windows_labels["A-1"] == "Naïve T cell" and pd.isna(windows_labels["B-1"])
    windows.write_bytes(b"barcodes,celltype\nA-1,T\x81\n")  # 0x81: neither UTF-8 nor Windows-1252
    with pytest.raises(InputError, match="windows.csv: text in none of the encodings utf-8, cp1252"):
        read_annotation(windows, "barcodes", "celltype")
    workbook = tmp_path / "annotation.xlsx"  # a workbook is a zip archive; so is a zipped table
    with zipfile.ZipFile(workbook, "w") as archive:
        archive.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    with pytest.raises(InputError, match=r"annotation.xlsx: a zip archive \(as an Excel .xlsx workbook is\), not a "
                                         r"table; save the table as tab- or comma-separated text"):
        read_annotation(workbook, "barcodes", "celltype")
    # Row names as the barcodes: R's write.csv and pandas' to_csv leave the first header empty, R's write.table
    # leaves it out; read when the table has no barcode column (were refused: "no column 'barcodes'").
    for name, text in (("r.csv", '"","celltype","nCount_RNA"\n"A-1","T cell",100\n"B-1","",20\n'),
                       ("pandas.csv", ",celltype\nA-1,T cell\nB-1,\n"),
                       # obs.to_csv() of an .h5ad whose cell names anndata calls 'index', as scanpy's datasets do
                       ("anndata.csv", "index,celltype\nA-1,T cell\nB-1,\n"),
                       ("r.tsv", "celltype\tnCount_RNA\nA-1\tT cell\t100\nB-1\t\t20\n")):
        (tmp_path / name).write_text(text)
        assert read_annotation(tmp_path / name, "barcodes", "celltype").equals(labels), name
    # A named barcode column is read where there is one.
    (tmp_path / "both.csv").write_text(",barcodes,celltype\n0,A-1,T cell\n1,B-1,\n")
    assert read_annotation(tmp_path / "both.csv", "barcodes", "celltype").equals(labels)
    zipped.write_bytes(gzip.compress(csv.read_bytes())[:20])
    with pytest.raises(InputError, match="zipped.tsv: could not be read as a table"):
        read_annotation(zipped, "barcodes", "celltype")


@pytest.mark.parametrize("strings", ["fixed", "variable"])
def test_loom_files_are_read_as_their_cells_genes_and_labels(tmp_path, small_cells, strings):
    loom = write_loom(tmp_path / "cells.loom", small_cells, strings=strings)
    read = read_loom_counts(loom, "ClusterName", None)
    assert (read.X != small_cells.X).nnz == 0 and read.X.dtype == np.int32
    assert list(read.obs_names) == list(small_cells.obs_names) and list(read.var_names) == list(small_cells.var_names)
    assert list(read.var["gene_ids"]) == [f"ENSG{j:011d}" for j in range(small_cells.n_vars)]
    assert list(read.obs["cell_type"]) == list(small_cells.obs["cell_type"])
    unlabelled = read_loom_counts(loom, None, None)  # labelled by an annotation table instead
    assert list(unlabelled.obs.columns) == [] and (unlabelled.X != small_cells.X).nnz == 0


def test_loom_layers_labels_and_names_are_checked(tmp_path, small_cells, caplog, monkeypatch):
    counts = small_cells.X.toarray()
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4
    # A matrix read in several blocks of genes, as a large loom file is.
    velocyto = write_loom(tmp_path / "velocyto.loom", small_cells, layers={"spliced": counts, "unspliced": counts * 2})
    monkeypatch.setattr(cvaesim.io, "LOOM_BLOCK_ENTRIES", 7 * small_cells.n_obs)
    with caplog.at_level(logging.WARNING):
        read = read_loom_counts(velocyto, "ClusterName", "unspliced")
        assert (read.X != small_cells.X * 2).nnz == 0
        assert "velocyto" not in caplog.text  # a layer was named
        read_loom_counts(velocyto, "ClusterName", None)
    assert "a velocyto loom, whose main matrix holds the spliced counts only" in caplog.text
    with pytest.raises(InputError, match=r"velocyto.loom: no layer 'unspliced_counts'; its layers are 'spliced', "
                                         r"'unspliced'"):
        read_loom_counts(velocyto, "ClusterName", "unspliced_counts")
    with pytest.raises(InputError, match=r"velocyto.loom: col_attrs has no label column 'clustername'; its columns "
                                         r"are 'ClusterName', 'nUMI' \(did you mean 'ClusterName'\?\)"):
        read_loom_counts(velocyto, "clustername", None)
    normalised_loom = write_loom(tmp_path / "normalised.loom", ad.AnnData(sp.csr_matrix(normalised),
                                                                          obs=small_cells.obs, var=small_cells.var),
                                 layers={"counts": counts})
    with pytest.raises(InputError, match=r"normalised.loom: X holds .*; raw counts are needed; 'counts' of this file "
                                         r"holds integer counts: name it as the dataset.s counts_layer"):
        read_loom_counts(normalised_loom, "ClusterName", None)
    assert (read_loom_counts(normalised_loom, "ClusterName", "counts").X != small_cells.X).nnz == 0
    nameless = write_loom(tmp_path / "nameless.loom", small_cells)
    with h5py.File(nameless, "r+") as loom:
        del loom["col_attrs"]["CellID"]
    with pytest.raises(InputError, match=r"nameless.loom: no column attribute names the cells \(looked for CellID, "
                                         r".*; its column attributes are 'ClusterName', 'nUMI'\)"):
        read_loom_counts(nameless, "ClusterName", None)
    # Given as another HDF5 format, the error says it is a loom file.
    with pytest.raises(InputError, match=r"cells.loom: not a readable .h5ad file .*; it is a loom file, so the "
                                         r"dataset's format \(or evaluate's --format\) may be loom"):
        read_h5ad_counts(write_loom(tmp_path / "cells.loom", small_cells), "cell_type", None)
    assert container_problem(tmp_path / "cells.loom", "matrix.loom") is None
    (tmp_path / "cut.loom").write_bytes((tmp_path / "cells.loom").read_bytes()[:2000])
    assert "not a readable HDF5 file, as matrix.loom must be" in container_problem(tmp_path / "cut.loom", "matrix.loom")


def test_h5ad_must_hold_counts(tmp_path, small_cells):
    logged = small_cells.copy()
    logged.X = sp.csr_matrix(np.log1p(small_cells.X.toarray()))
    logged.layers["counts"] = small_cells.X.copy()
    path = tmp_path / "logged.h5ad"
    logged.write_h5ad(path)
    # The usual scanpy file: log-normalised X, counts kept in a layer; the error says which one.
    with pytest.raises(InputError, match="logged.h5ad: X holds non-integer values .*; 'counts' of this file holds "
                                         "integer counts: name it as the dataset.s counts_layer"):
        read_h5ad_counts(path, "cell_type", None)
    adata = read_h5ad_counts(path, "cell_type", "counts")
    assert adata.X.dtype == np.int32 and adata.shape == small_cells.shape
    # Names close to an existing one are suggested.
    with pytest.raises(InputError, match=r"logged.h5ad: obs has no label column 'celltype'; its columns are "
                                         r"'cell_type' \(did you mean 'cell_type'\?\)"):
        read_h5ad_counts(path, "celltype", "counts")
    with pytest.raises(InputError, match="no layer 'spliced'; its layers are 'counts'$"):
        read_h5ad_counts(path, "cell_type", "spliced")
    with pytest.raises(InputError, match=r"no layer 'Counts'; its layers are 'counts' \(did you mean 'counts'\?\)"):
        read_h5ad_counts(path, "cell_type", "Counts")
    # Counts only in .raw (as in CELLxGENE files, whose genes are Ensembl ids with the symbols beside them; the
    # gene annotation goes along), and a file with no counts anywhere.
    counts = small_cells.copy()
    counts.var["feature_name"] = [f"SYMBOL{j}" for j in range(counts.n_vars)]
    logged.raw = counts
    del logged.layers["counts"]
    logged.write_h5ad(path)
    with pytest.raises(InputError, match="X holds non-integer values .*; 'raw' of this file holds integer counts"):
        read_h5ad_counts(path, "cell_type", None)
    from_raw = read_h5ad_counts(path, "cell_type", "raw")
    assert (from_raw.X != small_cells.X).nnz == 0 and from_raw.var.equals(counts.var)
    logged.raw = None
    logged.write_h5ad(path)
    with pytest.raises(InputError, match=r"X holds non-integer values .*; raw counts are needed \(counts_layer names"):
        read_h5ad_counts(path, "cell_type", None)


def test_a_value_just_off_a_whole_number_is_shown_as_it_is():
    # Rounded to a few digits, 2.0000002 read "non-integer values (e.g. 2)".
    nearly = sp.csr_matrix(np.array([[2.0000002, 1.0]], dtype=np.float32))
    assert counts_problem(nearly).startswith("non-integer values (e.g. 2.0000002)")


@pytest.mark.parametrize("container", ["h5ad", "h5", "tarball"])
def test_expected_counts_are_rounded_when_asked(tmp_path, small_cells, container, caplog):
    # As SoupX leaves a matrix: each count less a fractional share of ambient RNA.
    expected = sp.csr_matrix(small_cells.X, dtype=np.float32)
    expected.data -= np.random.default_rng(0).uniform(0, 0.8, expected.nnz).astype(np.float32)
    corrected = small_cells.copy()
    corrected.X = expected
    path = tmp_path / f"soup.{container}"
    if container == "h5ad":
        corrected.write_h5ad(path)

        def read(rounding):
            return read_h5ad_counts(path, "cell_type", None, rounding)
    else:
        (write_10x_h5 if container == "h5" else write_tarball)(path, corrected)

        def read(rounding):
            return (read_10x_h5 if container == "h5" else read_10x_tarball)(path, rounding)
    with pytest.raises(InputError, match=f"soup.{container}: .*non-integer values .*round_counts: true"):
        read(False)
    with caplog.at_level(logging.WARNING):
        adata = read(True)
    nearest = np.round(expected.toarray())
    assert adata.X.dtype == np.int32 and np.array_equal(adata.X.toarray(), nearest)
    assert adata.X.nnz == np.count_nonzero(nearest) < expected.nnz  # values rounded to 0 are not stored
    assert f"{expected.nnz} of {expected.nnz} stored values were not whole numbers and were rounded" in caplog.text
    assert list(adata.obs_names) == list(small_cells.obs_names)


def test_normalised_data_are_not_rounded_into_counts(tmp_path, small_cells):
    counts = small_cells.X.toarray().astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0)  # normalize_total
    for values, told in ((normalised, r"all sum to 10000, as normalised data do"),
                         (np.log1p(normalised), r"all sum to 10000 after expm1 \(log-normalised\)"),
                         (np.log2(normalised * 100 + 1), r"all sum to 1e\+06 after 2\^x - 1 \(log2-transformed, "
                                                          r"as log2\(TPM \+ 1\) is\)")):
        path = tmp_path / "normalised.h5ad"
        ad.AnnData(X=sp.csr_matrix(values.astype(np.float32)), obs=small_cells.obs).write_h5ad(path)
        with pytest.raises(InputError, match=f"normalised.h5ad: X holds non-integer values whose cells {told}"):
            read_h5ad_counts(path, "cell_type", None, round_counts=True)
    assert counts_problem(-np.eye(3) / 2, round_counts=True).startswith("negative values")
    assert counts_problem(np.full((2, 2), np.nan), round_counts=True) == "NaN or infinite values"


def test_h5ad_without_x_names_the_layer_holding_counts(tmp_path, small_cells):
    layered = ad.AnnData(obs=small_cells.obs, var=small_cells.var, layers={"counts": small_cells.X})
    path = tmp_path / "layers_only.h5ad"
    layered.write_h5ad(path)
    with pytest.raises(InputError, match="layers_only.h5ad: X holds no matrix at all .*'counts' of this file holds "
                                         "integer counts"):
        read_h5ad_counts(path, "cell_type", None)
    assert (read_h5ad_counts(path, "cell_type", "counts").X != small_cells.X).nnz == 0


def test_h5ad_of_cite_seq_keeps_its_gene_expression_features(tmp_path, small_cells, caplog):
    # As scanpy's read_10x_h5(gex_only=False) keeps a CITE-seq run: antibody counts beside the genes, typed in var.
    cite = small_cells.copy()
    cite.var["feature_types"] = ["Gene Expression"] * 45 + ["Antibody Capture"] * 5
    path = tmp_path / "cite.h5ad"
    cite.write_h5ad(path)
    with caplog.at_level(logging.INFO):
        adata = read_h5ad_counts(path, "cell_type", None)
    assert list(adata.var_names) == list(small_cells.var_names[:45])
    assert (adata.X != small_cells.X[:, :45]).nnz == 0
    assert "cite.h5ad: keeping the 45 Gene Expression features of 50 (dropped: Antibody Capture)" in caplog.text
    # A column of that name holding something else (no Gene Expression at all) leaves every gene in.
    cite.var["feature_types"] = "protein_coding"
    cite.write_h5ad(path)
    assert read_h5ad_counts(path, "cell_type", None).n_vars == 50


def test_h5ad_of_genes_x_cells_is_told_to_be_transposed(tmp_path, small_cells):
    # As an AnnData built from a genes x cells table or written from R may hold its cells: as variables.
    transposed = small_cells.T.copy()
    path = tmp_path / "genes_x_cells.h5ad"
    transposed.write_h5ad(path)
    with pytest.raises(InputError, match=r"genes_x_cells.h5ad: 'cell_type' is a column of var, not of obs, so the "
                                         r"file holds a cell in each column: write it transposed \(adata.T\)"):
        read_h5ad_counts(path, "cell_type", None)
    # Labelled by an annotation of its cells' barcodes instead: the annotation's error says the same.
    labels = small_cells.obs["cell_type"]
    with pytest.raises(InputError, match=r"a.tsv: none of its 120 labelled barcodes is in genes_x_cells.h5ad .*; "
                                         r"its genes \(var_names\) are named by these barcodes, so the file holds a "
                                         r"cell in each column: write it transposed \(adata.T\)"):
        attach_labels(read_h5ad_counts(path, None, None), labels, "genes_x_cells.h5ad", "a.tsv")


def test_h5ad_cell_names_repeated_across_concatenated_parts_are_made_unique(tmp_path, small_cells, caplog):
    joined = ad.concat([small_cells[:60], small_cells[60:]])
    joined.obs_names = list(small_cells.obs_names[:60]) * 2  # two samples with the same barcodes
    path = tmp_path / "joined.h5ad"
    joined.write_h5ad(path)
    with caplog.at_level(logging.WARNING):
        adata = read_h5ad_counts(path, "cell_type", None)
    assert adata.obs_names.is_unique and adata.n_obs == small_cells.n_obs
    assert (adata.X != small_cells.X).nnz == 0
    assert list(adata.obs["cell_type"]) == list(small_cells.obs["cell_type"])
    assert "joined.h5ad: 60 cell names (obs_names) occur more than once" in caplog.text


def test_h5ad_gene_names_repeated_are_suffixed_and_said(tmp_path, small_cells, caplog):
    repeated = small_cells.copy()
    names = list(repeated.var_names)
    names[1] = names[0]  # gene symbols standing in for ids repeat in many published .h5ad files
    repeated.var_names = names
    path = tmp_path / "repeated.h5ad"
    repeated.write_h5ad(path)
    with caplog.at_level(logging.INFO):
        adata = read_h5ad_counts(path, "cell_type", None)
    assert adata.var_names.is_unique and adata.var_names[1] == f"{names[0]}-1"
    assert (adata.X != small_cells.X).nnz == 0
    assert f"repeated.h5ad: gene names not unique (1 repeats, e.g. {names[0]!r})" in caplog.text


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.h5ad"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as temporary:
        temporary.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_atomic_output_of_a_folder_replaces_the_old_one_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "cells_10x"
    for content in ("first", "second"):
        with atomic_output(target) as temporary:
            temporary.mkdir()
            (temporary / "matrix.mtx.gz").write_text(content)
    assert (target / "matrix.mtx.gz").read_text() == "second" and list(tmp_path.iterdir()) == [target]
    # A writer failing half-way through a folder: its own error, the old folder kept, no temporary left.
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_output(target) as temporary:
            temporary.mkdir()
            (temporary / "matrix.mtx.gz").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "matrix.mtx.gz").read_text() == "second" and list(tmp_path.iterdir()) == [target]
    # The new folder failing to take the old one's place (after the old was moved aside): the old one back.
    rename = Path.replace

    def failing_for_the_new_folder(self, target_path):
        if self.name.startswith(".tmp"):
            raise OSError("no space left on device")
        return rename(self, target_path)

    monkeypatch.setattr(Path, "replace", failing_for_the_new_folder)
    with pytest.raises(OSError, match="no space left"):
        with atomic_output(target) as temporary:
            temporary.mkdir()
            (temporary / "matrix.mtx.gz").write_text("third")
    assert (target / "matrix.mtx.gz").read_text() == "second" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("v3", [False, True])
def test_10x_h5_reads_as_the_same_matrix_in_a_tarball(tmp_path, v3):
    cells = read_10x_tarball(EMBEDDED_TARBALL)
    adata = read_10x_h5(write_10x_h5(tmp_path / "m.h5", cells, v3=v3))
    assert adata.X.dtype == np.int32 and (adata.X != cells.X).nnz == 0
    assert list(adata.obs_names) == list(cells.obs_names) and list(adata.var_names) == list(cells.var_names)
    assert adata.var["gene_ids"].iloc[0] == "ENSG00000000000"


@pytest.mark.parametrize("container", ["h5", "tarball"])
def test_cite_seq_matrices_keep_gene_expression_features_only(tmp_path, small_cells, container, caplog):
    if container == "h5":
        path = write_10x_h5(tmp_path / "m.h5", small_cells, antibodies=3)
        read = read_10x_h5
    else:
        path = write_tarball(tmp_path / "m.tar.gz", small_cells, v3=True, antibodies=3)
        read = read_10x_tarball
    with caplog.at_level("INFO"):
        adata = read(path)
    assert list(adata.var_names) == list(small_cells.var_names)
    assert np.array_equal(adata.X.toarray(), small_cells.X.toarray())
    assert f"keeping the {small_cells.n_vars} Gene Expression features of {small_cells.n_vars + 3}" in caplog.text


def test_a_matrix_without_gene_expression_features_is_refused(tmp_path, small_cells):
    source = write_tarball(tmp_path / "m.tar.gz", small_cells, v3=True)
    path = tmp_path / "antibodies_only.tar.gz"
    with tarfile.open(source) as original, tarfile.open(path, "w:gz") as relabelled:
        for member in original.getmembers():
            payload = original.extractfile(member).read()
            if member.name.endswith("features.tsv.gz"):
                payload = gzip.compress(gzip.decompress(payload).replace(b"Gene Expression", b"Antibody Capture"))
            add_member(relabelled, member.name, payload)
    with pytest.raises(InputError, match="antibodies_only.tar.gz: none of its 50 features is of type Gene Expression "
                                         r"\(types: Antibody Capture\)"):
        read_10x_tarball(path)


def test_a_cell_ranger_2_file_of_two_genomes_joins_their_genes(tmp_path, small_cells, caplog):
    """A mixed-species Cell Ranger 2 file lists the same cells under each genome, each with its own genes."""
    human, mouse = small_cells[:, :30].copy(), small_cells[:, 30:].copy()
    path = write_10x_h5(write_10x_h5(tmp_path / "barnyard.h5", human, v3=False, genome="hg19"), mouse, v3=False,
                        genome="mm10")
    with caplog.at_level(logging.INFO, logger="cvaesim.io"):
        joined = read_10x_h5(path)
    assert "genes of 2 genomes joined (hg19: 30, mm10: 20)" in caplog.text
    assert list(joined.obs_names) == list(small_cells.obs_names)
    assert list(joined.var_names) == list(small_cells.var_names)
    assert joined.var["genome"].tolist() == ["hg19"] * 30 + ["mm10"] * 20
    assert (joined.X != small_cells.X).nnz == 0
    single = read_10x_h5(write_10x_h5(tmp_path / "human.h5", human, v3=False))
    assert "genome" not in single.var and (single.X != human.X).nnz == 0
    other_cells = small_cells[::-1, 30:].copy()
    path = write_10x_h5(write_10x_h5(tmp_path / "apart.h5", human, v3=False), other_cells, v3=False, genome="mm10")
    with pytest.raises(InputError, match=r"apart.h5: its genome groups hg19 and mm10 list different cells.*"
                                         r"sc.read_10x_h5\(path, genome='mm10'\)"):
        read_10x_h5(path)



def test_a_cell_ranger_3_file_of_two_genomes_names_each_gene_s_genome(tmp_path, small_cells):
    import h5py

    path = write_10x_h5(tmp_path / "barnyard.h5", small_cells, antibodies=2)
    genomes = ["GRCh38"] * 30 + ["mm10"] * 20 + ["", ""]  # Cell Ranger leaves antibodies' genome blank
    with h5py.File(path, "a") as h5:
        h5["matrix/features/genome"] = np.array(genomes, dtype="S")
    cells = read_10x_h5(path)
    assert cells.n_vars == 50 and cells.var["genome"].tolist() == genomes[:50]
    with h5py.File(path, "a") as h5:
        h5["matrix/features/genome"][...] = np.array(["GRCh38"] * 52, dtype="S")
    assert "genome" not in read_10x_h5(path).var  # one genome: nothing to tell apart

def test_broken_10x_h5_files_are_clear_errors(tmp_path, small_cells):
    import h5py

    whole = write_10x_h5(tmp_path / "whole.h5", small_cells).read_bytes()
    (tmp_path / "truncated.h5").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated.h5: not a readable HDF5 file"):
        read_10x_h5(tmp_path / "truncated.h5")
    write_10x_h5(tmp_path / "wrongshape.h5", small_cells)
    with h5py.File(tmp_path / "wrongshape.h5", "a") as h5:
        h5["matrix/shape"][...] = [small_cells.n_vars, small_cells.n_obs + 1]
    with pytest.raises(InputError, match="wrongshape.h5: the matrix's data, indices and indptr do not fit"):
        read_10x_h5(tmp_path / "wrongshape.h5")
    write_10x_h5(tmp_path / "nobarcodes.h5", small_cells)
    with h5py.File(tmp_path / "nobarcodes.h5", "a") as h5:
        del h5["matrix/barcodes"]
    with pytest.raises(InputError, match="nobarcodes.h5: /matrix has no 'barcodes'"):
        read_10x_h5(tmp_path / "nobarcodes.h5")
    small_cells.X = small_cells.X.astype(np.float32) * 0.5
    with pytest.raises(InputError, match="halves.h5: the count matrix holds non-integer values"):
        read_10x_h5(write_10x_h5(tmp_path / "halves.h5", small_cells))
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5.create_group("mm10"), h5.create_group("hg19")
    with pytest.raises(InputError, match="other.h5: expected a 'matrix' group .* found hg19, mm10"):
        read_10x_h5(tmp_path / "other.h5")


def write_r_table(path: Path, table: pd.DataFrame) -> Path:
    """As R's write.table(table, path) writes it: space-separated, names quoted, no header field above the row
    names."""
    lines = [" ".join(f'"{name}"' for name in table.columns)]
    lines += [f'"{name}" ' + " ".join(map(str, row)) for name, row in zip(table.index, table.to_numpy())]
    path.write_text("\n".join(lines) + "\n")
    return path


COUNT_TABLE_LAYOUTS = {
    # pandas' to_csv (and R's write.csv): genes x cells, an empty header field above the gene names.
    "pandas_csv": lambda table, path: table.to_csv(path),
    # Drop-seq's DGE file: tab-separated, gzipped, 'GENE' above the gene names.
    "dropseq_dge_gz": lambda table, path: table.rename_axis("GENE").to_csv(path, sep="\t", compression="gzip"),
    "r_write_table": lambda table, path: write_r_table(path, table),
    # BD Rhapsody's RSEC_MolsPerCell.csv: comment lines, then cells x genes under 'Cell_Index'.
    "bd_rhapsody": lambda table, path: path.write_text(
        "####################\n## BD Targeted Multiplex Rhapsody Analysis Pipeline Version 1.9\n## Analysis Date - "
        "2021-03-01\n####################\n" + table.T.rename_axis("Cell_Index").to_csv()),
    # The same with the byte-order mark Excel's "CSV UTF-8" starts with (before the first cell's name here).
    "r_write_table_with_bom": lambda table, path: path.write_bytes(
        b"\xef\xbb\xbf" + write_r_table(path, table).read_bytes()),
    # Excel's "Unicode Text": UTF-16 with a byte-order mark, tab-separated.
    "excel_unicode_text": lambda table, path: path.write_bytes(table.to_csv(sep="\t").encode("utf-16")),
    # Cells x genes, semicolon-separated (a spreadsheet's CSV where the comma is the decimal mark).
    "cells_by_genes_semicolon": lambda table, path: table.T.to_csv(path, sep=";"),
    # Every field quoted, the counts too (Python's csv.QUOTE_ALL; was refused: "a value that is not a number").
    "every_field_quoted": lambda table, path: table.to_csv(path, quoting=csv.QUOTE_ALL),
    # Gene ids, then gene names, then the cells.
    "ids_and_names": lambda table, path: table.set_axis([f"ENSG{i:011d}" for i in range(len(table))]).rename_axis(
        "gene_id").set_index(table.index.rename("gene_name"), append=True).to_csv(path, sep="\t"),
}


@pytest.mark.parametrize("layout", COUNT_TABLE_LAYOUTS)
def test_count_tables_are_read_in_the_layouts_tools_write(tmp_path, small_cells, layout):
    genes_by_cells = pd.DataFrame(small_cells.X.toarray().T, index=small_cells.var_names, columns=small_cells.obs_names)
    path = tmp_path / "counts.txt"
    COUNT_TABLE_LAYOUTS[layout](genes_by_cells, path)
    # Annotations without Cell Ranger's GEM suffix still tell which side names the cells.
    for barcodes in (small_cells.obs_names, small_cells.obs_names.str.removesuffix("-1")):
        adata = read_counts_table(path, barcodes)
        assert list(adata.obs_names) == list(small_cells.obs_names)
        assert list(adata.var_names) == list(small_cells.var_names)
        assert adata.X.dtype == np.int32 and (adata.X != small_cells.X).nnz == 0
    assert container_problem(path, "matrix.txt") is None
    assert (list(adata.var["gene_ids"][:2]) == ["ENSG00000000000", "ENSG00000000001"]
            if layout == "ids_and_names" else "gene_ids" not in adata.var)


def test_a_cells_by_genes_table_is_told_by_an_annotation_of_several_samples(tmp_path, small_cells):
    """The annotation of a Seurat merge names this sample's cells 'ctrl_<barcode>', the other's 'stim_<barcode>':
    its barcodes name neither axis as they are, and the tag tells the cells' axis."""
    path = tmp_path / "cells_by_genes.csv"
    pd.DataFrame(small_cells.X.toarray(), index=small_cells.obs_names, columns=small_cells.var_names).to_csv(path)
    annotation = [f"ctrl_{barcode}" for barcode in small_cells.obs_names] + [
        f"stim_{barcode[::-1]}" for barcode in small_cells.obs_names]
    adata = read_counts_table(path, annotation)
    assert list(adata.obs_names) == list(small_cells.obs_names) and (adata.X != small_cells.X).nnz == 0


def test_count_tables_saved_as_windows_1252_are_read(tmp_path, caplog):
    # Excel's CSV on Windows, where a name is not ASCII; a table in no encoding at all is refused.
    path = tmp_path / "windows.csv"
    path.write_bytes("gene,c1,c2\nGENE1,1,0\nCD45RA\u2013Na\u00efve,2,3\n".encode("cp1252"))
    with caplog.at_level(logging.INFO):
        adata = read_counts_table(path, ["c1"])
    assert list(adata.var_names) == ["GENE1", "CD45RA\u2013Na\u00efve"]
    assert adata.X.toarray().tolist() == [[1, 2], [0, 3]]
    assert "not UTF-8; read as Windows-1252" in caplog.text
    path.write_bytes(b"gene,c1,c2\nGENE1,1,0\nGENE\x81,2,3\n")  # 0x81 is no character in Windows-1252 either
    with pytest.raises(InputError, match="windows.csv: text in none of the encodings utf-8, cp1252"):
        read_counts_table(path, ["c1"])


def test_count_table_problems_are_named(tmp_path, small_cells):
    table = pd.DataFrame(small_cells.X.toarray().T, index=small_cells.var_names, columns=small_cells.obs_names)
    barcodes = small_cells.obs_names

    def written(name: str, frame: pd.DataFrame) -> Path:
        frame.to_csv(tmp_path / name)
        return tmp_path / name

    with pytest.raises(InputError, match="normalised.csv: the count matrix holds non-integer values"):
        read_counts_table(written("normalised.csv", table / table.sum() * 1e4), barcodes)
    expected = read_counts_table(written("expected.csv", table + 0.2), barcodes, round_counts=True)
    assert (expected.X != small_cells.X).nnz == 0
    words = table.astype(object)
    words.iloc[5, 3] = "many"
    with pytest.raises(InputError, match=f"words.csv: line 7 holds a value that is not a number \\('many', in "
                                         f"column '{barcodes[3]}'\\)"):
        read_counts_table(written("words.csv", words), barcodes)
    missing = table.astype(float)
    missing.iloc[4, 2] = np.nan  # written as an empty field
    with pytest.raises(InputError, match=f"missing.csv: line 6 holds a value that is not a number \\('', in column "
                                         f"'{barcodes[2]}'\\).* 'NA' or empty"):
        read_counts_table(written("missing.csv", missing), barcodes)
    # Cell types kept as a last column of a cells x genes table: named, with where they belong.
    labelled = table.T.assign(cluster="B cell")
    with pytest.raises(InputError, match="labelled.csv: line 2 .* \\('B cell', in column 'cluster'\\).* cell types "
                                         "and other metadata belong in the annotation"):
        read_counts_table(written("labelled.csv", labelled), barcodes)
    three_names = table.set_index([table.index.str.lower(), table.index + "x"], append=True)
    with pytest.raises(InputError, match="its second line starts with 3 fields that are not numbers"):
        read_counts_table(written("names.csv", three_names), barcodes)
    broken_texts = {
        "ragged.csv": ("gene,c1,c2\nA,1,2\nB,1\nC\n", "line 3 has 1 values but the header names 2 columns"),
        # A missing last value is no count, whatever the line ending (numpy reads "1,\n" as [1, -1]).
        "lastmissing.csv": ("gene,c1,c2\nA,1,\r\n", "line 2 has 1 values but the header names 2 columns"),
        "nameonly.csv": ("gene,c1,c2\nA,1,2\nC\n", "line 3 holds no counts after its name \\('C'\\)"),
        "short.csv": ("gene,c1,c2,c3\nA,1,2\n", "its header has 4 fields but its second line 3"),
        "header.csv": ("gene,c1,c2\n", "no line after its header"),
        # No names at all, as anndata's write_csvs and numpy.savetxt write X (numbered columns, '1,2,3', are names).
        "unnamed.csv": ("0,2,0,0\n1,0,3,1\n", r"its first line reads as counts, not as the names of its columns "
                                             r"\(e.g. '2', '0', '0'\); .* \(anndata's write_csvs and numpy.savetxt "
                                             "write none"),
        "headerless.csv": ("A,1,0,1\nB,0,3,0\n", "its first line reads as counts"),
    }
    for name, (text, message) in broken_texts.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=f"{name}: .*{message}"):
            read_counts_table(tmp_path / name, ["c1"])
    # A separator closing every line ends no field.
    (tmp_path / "closed.csv").write_text("gene,c1,c2,\nA,1,2,\nB,0,3,\n")
    closed = read_counts_table(tmp_path / "closed.csv", ["c1"])
    assert list(closed.obs_names) == ["c1", "c2"] and closed.X.toarray().tolist() == [[1, 0], [2, 3]]
    # Repeated gene names are made unique, as for the other formats.
    repeated = read_counts_table(written("repeated.csv", table.set_axis(["SAME"] * len(table))), barcodes)
    assert list(repeated.var_names[:3]) == ["SAME", "SAME-1", "SAME-2"]
    # Other files given as a table: named, with the format they are.
    with pytest.raises(InputError, match="not a text count table; it is an AnnData .h5ad file, so the dataset's "
                                         r"format \(or evaluate's --format\) may be h5ad"):
        read_counts_table(EMBEDDED_H5AD, barcodes)
    assert container_problem(EMBEDDED_TARBALL, "matrix.txt") == (
        "not a text count table; it is gzip-compressed, as a 10x tarball is, so the dataset's format (or evaluate's --format) may be 10x_tarball")
    page = tmp_path / "page.txt"
    page.write_text("<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n")
    assert container_problem(page, "matrix.txt") == (
        "not a text count table; it is a web page, not data (a server's error or sign-in page?)")
    # A table given as another format is named as a table.
    assert container_problem(tmp_path / "expected.csv", "matrix.h5ad").endswith(
        "; it is a delimited text table, so the dataset's format (or evaluate's --format) may be counts_table")
    gzipped = tmp_path / "counts.csv.gz"
    gzipped.write_bytes(gzip.compress((tmp_path / "expected.csv").read_bytes()))
    assert container_problem(gzipped, "matrix.tar.gz").endswith(
        "; it is a gzip-compressed delimited text table, so the dataset's format (or evaluate's --format) may be counts_table")
    # A truncated download of a gzipped table.
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzipped.read_bytes()[: gzipped.stat().st_size // 2])
    assert container_problem(cut, "matrix.txt").startswith("a truncated or corrupt gzip file")
