"""Fetch a dataset's input file from https://, http://, file:// or a local path (a local
folder of 10x matrix files is packed into a tarball).

The file is written to ``<destination>.part`` and renamed into place only when it is
complete (and matches the expected SHA-256), so a failed or killed download never
leaves a file that looks finished. A ``.part`` left by an earlier attempt is resumed
with an HTTP Range request. ``container_problem`` is the check the download step runs on
a file before it is put in place.

A web download that entries pick samples of, or that the config picks no matrix of, is kept in a
folder of kept downloads, named by its address: the next entry or run reading that address takes it
instead of downloading it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlencode, urlparse

import h5py

from . import InputError, __version__
from .archives import (MatrixChoiceError, chosen_matrix, extract_10x_h5, pack_10x_folder, untar_single_file,
                       unzip_source, zip_of_files)
from .formats import (HDF5_FORMAT_OF_SUFFIX, TAR_OPEN_ERRORS, format_hint, gzipped_hdf5, is_gzipped, is_web_page,
                      tar_problem)
from .tables import annotation_problem, table_layout

log = logging.getLogger(__name__)

USER_AGENT = f"cvaesim/{__version__} (Python urllib; single-cell simulation workflow)"
CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """The source could not be fetched, or its content is not what the config expects."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    source: str | list[str],
    destination: str | Path,
    sha256: str | None = None,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    backoff_seconds: float = 2.0,
    check: Callable[[Path], str | None] | None = None,
    sample: str | None = None,
    kept_downloads: str | Path | None = None,
) -> str:
    """Put ``source`` at ``destination`` and return its SHA-256; a folder source, or a list of a 10x matrix's
    files (GEO's ``GSM123_matrix.mtx.gz``, ``_barcodes.tsv.gz``, ``_features.tsv.gz`` addresses), is packed as a
    10x tarball (of its matrices, the one ``sample`` names: see ``archives.chosen_matrix``), and an ``.h5``
    destination's tar archive of HDF5 files gives the one to read (see ``archives.extract_10x_h5``).

    ``<destination>.sha256`` records the digest and size, so a user can pin them in the config.
    ``check`` returns why a complete file cannot be used (or None); such a file is deleted.
    ``kept_downloads`` (by default the destination's folder) keeps a web download with a ``sample``, for the
    entries that read other samples of it, and one that the config picks no matrix of, for the next run.
    """
    destination = Path(destination)
    kept = _kept_path(source, Path(kept_downloads or destination.parent)) if _on_the_web(source) else None
    taken = False  # whether the file was taken from ``kept``, not fetched
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    transfer = functools.partial(_fetch_file, retries=retries, timeout=timeout, backoff_seconds=backoff_seconds)
    if isinstance(source, list):
        if not destination.name.endswith(".tar.gz"):
            raise DownloadError(f"{', '.join(source)}: a list of files, but only a 10x_tarball dataset's matrix may "
                                "be given as its files")
        files = destination.with_name("matrix_files")  # fetched here, then packed (the folder's name with them)
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir()
        try:
            for each in source:
                name = Path(unquote(urlparse(each).path)).name
                if (files / name).exists():
                    raise DownloadError(f"{each}: a second file named {name} in the source list")
                transfer(each, files / name)
            log.info("packing the 10x matrix files %s into %s", ", ".join(sorted(path.name for path in
                                                                                   files.iterdir())), destination)
            _pack(files, partial, sample, ", ".join(source))
        finally:
            shutil.rmtree(files, ignore_errors=True)
    elif urlparse(source).scheme in ("file", "") and _local_path(source).is_dir():
        # Cell Ranger's matrix folder: packed into the tarball that a 10x_tarball dataset reads.
        if not destination.name.endswith(".tar.gz"):
            raise DownloadError(f"{source}: a folder, but {destination.name} must be a file; only a "
                                f"10x_tarball dataset's matrix may be a folder (of matrix.mtx, barcodes, "
                                f"genes or features)")
        log.info("packing the 10x matrix files under %s into %s", source, destination)
        _pack(_local_path(source), partial, sample, source)
    elif kept is None or (sample is None and not kept.exists()):
        transfer(source, partial)
    else:
        with _locked(kept):  # an entry reading another sample of it may be downloading it now
            taken = kept.exists()
            if taken:
                log.info("%s: taking its download kept by an earlier job (%s)", source, kept)
                partial.unlink(missing_ok=True)
                _link_or_copy(kept, partial)
            else:
                transfer(source, partial)
                if sample is not None:
                    _link_or_copy(partial, kept)
                    log.info("%s: kept as %s for the entries that read its other samples", source, kept)

    digest = sha256_of(partial)
    size = partial.stat().st_size
    if sha256 and digest != sha256.lower():
        partial.unlink()
        _forget(kept)
        raise DownloadError(
            f"{destination}: SHA-256 mismatch for {source}: expected {sha256.lower()}, "
            f"got {digest} ({size} bytes); the file was deleted"
        )
    # What the digest is of, logged and recorded beside the file: what was fetched, which is what a user pins, even
    # where the file is taken out of it.
    digested, recorded = destination, destination.name
    source_name = Path(unquote(urlparse(source).path)).name if isinstance(source, str) else destination.name
    try:
        if zip_of_files(partial):
            unzipped = partial.with_name(partial.name + ".unzipped")
            try:
                member = unzip_source(partial, unzipped, destination.name.endswith(".tar.gz"), sample,
                                      hdf5_matrices=destination.name.endswith(".h5"))
            except BaseException:
                unzipped.unlink(missing_ok=True)
                raise
            unzipped.replace(partial)
            log.info("%s: took %s out of the zip archive", source, member)
            digested = f"{source} (the zip archive {member} was taken out of)"
            recorded = f"{source_name} (the zip archive {member} was taken out of)"
        elif not destination.name.endswith((".tar.gz", ".h5")):
            # A one-file source packed as a tar archive (a deposit's cells.h5ad.tar.gz); GEO's RAW tar of Cell
            # Ranger HDF5 files is searched for the sample's below.
            extracted = partial.with_name(partial.name + ".extracted")
            member = untar_single_file(partial, extracted)
            if member is not None:
                log.info("%s: took %s out of the archive", source, member)
                extracted.replace(partial)
                digested = f"{source} (the archive {member} was taken out of)"
                recorded = f"{source_name} (the archive {member} was taken out of)"
        if destination.suffix in HDF5_FORMAT_OF_SUFFIX and gzipped_hdf5(partial):
            # GEO serves .h5ad and .loom files gzipped; h5py reads only the uncompressed file.
            _gunzip(partial, source)
            digested = f"{source} (decompressed)"
            recorded = f"{source_name} (gzip-compressed; decompressed into {destination.name})"
        if destination.name.endswith(".h5"):
            # GEO's RAW tar of each sample's Cell Ranger HDF5 file: the one to read is taken out.
            extracted = partial.with_name(partial.name + ".extracted")
            member = extract_10x_h5(partial, extracted, sample)
            if member is not None:
                log.info("%s: took %s out of the archive", source, member)
                extracted.replace(partial)
                digested = f"{source} (the archive {member} was taken out of)"
                recorded = f"{source_name} (the archive {member} was taken out of)"
        problem = check(partial) if check else None
    except MatrixChoiceError as error:
        # The file is whole, the config picks no matrix of it: fetching it again would give the same bytes.
        raise DownloadError(f"{source}: {error}; nothing was written to {destination}"
                            f"{_keep_download(kept, partial)}") from None
    if problem:
        if isinstance(source, str) and is_web_page(partial):
            problem += file_address_hint(source)
        partial.unlink()
        if not taken:  # a cut-off or wrong file is not taken again; one taken served another entry's config
            _forget(kept)
        raise DownloadError(f"{source}: {problem}; nothing was written to {destination}")
    if sample is None:
        _forget(kept)  # kept for this run alone, to be read whole
    log.info("%s: %d bytes, SHA-256 %s%s", digested, size, digest, " (verified)" if sha256 else "")
    partial.replace(destination)
    destination.with_name(destination.name + ".sha256").write_text(f"{digest}  {recorded}  {size} bytes\n")
    return digest


