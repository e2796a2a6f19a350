"""Write scanpy's bundled 700 PBMC68k cells in the formats PBMC68k ships.

``scanpy/datasets/10x_pbmc68k_reduced.h5ad`` keeps, in ``.raw.X``,
log1p(counts / n_counts x 10,000) rounded to 3 decimals for 765 genes, so
round(expm1(raw.X) x n_counts / 10,000) recovers the integer counts. This module writes
them as a 10x tarball (``filtered_matrices_mex/hg19/{matrix.mtx,genes.tsv,barcodes.tsv}``),
a barcode annotation TSV (``TSNE.1 TSNE.2 barcodes celltype``) and a counts ``.h5ad``.
The outputs are byte-for-byte reproducible (fixed archive times), so their SHA-256 can be pinned.

Run: ``python -m cvaesim.embedded resources/embedded``
"""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

MEX_FOLDER = "filtered_matrices_mex/hg19"
TARBALL = "pbmc68k_reduced_filtered_gene_bc_matrices.tar.gz"
ANNOTATION = "pbmc68k_reduced_barcodes_annotation.tsv"
COUNTS_H5AD = "pbmc68k_reduced_counts.h5ad"


def recover_counts() -> ad.AnnData:
    """The bundled cells as integer counts, with their annotations."""
    bundled = sc.datasets.pbmc68k_reduced()
    normalised = np.expm1(bundled.raw.X.toarray() if sp.issparse(bundled.raw.X) else bundled.raw.X)
    estimate = normalised * bundled.obs["n_counts"].to_numpy()[:, np.newaxis] / 1e4
    counts = np.rint(estimate)
    worst = np.abs(estimate - counts).max()
    if worst > 0.25:
        raise RuntimeError(f"scanpy's pbmc68k_reduced no longer inverts to integer counts (deviation {worst:.2f})")
    obs = bundled.obs[["bulk_labels", "louvain"]].copy()
    obs[["embedding_1", "embedding_2"]] = bundled.obsm["X_umap"]
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs,
                      var=pd.DataFrame(index=bundled.raw.var_names.astype(str)))


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    member.mode = 0o644
    archive.addfile(member, io.BytesIO(payload))


def write_10x_tarball(adata: ad.AnnData, path: Path) -> None:
    coo = sp.coo_matrix(adata.X.T)  # 10x stores genes x cells
    order = np.lexsort((coo.row, coo.col))
    lines = [
        "%%MatrixMarket matrix coordinate integer general",
        f"{coo.shape[0]} {coo.shape[1]} {coo.nnz}",
        *(f"{g + 1} {c + 1} {v}" for g, c, v in zip(coo.row[order], coo.col[order], coo.data[order])),
    ]
    # No Ensembl IDs survive in the bundled file: the symbol stands in both columns.
    genes = "".join(f"{name}\t{name}\n" for name in adata.var_names)
    barcodes = "".join(f"{name}\n" for name in adata.obs_names)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            _add(archive, f"{MEX_FOLDER}/matrix.mtx", ("\n".join(lines) + "\n").encode())
            _add(archive, f"{MEX_FOLDER}/genes.tsv", genes.encode())
            _add(archive, f"{MEX_FOLDER}/barcodes.tsv", barcodes.encode())
    path.write_bytes(buffer.getvalue())


def write_annotation(adata: ad.AnnData, path: Path) -> None:
    """PBMC68k's annotation columns; the 2-D coordinates are the bundled UMAP (no t-SNE is bundled)."""
    table = pd.DataFrame({
        "TSNE.1": adata.obs["embedding_1"].round(6).to_numpy(),
        "TSNE.2": adata.obs["embedding_2"].round(6).to_numpy(),
        "barcodes": adata.obs_names,
        "celltype": adata.obs["bulk_labels"].astype(str).to_numpy(),
    })
    table.to_csv(path, sep="\t", index=False)


def write_counts_h5ad(adata: ad.AnnData, path: Path) -> None:
    counts = ad.AnnData(X=adata.X, obs=adata.obs[["bulk_labels", "louvain"]].copy(), var=adata.var)
    counts.write_h5ad(path, compression="gzip")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args(argv).folder
    folder.mkdir(parents=True, exist_ok=True)
    adata = recover_counts()
    write_10x_tarball(adata, folder / TARBALL)
    write_annotation(adata, folder / ANNOTATION)
    write_counts_h5ad(adata, folder / COUNTS_H5AD)
    print(f"wrote {adata.n_obs} cells x {adata.n_vars} genes to {folder}")


if __name__ == "__main__":
    main()
