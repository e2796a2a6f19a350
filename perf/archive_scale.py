"""Benchmark: the download step on archived sources at PBMC68k size.

Public deposits serve matrices packed: Zenodo and figshare a zip of the matrix folder, GEO an .h5ad gzipped
whole. This packs ``perf/pbmc68k_scale.py``'s generated 68,579 cells x 32,738 genes both ways, runs the
download step (``cvaesim.steps.download``, as the workflow's download rule does) on each, and prints wall time
and peak resident memory, each in a child process, and whether what the filter reads is what was packed.

    .venv/bin/python perf/archive_scale.py --workdir /tmp/pbmc68k-scale
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pbmc68k_scale import generate  # noqa: E402

DOWNLOAD = """
import sys
from cvaesim.steps import download
download(sys.argv[1], sys.argv[2])
"""


def timed_download(source: Path, destination: Path) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of the download step in a child process, by GNU time."""
    shutil.rmtree(destination.parent, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "peak_kb %M", sys.executable, "-c", DOWNLOAD, str(source),
                             str(destination)], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(result.stderr.rsplit("peak_kb ", 1)[1]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pbmc68k-scale"))
    args = parser.parse_args()
    tarball, _ = generate(args.workdir)
    folder = args.workdir / "archives"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    # The matrix folder zipped, as a deposit serves it.
    with tarfile.open(tarball) as archive:
        archive.extractall(folder / "unpacked", filter="data")
    zipped = folder / "deposit.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((folder / "unpacked").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder / "unpacked").as_posix())
    seconds, peak = timed_download(zipped, folder / "zip" / "matrix.tar.gz")

    from cvaesim.io import read_10x_tarball

    same = (read_10x_tarball(folder / "zip" / "matrix.tar.gz").X != read_10x_tarball(tarball).X).nnz == 0
    print(f"zip of the matrix folder, {zipped.stat().st_size / 1e6:.0f} MB: downloaded and packed in {seconds:.1f} s, "
          f"peak RSS {peak:.2f} GB; counts as packed: {same}")

    # The same cells as an .h5ad, gzipped whole.
    h5ad = folder / "cells.h5ad"
    read_10x_tarball(tarball).write_h5ad(h5ad)
    compressed = folder / "cells.h5ad.gz"
    with open(h5ad, "rb") as plain, gzip.open(compressed, "wb") as out:
        shutil.copyfileobj(plain, out, 1 << 20)
    seconds, peak = timed_download(compressed, folder / "gz" / "matrix.h5ad")
    same = (folder / "gz" / "matrix.h5ad").read_bytes() == h5ad.read_bytes()
    print(f".h5ad gzipped whole, {compressed.stat().st_size / 1e6:.0f} MB ({h5ad.stat().st_size / 1e6:.0f} MB "
          f"plain): downloaded and decompressed in {seconds:.1f} s, peak RSS {peak:.2f} GB; byte-identical to the "
          f"plain file: {same}")


if __name__ == "__main__":
    main()