def file_address_hint(url: str) -> str:
    """Where a share link's page (what Dropbox, Google Drive, Zenodo and figshare serve at the address users copy)
    has the file it shows: '; ...', or '' for other addresses."""
    address = urlparse(url)
    host = address.netloc.lower().removeprefix("www.")
    if host == "dropbox.com":
        query = {**parse_qs(address.query), "dl": ["1"]}
        return (f"; a Dropbox share page: the file itself is at "
                f"{address._replace(query=urlencode(query, doseq=True)).geturl()}")
    drive_file = re.match(r"/file/d/([\w-]+)", address.path)
    if host == "drive.google.com" and drive_file:
        return ("; a Google Drive page: the file itself is at https://drive.usercontent.google.com/download?id="
                f"{drive_file[1]}&export=download&confirm=t")
    if host == "zenodo.org" and re.fullmatch(r"/records?/\d+/?", address.path):
        return (f"; a Zenodo record's page: each of its files is at {url.rstrip('/')}/files/<file name>?download=1 "
                "(the page lists the names)")
    if host == "figshare.com" and address.path.startswith("/articles/"):
        return ("; a figshare article's page: each of its files is at https://figshare.com/ndownloader/files/<file "
                "id> (where the page's Download button leads)")
    return ""


def _gunzip(partial: Path, source: str) -> None:
    """Decompress ``partial`` in place; a truncated or corrupt stream is refused under ``source`` and deleted."""
    decompressed = partial.with_name(partial.name + ".gunzipped")
    try:
        with gzip.open(partial, "rb") as compressed, open(decompressed, "wb") as out:
            shutil.copyfileobj(compressed, out, CHUNK_BYTES)
    except (OSError, EOFError, zlib.error) as error:
        decompressed.unlink(missing_ok=True)
        partial.unlink()
        raise DownloadError(f"{source}: a gzip-compressed HDF5 file that does not decompress to its end ({error}); "
                            "a truncated download, most likely: nothing was written") from None
    log.info("%s: gzip-compressed; decompressed %d bytes to %d", source, partial.stat().st_size,
             decompressed.stat().st_size)
    decompressed.replace(partial)


