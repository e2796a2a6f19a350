"""Downloads against a real HTTP server on 127.0.0.1."""

import gzip
import hashlib
import logging
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from cvaesim.download import USER_AGENT, DownloadError, fetch, file_address_hint
from cvaesim.steps import download

from cvaesim.io import read_10x_h5, read_10x_tarball

from conftest import EMBEDDED_ANNOTATION, EMBEDDED_TARBALL, Server, add_member, write_10x_h5, write_tarball


@pytest.fixture
def server():
    payload = EMBEDDED_TARBALL.read_bytes()
    running = Server({"/matrix.tar.gz": payload})
    yield running
    running.close()


def test_normal_download_writes_file_and_digest(server, tmp_path):
    target = tmp_path / "matrix.tar.gz"
    expected = hashlib.sha256(EMBEDDED_TARBALL.read_bytes()).hexdigest()
    assert fetch(f"{server.url}/matrix.tar.gz", target, expected) == expected
    assert target.read_bytes() == EMBEDDED_TARBALL.read_bytes()
    assert (tmp_path / "matrix.tar.gz.sha256").read_text().startswith(expected)
    assert server.requests[0]["User-Agent"] == USER_AGENT
    assert not (tmp_path / "matrix.tar.gz.part").exists()


def test_cut_off_download_is_resumed_with_a_range_request(server, tmp_path):
    server.cut_once.add("/matrix.tar.gz")
    target = tmp_path / "matrix.tar.gz"
    fetch(f"{server.url}/matrix.tar.gz", target, backoff_seconds=0.01)
    assert target.read_bytes() == EMBEDDED_TARBALL.read_bytes()
    assert len(server.requests) == 2
    half = len(EMBEDDED_TARBALL.read_bytes()) // 2
    assert server.requests[1]["Range"] == f"bytes={half}-"


def test_checksum_mismatch_fails_and_leaves_nothing(server, tmp_path):
    target = tmp_path / "matrix.tar.gz"
    actual = hashlib.sha256(EMBEDDED_TARBALL.read_bytes()).hexdigest()
    with pytest.raises(DownloadError) as error:
        fetch(f"{server.url}/matrix.tar.gz", target, "0" * 64)
    message = str(error.value)
    assert str(target) in message and "0" * 64 in message and actual in message
    assert list(tmp_path.iterdir()) == []


def test_missing_remote_file_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/nothing.tsv", tmp_path / "a.tsv", backoff_seconds=0.01)
    assert len(server.requests) == 1  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["annotation.tsv", "matrix.h5ad", "matrix.txt", "matrix.tar.gz"])