def _on_the_web(source: str | list[str]) -> bool:
    return isinstance(source, str) and urlparse(source).scheme in ("http", "https")


def _kept_path(url: str, folder: Path) -> Path:
    """Where the whole download of ``url`` is kept: its file name (for people to tell; characters a file name
    should not hold replaced, cut short) and a digest of the address, so that two addresses ending in the same name
    (or in none, as GEO's ``download/?acc=...``) are kept apart."""
    name = re.sub(r"[^\w.-]", "_", Path(unquote(urlparse(url).path)).name, flags=re.ASCII).lstrip(".")
    return folder / f"{name[:100] or 'download'}.{hashlib.sha256(url.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _locked(kept: Path):
    """Hold ``kept``'s lock: one job downloads an address while the others reading it wait, then take it."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    with open(kept.with_name(kept.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (an NFS mount without its lock service)
            log.warning("%s: cannot be locked (%s); jobs reading it side by side may each download it", kept, error)
        yield


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no second copy of a download of gigabytes), or a copy where the
    file system has no links; written whole or not at all."""
    writing = target.with_name(target.name + ".linking")
    writing.unlink(missing_ok=True)
    try:
        os.link(source, writing)
    except OSError:
        shutil.copyfile(source, writing)
    writing.replace(target)


def _keep_download(kept: Path | None, partial: Path) -> str:
    """Keep ``partial`` as ``kept`` for the next run (a local source is only deleted); what to add to the error."""
    if kept is None:
        partial.unlink()
        return ""
    with _locked(kept):
        if kept.exists():  # kept before its matrix was looked for: the download as it came
            partial.unlink()
        else:
            partial.replace(kept)
    return f" (the download is kept as {kept}, and the next run from that address takes it instead of downloading)"


def _forget(kept: Path | None) -> None:
    if kept is not None and kept.exists():
        with _locked(kept):
            kept.unlink(missing_ok=True)


def _local_path(source: str) -> Path:
    parsed = urlparse(source)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(source)


def _pack(folder: Path, partial: Path, sample: str | None, source: str) -> None:
    try:
        pack_10x_folder(folder, partial, sample)
    except InputError as error:  # raised before anything is written
        raise DownloadError(str(error).replace(str(folder), source)) from error