def test_an_empty_file_served_is_refused_as_such(server, tmp_path, name):
    server.files["/empty"] = b""  # a server's hiccup, or an export that wrote nothing
    with pytest.raises(DownloadError, match=rf"/empty: an empty file \(0 bytes\); nothing was written to .*{name}$"):
        download(f"{server.url}/empty", str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []


def test_a_share_link_s_page_is_refused_with_the_file_s_own_address(server, tmp_path, monkeypatch):
    """The addresses users copy from Dropbox, Google Drive, Zenodo and figshare serve a page, not the file; here
    reached through the test server as an HTTP proxy."""
    monkeypatch.setenv("http_proxy", server.url)
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    # urlopen's opener reads the proxy settings when it is built, which an earlier test may have done.
    monkeypatch.setattr(urllib.request, "_opener", urllib.request.build_opener())
    pages = {
        "http://www.dropbox.com/s/abc123/cells.h5ad?dl=0":
            "a Dropbox share page: the file itself is at http://www.dropbox.com/s/abc123/cells.h5ad?dl=1",
        "http://drive.google.com/file/d/1AbC-d_E/view?usp=sharing":
            "a Google Drive page: the file itself is at https://drive.usercontent.google.com/download?id=1AbC-d_E&"
            "export=download&confirm=t",
        "http://zenodo.org/records/1234567": "a Zenodo record's page: each of its files is at "
                                             "http://zenodo.org/records/1234567/files/<file name>?download=1",
        "http://figshare.com/articles/dataset/cells/123": "a figshare article's page: each of its files is at "
                                                          "https://figshare.com/ndownloader/files/<file id>",
    }
    for number, (address, hint) in enumerate(pages.items()):
        server.files[address] = b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n"
        target = tmp_path / str(number) / "matrix.h5ad"
        with pytest.raises(DownloadError) as refused:
            download(address, str(target))
        assert str(refused.value).startswith(f"{address}: not a readable HDF5 file, as matrix.h5ad must be ")
        assert f"it is a web page, not data (a server's error or sign-in page?); {hint}" in str(refused.value)
        assert list(target.parent.iterdir()) == []
    assert server.requests[0]["path"] == next(iter(pages))  # through the proxy, as the address was given
    assert file_address_hint("https://example.org/cells.h5ad") == ""


def test_unreachable_server_gives_up_after_retries(tmp_path):
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        fetch("http://127.0.0.1:9/x.tsv", tmp_path / "x.tsv", retries=2, backoff_seconds=0.01, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_local_path_and_file_url(tmp_path):
    by_path = tmp_path / "a.tar.gz"
    by_url = tmp_path / "b.tar.gz"
    fetch(str(EMBEDDED_TARBALL), by_path)
    fetch(EMBEDDED_TARBALL.as_uri(), by_url)
    assert by_path.read_bytes() == by_url.read_bytes() == EMBEDDED_TARBALL.read_bytes()
    with pytest.raises(DownloadError, match="no such file"):
        fetch(str(tmp_path / "absent.tsv"), tmp_path / "c.tsv")
    with pytest.raises(DownloadError, match="unsupported address scheme 'ftp'"):
        fetch("ftp://example.org/x", tmp_path / "d.tsv")


@pytest.mark.parametrize("name", ["matrix.h5ad", "matrix.tar.gz"])
def test_a_truncated_source_is_refused_under_its_own_name(tmp_path, small_cells, name):
    whole = tmp_path / f"whole_{name}"
    if name.endswith(".h5ad"):
        small_cells.write_h5ad(whole)
    else:
        whole.write_bytes(EMBEDDED_TARBALL.read_bytes())
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    download(str(whole), str(tmp_path / "good" / name))
    assert (tmp_path / "good" / name).read_bytes() == whole.read_bytes()
    target = tmp_path / "bad" / name
    with pytest.raises(DownloadError, match=f"^{cut}: not a readable .* as {name} must be") as error:
        download(str(cut), str(target))
    assert str(target) in str(error.value)
    assert list(target.parent.iterdir()) == []


def test_a_truncated_or_foreign_count_table_is_refused_at_download(tmp_path):
    table = tmp_path / "counts.csv.gz"
    table.write_bytes(gzip.compress(b"gene,c1,c2\n" + b"".join(b"G%d,%d,1\n" % (i, i) for i in range(5000))))
    download(str(table), str(tmp_path / "good" / "matrix.txt"))
    assert (tmp_path / "good" / "matrix.txt").read_bytes() == table.read_bytes()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    for source, message in [(cut, "a truncated or corrupt gzip file"),
                            (EMBEDDED_TARBALL, "not a text count table; it is gzip-compressed, as a 10x tarball is")]:
        with pytest.raises(DownloadError, match=f"^{source}: {message}"):
            download(str(source), str(tmp_path / "bad" / "matrix.txt"))
        assert list((tmp_path / "bad").iterdir()) == []


@pytest.mark.parametrize("v3", [False, True])
def test_a_cell_ranger_folder_is_packed_into_the_tarball_the_filter_reads(tmp_path, small_cells, v3):
    # Cell Ranger's outs/: the matrix folder beside files that must not be packed.
    outs = tmp_path / "outs"
    folder = "filtered_feature_bc_matrix" if v3 else "filtered_gene_bc_matrices/hg19"
    with tarfile.open(write_tarball(tmp_path / "source.tar.gz", small_cells, folder=folder, v3=v3)) as archive:
        archive.extractall(outs, filter="data")
    (outs / "possorted_genome_bam.bam").write_bytes(b"\0" * 1000)
    (outs / "web_summary.html").write_text("<html></html>")
    first, second = tmp_path / "first" / "matrix.tar.gz", tmp_path / "second" / "matrix.tar.gz"
    download(str(outs), str(first))
    download((outs / folder).as_uri(), str(second))  # the matrix folder itself, by file:// address
    packed = read_10x_tarball(first)
    assert list(packed.obs_names) == list(small_cells.obs_names)
    assert list(packed.var_names) == list(small_cells.var_names)
    assert (packed.X != small_cells.X).nnz == 0
    with tarfile.open(first) as archive:
        assert all(not name.endswith((".bam", ".html")) for name in archive.getnames())
    assert (read_10x_tarball(second).X != small_cells.X).nnz == 0
    # The same files give the same bytes, so the digest can be pinned in the config.
    again = tmp_path / "again.tar.gz"
    download(str(outs), str(again), sha256=hashlib.sha256(first.read_bytes()).hexdigest())
    assert again.read_bytes() == first.read_bytes()


def test_a_matrix_given_as_its_files_is_packed_from_their_addresses(tmp_path, small_cells):
    """GEO's per-sample supplementary files, each its own address."""
    files = {}
    with tarfile.open(write_tarball(tmp_path / "one.tar", small_cells, folder="", v3=True, prefix="GSM1_",
                                    compression="")) as archive:
        for member in archive:
            files[f"/geo/{member.name}"] = archive.extractfile(member).read()
    running = Server(files)
    try:
        addresses = [f"{running.url}{path}" for path in files]
        target = tmp_path / "web" / "matrix.tar.gz"
        download(addresses, str(target))
        packed = read_10x_tarball(target)
        assert list(packed.obs_names) == list(small_cells.obs_names)
        assert list(packed.var_names) == list(small_cells.var_names)
        assert (packed.X != small_cells.X).nnz == 0
        assert sorted(path.name for path in target.parent.iterdir()) == ["matrix.tar.gz", "matrix.tar.gz.sha256"]
        # The same files from disk give the same bytes, whatever their order, so the digest can be pinned.
        local = tmp_path / "local"
        local.mkdir()
        for path, body in files.items():
            (local / Path(path).name).write_bytes(body)
        again = tmp_path / "again" / "matrix.tar.gz"
        download([str(path) for path in sorted(local.iterdir(), reverse=True)], str(again),
                 sha256=hashlib.sha256(target.read_bytes()).hexdigest())
        assert again.read_bytes() == target.read_bytes()
        # An address that fails fails the download, naming it, and leaves nothing behind.
        broken = tmp_path / "broken" / "matrix.tar.gz"
        with pytest.raises(DownloadError, match=f"^{running.url}/geo/GSM1_genes.tsv.gz: HTTP 404"):
            download([*addresses[:2], f"{running.url}/geo/GSM1_genes.tsv.gz"], str(broken))
        assert list(broken.parent.iterdir()) == []
        # Files that make no matrix are refused as a folder of them is, naming the addresses.
        with pytest.raises(DownloadError, match=f"{running.url}/geo/GSM1_barcodes.tsv.gz"):
            download([address for address in addresses if "matrix" not in address], str(broken))
        assert list(broken.parent.iterdir()) == []
    finally:
        running.close()
    with pytest.raises(DownloadError, match="a list of files, but only a 10x_tarball dataset's matrix"):
        download([str(local / "GSM1_matrix.mtx.gz")] * 2, str(tmp_path / "h5" / "matrix.h5"))


def test_a_folder_of_geo_files_is_packed_for_one_sample_or_the_sample_named(tmp_path, small_cells):
    geo = tmp_path / "GSE1"
    geo.mkdir()
    with tarfile.open(write_tarball(tmp_path / "one.tar", small_cells, folder="", v3=True, prefix="GSM1_",
                                    compression="")) as archive:
        archive.extractall(geo, filter="data")
    (geo / "GSM1_metadata.csv.gz").write_bytes(b"not packed")
    packed = tmp_path / "resources" / "matrix.tar.gz"
    download(str(geo), str(packed))
    with tarfile.open(packed) as archive:
        assert sorted(archive.getnames()) == [f"GSE1/GSM1_{name}" for name in
                                              ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz")]
    assert (read_10x_tarball(packed).X != small_cells.X).nnz == 0
    with tarfile.open(write_tarball(tmp_path / "two.tar", small_cells[:5], folder="", v3=True, prefix="GSM2_",
                                    compression="")) as archive:
        archive.extractall(geo, filter="data")
    with pytest.raises(DownloadError, match=f"^{geo}: holds more than one matrix folder or sample "
                                            r"\(GSM1_matrix.mtx, GSM2_matrix.mtx\); name the one to read with "
                                            "the dataset's sample key"):
        download(str(geo), str(tmp_path / "again" / "matrix.tar.gz"))
    # The sample named: its files alone are packed.
    second = tmp_path / "second" / "matrix.tar.gz"
    download(str(geo), str(second), sample="GSM2")
    with tarfile.open(second) as archive:
        assert sorted(archive.getnames()) == [f"GSE1/GSM2_{name}" for name in
                                              ("barcodes.tsv.gz", "features.tsv.gz", "matrix.mtx.gz")]
    assert list(read_10x_tarball(second, sample="GSM2").obs_names) == list(small_cells[:5].obs_names)
    with pytest.raises(DownloadError, match=f"^{geo}: no matrix is named by sample 'GSM3'"):
        download(str(geo), str(tmp_path / "third" / "matrix.tar.gz"), sample="GSM3")
    assert not (tmp_path / "third").exists() or list((tmp_path / "third").iterdir()) == []


def test_an_archive_without_the_matrix_to_read_is_refused_at_download_under_its_source(tmp_path, small_cells):
    raw = tmp_path / "GSE1_RAW.tar"
    with tarfile.open(raw, "w") as archive:
        for prefix, cells in (("GSM1_", small_cells), ("GSM2_", small_cells[:5])):
            with tarfile.open(write_tarball(tmp_path / f"{prefix}.tar", cells, folder="", v3=True, prefix=prefix,
                                            compression="")) as one:
                for member in one:
                    archive.addfile(member, one.extractfile(member))
    target = tmp_path / "resources" / "matrix.tar.gz"
    for sample, problem in ((None, r"holds more than one matrix folder or sample \(GSM1_matrix.mtx, "
                                   r"GSM2_matrix.mtx\); name the one to read with the dataset's sample key"),
                            ("GSM3", r"no matrix is named by sample 'GSM3' \(it holds GSM1_matrix.mtx, ")):
        with pytest.raises(DownloadError, match=f"^{raw}: {problem}.*; nothing was written to {target}$"):
            download(str(raw), str(target), sample=sample)
        assert list(target.parent.iterdir()) == []
    download(str(raw), str(target), sample="GSM2")
    assert target.read_bytes() == raw.read_bytes()  # copied whole; the filter reads the sample named
    # A RAW tar of each sample's HDF5 file: the format to give it as is named.
    with tarfile.open(hdf5 := tmp_path / "GSE2_RAW.tar", "w") as archive:
        add_member(archive, "GSM1_filtered_feature_bc_matrix.h5", b"\x89HDF")
    with pytest.raises(DownloadError, match=r"GSE2_RAW.tar: holds no matrix .*; it holds HDF5 files "
                                            r"\(GSM1_filtered_feature_bc_matrix.h5\): give it as a 10x_h5 source"):
        download(str(hdf5), str(tmp_path / "again" / "matrix.tar.gz"))


def test_a_raw_tar_of_hdf5_files_gives_the_sample_s_for_a_10x_h5_dataset(tmp_path, small_cells):
    raw = tmp_path / "GSE3_RAW.tar"
    files = {f"GSM{n}_filtered_feature_bc_matrix.h5": write_10x_h5(tmp_path / f"{n}.h5", small_cells[n * 10:])
             for n in (1, 2)}
    with tarfile.open(raw, "w") as archive:
        for name, path in files.items():
            archive.add(path, arcname=name)
        add_member(archive, "GSM2_molecule_info.h5", b"\x89HDF")  # not a matrix
        add_member(archive, "GSM2_metadata.csv.gz", b"")
    target = tmp_path / "resources" / "matrix.h5"
    download(str(raw), str(target), sha256=hashlib.sha256(raw.read_bytes()).hexdigest(), sample="GSM2")
    assert target.read_bytes() == files["GSM2_filtered_feature_bc_matrix.h5"].read_bytes()
    assert list(read_10x_h5(target).obs_names) == list(small_cells[20:].obs_names)
    # The record keeps the archive's digest, the one pinned.
    assert (target.with_name("matrix.h5.sha256").read_text() ==
            f"{hashlib.sha256(raw.read_bytes()).hexdigest()}  GSE3_RAW.tar (the archive "
            f"GSM2_filtered_feature_bc_matrix.h5 was taken out of)  {raw.stat().st_size} bytes\n")
    for sample, problem in ((None, r"holds more than one Cell Ranger HDF5 file \(GSM1_filtered_feature_bc_matrix.h5, "
                                   r"GSM2_filtered_feature_bc_matrix.h5\); name the one to read with the dataset's "
                                   r"sample key \(its file-name prefix, such as GSM1234567\)"),
                            ("GSM3", r"holds no Cell Ranger HDF5 file named by sample 'GSM3' \(it holds "
                                     r"GSM1_filtered_feature_bc_matrix.h5, GSM2_filtered_feature_bc_matrix.h5\)")):
        again = tmp_path / str(sample) / "matrix.h5"
        with pytest.raises(DownloadError, match=f"^{raw}: {problem}; nothing was written to {again}$"):
            download(str(raw), str(again), sample=sample)
        assert list(again.parent.iterdir()) == []
    # A 10x tarball given as 10x_h5 is still told apart by its format, not searched for HDF5 files.
    with pytest.raises(DownloadError, match=r"not a readable HDF5 file.*so the dataset's format \(or evaluate's --format\) may be 10x_tarball"):
        download(str(EMBEDDED_TARBALL), str(tmp_path / "tarball" / "matrix.h5"))
    # The same files in a zip archive (as Zenodo and figshare serve them), made on a Mac: the same choice.
    zipped = tmp_path / "deposit.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for name, path in files.items():
            archive.write(path, f"deposit/{name}")
            archive.writestr(f"__MACOSX/deposit/._{name}", b"\0" * 10)
        archive.writestr("deposit/GSM2_molecule_info.h5", b"\x89HDF")
    download(str(zipped), str(tmp_path / "zip" / "matrix.h5"), sample="GSM1")
    assert (tmp_path / "zip" / "matrix.h5").read_bytes() == files["GSM1_filtered_feature_bc_matrix.h5"].read_bytes()
    with pytest.raises(DownloadError, match=r"deposit.zip: holds more than one Cell Ranger HDF5 file \(GSM1_filtered_"
                                            r"feature_bc_matrix.h5, GSM2_filtered_feature_bc_matrix.h5\); name the one"):
        download(str(zipped), str(tmp_path / "zip_without_sample" / "matrix.h5"))


@pytest.mark.parametrize("name", ["matrix.h5ad", "matrix.h5"])
def test_a_gzipped_hdf5_source_is_decompressed_and_keeps_the_source_s_digest(server, tmp_path, small_cells, name):
    plain = tmp_path / "plain"
    if name.endswith(".h5ad"):
        small_cells.write_h5ad(plain)
    else:
        write_10x_h5(plain, small_cells, v3=True)
    compressed = gzip.compress(plain.read_bytes())
    digest = hashlib.sha256(compressed).hexdigest()
    server.files["/GSM1_cells.gz"] = compressed  # as GEO serves them
    target = tmp_path / "resources" / name
    download(f"{server.url}/GSM1_cells.gz", str(target), sha256=digest)
    assert target.read_bytes() == plain.read_bytes()
    assert (target.with_name(f"{name}.sha256").read_text() ==
            f"{digest}  GSM1_cells.gz (gzip-compressed; decompressed into {name})  {len(compressed)} bytes\n")
    # Cut off, it is refused under its address and nothing is left.
    server.files["/cut.gz"] = compressed[:len(compressed) // 2]
    cut = tmp_path / "cut" / name
    with pytest.raises(DownloadError, match="/cut.gz: a gzip-compressed HDF5 file that does not decompress to its "
                                            "end .*nothing was written"):
        download(f"{server.url}/cut.gz", str(cut))
    assert list(cut.parent.iterdir()) == []


def test_a_zip_archive_gives_its_matrix_folder_or_its_one_file_as_a_tar_archive_its_one_file(server, tmp_path, small_cells):
    """As Zenodo and figshare serve folders: a zip of two samples' Cell Ranger folders, made on a Mac."""
    archive_path = tmp_path / "deposit.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for n in (1, 2):
            with tarfile.open(write_tarball(tmp_path / f"{n}.tar.gz", small_cells[n * 10:], v3=True,
                                            folder="filtered_feature_bc_matrix")) as tarball:
                for member in tarball.getmembers():
                    archive.writestr(f"deposit/sample{n}/{member.name}", tarball.extractfile(member).read())
        archive.writestr("__MACOSX/deposit/._sample1", b"\0" * 10)
        archive.writestr("deposit/README.txt", "two samples")
    zipped = archive_path.read_bytes()
    server.files["/deposit.zip"] = zipped
    target = tmp_path / "resources" / "datasets" / "deposit" / "matrix.tar.gz"
    download(f"{server.url}/deposit.zip", str(target), sha256=hashlib.sha256(zipped).hexdigest(), sample="sample2")
    taken = read_10x_tarball(target)
    assert list(taken.obs_names) == list(small_cells[20:].obs_names) and (taken.X != small_cells[20:].X).nnz == 0
    assert (target.with_name("matrix.tar.gz.sha256").read_text() ==
            f"{hashlib.sha256(zipped).hexdigest()}  deposit.zip (the zip archive "
            f"deposit/sample2/filtered_feature_bc_matrix was taken out of)  {len(zipped)} bytes\n")
    # Without the sample key, the error says which matrices there are; the download, kept for the entries reading
    # its other samples, is not downloaded again.
    other = tmp_path / "resources" / "datasets" / "other" / "matrix.tar.gz"
    with pytest.raises(DownloadError, match=r"deposit.zip: holds more than one matrix folder or sample "
                                            r"\(deposit/sample1/filtered_feature_bc_matrix, "
                                            r"deposit/sample2/filtered_feature_bc_matrix\).*kept as .*/resources/"
                                            r"downloads/deposit.zip.[0-9a-f]{12}, and"):
        download(f"{server.url}/deposit.zip", str(other))
    assert list(other.parent.iterdir()) == [] and len(server.requests) == 1
    (kept,) = (tmp_path / "resources" / "downloads").glob("deposit.zip.*[0-9a-f]")
    assert kept.read_bytes() == zipped
    # A zipped tarball gives the tarball.
    with zipfile.ZipFile(tmp_path / "tarball.zip", "w") as archive:
        archive.write(EMBEDDED_TARBALL, "matrices.tar.gz")
    download(str(tmp_path / "tarball.zip"), str(tmp_path / "zipped_tarball" / "matrix.tar.gz"))
    assert (tmp_path / "zipped_tarball" / "matrix.tar.gz").read_bytes() == EMBEDDED_TARBALL.read_bytes()
    # A zip of one file gives it; of several, a one-file format's source is refused, naming them (the resource
    # fork under __MACOSX/ not counted).
    single = tmp_path / "cells.zip"
    small_cells.write_h5ad(tmp_path / "cells.h5ad")
    with zipfile.ZipFile(single, "w") as archive:
        archive.write(tmp_path / "cells.h5ad", "cells.h5ad")
    download(str(single), str(tmp_path / "h5ad" / "matrix.h5ad"))
    assert (tmp_path / "h5ad" / "matrix.h5ad").read_bytes() == (tmp_path / "cells.h5ad").read_bytes()
    with pytest.raises(DownloadError, match=r"deposit.zip: an archive of 7 files \(deposit/sample1/.*\), where this "
                                            r"dataset's source is one file: it holds a 10x matrix \(deposit/sample1/"
                                            r"filtered_feature_bc_matrix, .*\), so the dataset's format may be "
                                            r"10x_tarball; nothing was written"):
        download(str(archive_path), str(tmp_path / "several" / "matrix.h5ad"))
    assert list((tmp_path / "several").iterdir()) == []
    with zipfile.ZipFile(tmp_path / "cells.zarr.zip", "w") as archive:  # zarr's ZipStore
        for name in (".zgroup", ".zattrs", "X/.zarray", "X/0.0", "obs/.zgroup"):
            archive.writestr(name, "{}")
    with pytest.raises(DownloadError, match=r"cells.zarr.zip: an archive of 5 files .*: it holds a zarr store: write "
                                            r"it as an .h5ad with anndata.read_zarr\(store\).write_h5ad\(path\)"):
        download(str(tmp_path / "cells.zarr.zip"), str(tmp_path / "zarr" / "matrix.h5ad"))
    server.files["/cut.zip"] = zipped[:len(zipped) // 2]
    with pytest.raises(DownloadError, match=r"/cut.zip: not a readable tar archive, as matrix.tar.gz must be .*; it is "
                                            r"a zip archive that does not open whole \(a cut-off download, most "
                                            r"likely\); nothing was written"):
        download(f"{server.url}/cut.zip", str(tmp_path / "cut" / "matrix.tar.gz"))
    # A tar archive of one file gives it too (a deposit's cells.h5ad.tar.gz); of several, they are named.
    with tarfile.open(tmp_path / "cells.h5ad.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "cells.h5ad", "cells/cells.h5ad")
        add_member(archive, "cells/._cells.h5ad", b"\0" * 10)  # macOS tar's metadata, not counted
    download(str(tmp_path / "cells.h5ad.tar.gz"), str(tmp_path / "tar" / "matrix.h5ad"))
    assert (tmp_path / "tar" / "matrix.h5ad").read_bytes() == (tmp_path / "cells.h5ad").read_bytes()
    with tarfile.open(tmp_path / "two.tar", "w") as archive:
        add_member(archive, "a.csv", b"gene,A-1\nG,1\n")
        add_member(archive, "b.csv", b"gene,A-1\nG,1\n")
    with pytest.raises(DownloadError, match=r"two.tar: an archive of 2 files \(a.csv, b.csv\), where this dataset's "
                                            r"source is one file: give that file's own address"):
        download(str(tmp_path / "two.tar"), str(tmp_path / "table" / "matrix.txt"))


def raw_tar_of_hdf5_files(path: Path, cells) -> Path:
    """GEO's RAW tar of two samples' Cell Ranger HDF5 files: GSM1 holds ``cells[10:]``, GSM2 ``cells[20:]``."""
    with tarfile.open(path, "w") as archive:
        for n in (1, 2):
            archive.add(write_10x_h5(path.with_name(f"{n}.h5"), cells[n * 10:]),
                        arcname=f"GSM{n}_filtered_feature_bc_matrix.h5")
    return path


def test_a_whole_download_the_config_picks_no_matrix_of_is_kept_for_the_next_run(tmp_path, small_cells):
    """GEO's RAW tar of several samples, downloaded without the sample key (or given as the wrong format), is not
    downloaded again once the config names the sample."""
    raw = raw_tar_of_hdf5_files(tmp_path / "GSE4_RAW.tar", small_cells)
    server = Server({"/GSE4_RAW.tar": raw.read_bytes(), "/other.tar": raw.read_bytes(),
                     "/annotation.tsv": EMBEDDED_ANNOTATION.read_bytes()})
    try:
        url, dataset = f"{server.url}/GSE4_RAW.tar", tmp_path / "resources" / "datasets" / "geo"
        kept = tmp_path / "resources" / "downloads" / f"GSE4_RAW.tar.{hashlib.sha256(url.encode()).hexdigest()[:12]}"
        with pytest.raises(DownloadError, match=rf"holds more than one Cell Ranger HDF5 file .*; nothing was written "
                                                rf"to {dataset / 'matrix.h5'} \(the download is kept as {kept}, and "
                                                r"the next run from that address takes it instead of downloading\)$"):
            download(url, str(dataset / "matrix.h5"))
        assert kept.read_bytes() == raw.read_bytes() and len(server.requests) == 1
        # The annotation's download, of another address, leaves it alone.
        download(f"{server.url}/annotation.tsv", str(dataset / "annotation.tsv"))
        assert kept.exists() and [request["path"] for request in server.requests] == ["/GSE4_RAW.tar",
                                                                                      "/annotation.tsv"]
        # Given as a 10x_tarball next: told it holds HDF5 files, still not downloaded again.
        with pytest.raises(DownloadError, match=r"holds no matrix named as .*; it holds HDF5 files .*kept as"):
            download(url, str(dataset / "matrix.tar.gz"))
        assert len(server.requests) == 2 and not (dataset / "matrix.tar.gz").exists()
        download(url, str(dataset / "matrix.h5"), sample="GSM2")
        assert len(server.requests) == 2
        assert list(read_10x_h5(dataset / "matrix.h5").obs_names) == list(small_cells[20:].obs_names)
        assert sorted(path.name for path in dataset.iterdir()) == ["annotation.tsv", "annotation.tsv.sha256",
                                                                   "matrix.h5", "matrix.h5.sha256"]
        # Read with a sample, it stays for the entries reading the others: another entry takes it for its sample.
        again = tmp_path / "resources" / "datasets" / "again"
        download(url, str(again / "matrix.h5"), sample="GSM1")
        assert list(read_10x_h5(again / "matrix.h5").obs_names) == list(small_cells[10:].obs_names)
        # A sample's file that is no HDF5 file is refused; the archive stays for the entries reading its other samples.
        with tarfile.open(tmp_path / "broken.tar", "w") as archive:
            archive.add(tmp_path / "1.h5", arcname="GSM1_filtered_feature_bc_matrix.h5")
            add_member(archive, "GSM3_filtered_feature_bc_matrix.h5", b"not HDF5")
        server.files["/broken.tar"] = (tmp_path / "broken.tar").read_bytes()
        download(f"{server.url}/broken.tar", str(again / "matrix.h5"), sample="GSM1")
        with pytest.raises(DownloadError, match="broken.tar: not a readable HDF5 file"):
            download(f"{server.url}/broken.tar", str(tmp_path / "resources" / "datasets" / "GSM3" / "matrix.h5"),
                     sample="GSM3")
        assert len(list(kept.parent.glob("broken.tar.*[0-9a-f]"))) == 1 and len(server.requests) == 3
        # Another address is downloaded, and kept apart.
        download(f"{server.url}/other.tar", str(again / "matrix.h5"), sample="GSM2")
        assert [request["path"] for request in server.requests[2:]] == ["/broken.tar", "/other.tar"]
        assert sorted(path.name for path in again.iterdir()) == ["matrix.h5", "matrix.h5.sha256"]
        assert len(list(kept.parent.glob("*.tar.*[0-9a-f]"))) == 3
        # A download kept after a sample that names none of its matrices, then read whole (no sample), is used up.
        server.files["/one.tar.gz"] = EMBEDDED_TARBALL.read_bytes()
        whole = tmp_path / "resources" / "datasets" / "whole" / "matrix.tar.gz"
        with pytest.raises(DownloadError, match="kept as"):
            download(f"{server.url}/one.tar.gz", str(whole), sample="GSM9")
        download(f"{server.url}/one.tar.gz", str(whole))
        assert whole.read_bytes() == EMBEDDED_TARBALL.read_bytes() and len(server.requests) == 5
        assert not list(kept.parent.glob("one.tar.gz.*[0-9a-f]"))
    finally:
        server.close()


def test_a_folder_without_one_whole_matrix_or_for_another_format_is_refused(tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    (outs / "barcodes.tsv").write_text("AAAC-1\n")
    target = tmp_path / "resources" / "matrix.tar.gz"
    with pytest.raises(DownloadError, match=f"^{outs}: holds no matrix"):
        download(str(outs), str(target))
    assert list(target.parent.iterdir()) == []
    with pytest.raises(DownloadError, match=f"^{outs}: a folder, but matrix.h5ad must be a file"):
        download(str(outs), str(tmp_path / "resources" / "matrix.h5ad"))
    (outs / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n1 1 0\n")
    with pytest.raises(DownloadError, match=f"^{outs}: no gene file .* beside the matrix"):
        download(str(outs), str(target))
    for matrix_folder in ("filtered_feature_bc_matrix", "raw_feature_bc_matrix"):
        (outs / matrix_folder).mkdir()
        for name in ("matrix.mtx", "barcodes.tsv", "features.tsv"):
            (outs / matrix_folder / name).write_text("")
    with pytest.raises(DownloadError, match="holds more than one matrix folder or sample "
                                            r"\(\., filtered_feature_bc_matrix, raw_feature_bc_matrix\)"):
        download(str(outs), str(target))
    assert list(target.parent.iterdir()) == []


def test_samples_of_one_web_archive_are_downloaded_once_and_not_copied(tmp_path, small_cells):
    """GEO's uncompressed RAW tar of two samples' matrix files, read by two entries: one download, and each
    entry's matrix.tar.gz the kept archive itself (a hard link), not a copy of gigabytes per sample."""
    raw = tmp_path / "GSE5_RAW.tar"
    with tarfile.open(raw, "w") as archive:
        for n in (1, 2):
            with tarfile.open(write_tarball(tmp_path / f"{n}.tar", small_cells[n * 10:], folder="", v3=True,
                                            prefix=f"GSM{n}_", compression="")) as one:
                for member in one:
                    archive.addfile(member, one.extractfile(member))
    address = "/geo/download/?acc=GSE5&format=file"  # GEO's address of a series' RAW tar: no file name in it
    server = Server({address: raw.read_bytes()})
    try:
        datasets = tmp_path / "resources" / "datasets"
        for n in (1, 2):
            download(server.url + address, str(datasets / f"GSM{n}" / "matrix.tar.gz"), sample=f"GSM{n}")
    finally:
        server.close()
    assert len(server.requests) == 1
    (kept,) = (tmp_path / "resources" / "downloads").glob("download.*[0-9a-f]")
    for n in (1, 2):
        matrix = datasets / f"GSM{n}" / "matrix.tar.gz"
        assert list(read_10x_tarball(matrix, sample=f"GSM{n}").obs_names) == list(small_cells[n * 10:].obs_names)
        assert matrix.stat().st_ino == kept.stat().st_ino
    # Not the pinned digest: deleted with the entry's file, so the next run downloads it again.
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download(server.url + address, str(datasets / "GSM3" / "matrix.tar.gz"), "0" * 64, sample="GSM1")
    assert not kept.exists() and not (datasets / "GSM3" / "matrix.tar.gz").exists()


def test_a_file_system_without_locks_downloads_all_the_same(tmp_path, small_cells, monkeypatch, caplog):
    """Some NFS mounts refuse file locks (ENOLCK): the kept download is then used without waiting, with a warning."""
    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr("cvaesim.download.fcntl.flock", no_locks)
    raw = raw_tar_of_hdf5_files(tmp_path / "GSE6_RAW.tar", small_cells)
    server = Server({"/GSE6_RAW.tar": raw.read_bytes()})
    try:
        datasets = tmp_path / "resources" / "datasets"
        with caplog.at_level(logging.WARNING):
            for n in (1, 2):
                download(f"{server.url}/GSE6_RAW.tar", str(datasets / f"GSM{n}" / "matrix.h5"), sample=f"GSM{n}")
    finally:
        server.close()
    assert len(server.requests) == 1 and "cannot be locked ([Errno 37] No locks available)" in caplog.text
    for n in (1, 2):
        assert list(read_10x_h5(datasets / f"GSM{n}" / "matrix.h5").obs_names) == list(small_cells[n * 10:].obs_names)