def _fetch_file(source: str, target: Path, *, retries: int, timeout: float, backoff_seconds: float) -> None:
    """Copy or download one file to ``target`` (an HTTP download resumes what ``target`` already holds)."""
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        _download(source, target, retries=retries, timeout=timeout, backoff_seconds=backoff_seconds)
    elif scheme in ("file", ""):
        local = _local_path(source)
        if not local.is_file():
            raise DownloadError(f"{source}: {'a folder' if local.is_dir() else 'no such file'}")
        log.info("copying %s to %s", local, target)
        shutil.copyfile(local, target)
    else:
        raise DownloadError(
            f"{source}: unsupported address scheme {scheme!r}; use https://, http://, file:// or a local path"
        )


def _download(url: str, partial: Path, *, retries: int, timeout: float, backoff_seconds: float) -> None:
    """Stream ``url`` into ``partial``, resuming what is already there, retrying with backoff."""
    for attempt in range(1, retries + 1):
        try:
            _download_once(url, partial, timeout)
            return
        except urllib.error.HTTPError as error:
            # Client errors other than timeouts and rate limits will not go away on retry.
            if 400 <= error.code < 500 and error.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
            problem = f"HTTP {error.code} {error.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            problem = str(getattr(error, "reason", error)) or type(error).__name__
        if attempt == retries:
            raise DownloadError(f"{url}: download failed after {retries} attempts: {problem}")
        wait = backoff_seconds * 2 ** (attempt - 1)
        log.warning("%s: attempt %d of %d failed (%s); retrying in %.0f s", url, attempt, retries, problem, wait)
        time.sleep(wait)


def _download_once(url: str, partial: Path, timeout: float) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # The partial file is not a prefix the server can continue: start again.
            log.warning("%s: server refused to resume at byte %d; starting over", url, offset)
            partial.unlink()
        raise
    with response:
        if offset and response.status != 206:
            log.warning("%s: server ignored the Range request; starting over", url)
            offset = 0
        elif offset:
            log.info("%s: resuming at byte %d", url, offset)
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        received = offset
        next_report = time.monotonic()
        with open(partial, "ab" if offset else "wb") as out:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                if time.monotonic() >= next_report:
                    total = f" of {expected}" if expected else ""
                    log.info("%s: %d%s bytes", url, received, total)
                    next_report = time.monotonic() + 5
    if expected is not None and received < expected:
        raise http.client.IncompleteRead(b"", expected - received)
    log.info("%s: complete, %d bytes", url, received)


def container_problem(path: str | Path, name: str, sample: str | None = None) -> str | None:
    """Why ``path`` cannot be the file ``name`` says (HDF5 for .h5/.h5ad, a tar archive for .tar.gz holding
    the 10x matrix to read, of several the one ``sample`` names, a complete text count table for .txt), or None.

    Only the container and an archive's list of files are checked, in seconds; the content is the filter
    step's. Run on a download before it is put in place, so that a truncated or wrong file is reported under
    the source the user gave. A whole archive holding no one matrix that ``sample`` picks raises
    MatrixChoiceError (see ``chosen_matrix``).
    """
    if Path(path).stat().st_size == 0:
        return "an empty file (0 bytes)"
    if name.endswith((".h5", ".h5ad", ".loom")):
        try:
            with h5py.File(path, "r"):
                return None
        except OSError as error:
            return (f"not a readable HDF5 file, as {name} must be ({error})"
                    f"{format_hint(path, HDF5_FORMAT_OF_SUFFIX[Path(name).suffix])}")
    if name.endswith(".tsv"):
        return annotation_problem(path)
    if name.endswith(".txt"):
        try:
            table_layout(path)
            if is_gzipped(path):
                with gzip.open(path, "rb") as stream:  # read to the end, so a truncated download shows here
                    while stream.read(1 << 24):
                        pass
        except InputError as error:
            return str(error).removeprefix(f"{path}: ")
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            return f"a truncated or corrupt gzip file ({error})"
        return None
    if name.endswith((".tar.gz", ".tar")):
        try:
            with tarfile.open(path, "r:*") as archive:
                members = archive.getmembers()  # reads to the end, so a truncated archive shows here
        except TAR_OPEN_ERRORS as error:
            return (f"not a readable tar archive, as {name} must be ({tar_problem(error)})"
                    f"{format_hint(path, '10x_tarball')}")
        chosen_matrix([PurePosixPath(member.name) for member in members if member.isfile()], sample)
    return None
