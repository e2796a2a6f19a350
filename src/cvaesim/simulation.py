"""Generate cells of chosen types from a trained model, in batches, as sparse integer counts."""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError
from .choices import CALIBRATIONS, LATENT_DRAWS, LIBRARY_SIZES, ORIGINS
from .counts import COUNT_SAMPLING, draw_counts, expected_counts
from .images import from_images, to_images, unscale, unscale_counts
from .model import COUNT_LOSSES, ConditionalConvVAE
from .writers import cell_names

log = logging.getLogger(__name__)

# Decoded cells per type whose mean expression is compared with the training cells' (4 batches of 256).
CALIBRATION_CELLS = 1024
# type_quantiles ranks each gene's counts among a batch's cells: with fewer, the ranks say little (docs/record.md).
FEW_RANKED_CELLS = 10
# The calibrations that rescale each gene to its type's training mean (from decoded share moments).
MOMENT_CALIBRATIONS = ("type_means", "type_moments")


class Simulator:
    """Generates cells of chosen types from a trained model, one decoder call per batch.

    ``store_meta`` is the image store: cell-type order, gene layout, the scaling whose
    inverse turns decoded pixels into expected counts, and the training cells' library
    sizes (its X is read only for posterior draws). ``latent='prior'`` draws z ~ N(0, I);
    ``'posterior'`` encodes a random training cell of the type and draws z from its
    posterior N(mean, var), which keeps z where the decoder was trained; with ``posteriors``
    (see :class:`Posteriors`, or the path of its file; used by posterior draws only) no cell is
    encoded here, otherwise each drawn cell is, once. ``origins='balanced'`` picks the training
    cells whose posteriors give a type's latents as random permutations of them, each cell once
    before any twice, so that no two simulated cells share a posterior while the type has training
    cells left; ``'independent'`` picks each at random, with repeats. With
    ``library_sizes='resampled'`` each cell's expected counts are rescaled to the library
    size of a random training cell of its type; ``'paired'`` (posterior draws only) to the library
    size of the training cell whose posterior gave its latent, so that depth stays with the cell
    state it came with; ``'decoded'`` keeps the decoder's own total
    (only for models whose decoder gives counts, not proportions). ``count_sampling`` (see
    :func:`~cvaesim.counts.draw_counts`) defaults to the model's own likelihood: negative
    binomial with its learned dispersions for a ``negative_binomial`` model, else Poisson.
    ``calibration='type_means'`` rescales each gene's expression in every cell of a type by
    one factor, so that the type's mean share of each gene (over ``CALIBRATION_CELLS`` decoded
    cells: saved with ``posteriors`` by the train rule, else decoded here once per call of
    :meth:`batches`) equals its share of the type's training counts; cell-to-cell variation is kept.
    ``'type_moments'`` does the same and, for each gene whose simulated counts would vary less
    than the type's training counts, replaces the Poisson draw by a negative binomial whose
    dispersion makes up the difference (Poisson sampling only). ``'type_quantiles'`` draws counts
    around the decoded profiles as they are, then, in each batch and gene, gives the cells the
    type's training counts at the ranks their drawn counts hold among the batch's (see
    :func:`rank_matched`): each gene keeps its training distribution, the model decides which cells
    are high and which low. ``None``: ``type_moments`` with Poisson sampling, else ``type_means``.
    """

    def __init__(self, model: ConditionalConvVAE, store_meta: ad.AnnData, batch_size: int = 256,
                 count_sampling: str | None = None, library_sizes: str = "resampled", latent: str = "prior",
                 posteriors: Posteriors | str | Path | None = None, calibration: str | None = "none",
                 origins: str = "balanced"):
        check_store(store_meta, model)
        loss = getattr(model, "reconstruction_loss", "mse")
        if count_sampling is None:  # the model's own likelihood
            count_sampling = "negative_binomial" if loss == "negative_binomial" else "poisson"
        if calibration is None:  # the workflow's choice where it applies: its extra variance replaces Poisson draws
            calibration = "type_moments" if count_sampling == "poisson" else "type_means"
        if count_sampling not in COUNT_SAMPLING:
            raise ValueError(f"unknown count sampling {count_sampling!r}; choose one of {COUNT_SAMPLING}")
        if library_sizes not in LIBRARY_SIZES:
            raise ValueError(f"unknown library sizes {library_sizes!r}; choose one of {LIBRARY_SIZES}")
        if latent not in LATENT_DRAWS:
            raise ValueError(f"unknown latent draws {latent!r}; choose one of {LATENT_DRAWS}")
        if library_sizes == "paired" and latent != "posterior":
            raise ValueError("paired library sizes come with the training cell whose posterior gives the latent: "
                             "they need posterior latent draws")
        if calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {calibration!r}; choose one of {CALIBRATIONS}")
        if origins not in ORIGINS:
            raise ValueError(f"unknown origins {origins!r}; choose one of {ORIGINS}")
        if calibration == "type_moments" and count_sampling != "poisson":
            raise ValueError(f"calibration 'type_moments' sets its own negative-binomial draw around Poisson "
                             f"sampling; it cannot be combined with {count_sampling!r} count sampling")
        self.proportions = loss in COUNT_LOSSES
        if self.proportions and library_sizes == "decoded":
            raise ValueError(f"a {loss} model decodes proportions, not totals: library sizes must be 'resampled' "
                             f"or 'paired'")
        if library_sizes == "decoded" and store_meta.uns["image"]["scaling"] == "log1p_cp10k_gene_max":
            raise ValueError("a model of library-normalised images decodes counts per 10,000, not totals: "
                             "library sizes must be 'resampled' or 'paired'")
        if count_sampling == "negative_binomial" and loss != "negative_binomial":
            raise ValueError(f"negative-binomial count sampling needs the dispersions of a model trained with the "
                             f"negative_binomial loss; this one was trained with {loss}")
        self.model = model
        self.latent = latent
        self.batch_size = batch_size
        self.count_sampling = count_sampling
        self.library_sizes = library_sizes
        self.calibration = calibration
        self.origins = origins
        self.cell_types = list(store_meta.obs["cell_type"].cat.categories)
        self.saved_share_moments = None  # the decoded cells' share moments saved with the posteriors
        self.pixel = store_meta.var["pixel"].to_numpy()
        self.scale = store_meta.var["scale"].to_numpy()
        self.scaling = store_meta.uns["image"]["scaling"]
        self.var = store_meta.var.drop(columns=["pixel", "scale"])
        # Each gene's learned dispersion, in the genes' order (the loss indexes it by pixel).
        self.dispersion = (np.exp(np.asarray(model.dispersion.log_theta, dtype=np.float64))[self.pixel]
                           if count_sampling == "negative_binomial" else None)
        is_training = (store_meta.obs["split"] == "train").to_numpy()
        training = store_meta.obs[is_training]
        self.training_totals = training["total_counts"].to_numpy()
        self.training_libraries = {
            name: group["total_counts"].to_numpy() for name, group in training.groupby("cell_type", observed=True)
        }
        if calibration in MOMENT_CALIBRATIONS:
            self.training_moments = gene_moments_by_type(store_meta, np.flatnonzero(is_training))
        if calibration == "type_quantiles":
            self.training_counts = sorted_counts_by_type(store_meta, np.flatnonzero(is_training))
        if latent == "posterior":
            self.training_rows = {name: np.flatnonzero(training["cell_type"].to_numpy() == name)
                                  for name in self.training_libraries}
            if isinstance(posteriors, (str, Path)):
                posteriors = Posteriors.load(posteriors)
            if posteriors is not None:
                if not np.array_equal(posteriors.cells, training.index.to_numpy(dtype=str)):
                    raise InputError(f"{posteriors.source}: its cells are not the training cells of this image "
                                     f"store; rerun the train rule")
                if posteriors.z_mean.shape[1] != model.latent_dim:
                    raise InputError(f"{posteriors.source}: {posteriors.z_mean.shape[1]} latent dimensions, the "
                                     f"model has {model.latent_dim}; it belongs to another model")
                self.z_mean, self.z_log_var = posteriors.z_mean, posteriors.z_log_var
                self.is_encoded = np.ones(len(training), dtype=bool)
                self.saved_share_moments = posteriors.share_moments_by_type(self.cell_types, len(self.pixel))
            else:
                # Each training cell is encoded once, when first drawn: large simulations reuse them.
                self.side = int(store_meta.uns["image"]["side"])
                self.training_values = sp.csr_matrix(store_meta.X[np.flatnonzero(is_training)])
                self.z_mean = np.zeros((len(training), model.latent_dim), dtype=np.float32)
                self.z_log_var = np.zeros_like(self.z_mean)
                self.is_encoded = np.zeros(len(training), dtype=bool)

    def check(self, cells_per_type: dict[str, int]) -> None:
        unknown = sorted(set(cells_per_type) - set(self.cell_types))
        if unknown:
            raise ValueError(f"unknown cell types {unknown}; the model knows {self.cell_types}")

    def batches(self, cells_per_type: dict[str, int], seed: int, truth: ExpectedExpression | None = None
                ) -> Iterator[tuple[sp.csr_matrix, str]]:
        """Yield (integer counts of up to ``batch_size`` cells, their cell type), seeded.

        Each batch draws from its own random stream (spawned from ``seed``), so the next batch
        is decoded (and calibrated) in a second thread while this one's counts are drawn and written.
        ``truth``, where given, gathers what each yielded batch's counts were drawn around.
        """
        self.check(cells_per_type)
        if self.latent == "posterior":
            # Beyond one cell per training cell, posteriors repeat: cells drawn from one posterior
            # cluster together, and the type varies less than its real cells (docs/record.md, ninth session).
            repeated = [f"{name}: {n} from {len(self.training_rows[name])}" for name, n in cells_per_type.items()
                        if n > len(self.training_rows[name])]
            if repeated:
                log.warning("more cells asked than the type has training cells (%s): posterior draws repeat "
                            "training cells, so these types will vary less than real cells", ", ".join(repeated))
        if self.calibration == "type_quantiles":
            few = [f"{name}: {n}" for name, n in cells_per_type.items() if 0 < n < FEW_RANKED_CELLS]
            if few:
                log.warning("type_quantiles ranks each gene's counts among the cells of a type simulated together; "
                            "with fewer than %d (%s) the model's structure is mostly lost and the genes' counts are "
                            "close to independent draws from the training cells", FEW_RANKED_CELLS, ", ".join(few))
        # A type's cells (by their index among the type's) in batches of about equal size: no small last batch,
        # whose cells type_quantiles would rank among too few others.
        plan = [(cell_type, cells) for cell_type, n_cells in cells_per_type.items() if n_cells > 0
                for cells in np.array_split(np.arange(n_cells), math.ceil(n_cells / self.batch_size))]
        # One more stream for the calibration and one for the origins: the batches' own streams stay those of a
        # run without them.
        *streams, calibration_stream, origins_stream = np.random.SeedSequence(seed).spawn(len(plan) + 2)
        origins = {}
        if self.latent == "posterior" and self.origins == "balanced":
            # Drawn for all of a type's cells at once, so that its batches do not repeat each other's.
            origins_rng = np.random.default_rng(origins_stream)
            origins = {name: balanced_draws(self.training_rows[name], n, origins_rng)
                       for name, n in cells_per_type.items() if n > 0}
        calibrations = {}
        if self.calibration in MOMENT_CALIBRATIONS:
            moments = self.saved_share_moments or self.share_moments(list(cells_per_type),
                                                                     np.random.default_rng(calibration_stream))
            calibrations = self.calibrate({name: moments[name] for name in cells_per_type})
        pending = None
        with ThreadPoolExecutor(max_workers=1) as decoding:
            for (cell_type, cells), stream in zip(plan, streams):
                rng = np.random.default_rng(stream)
                calibration = calibrations.get(cell_type)
                rows = origins[cell_type][cells] if origins else None
                expected = decoding.submit(self.expected_profiles, cell_type, len(cells), rng, calibration, rows)
                if pending is not None:
                    yield self.draw_cells(*pending)
                pending = expected, cell_type, rng, calibration, truth
            if pending is not None:
                yield self.draw_cells(*pending)
        log.info("simulated %s", ", ".join(f"{n} cells of {name}" for name, n in cells_per_type.items()))

    def decode(self, cell_type: str, n: int, rng: np.random.Generator, origins: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Expression profiles of ``n`` cells of the type, in the genes' order (rows need not sum to one),
        and the training cells (rows of the training split) whose posteriors gave their latents (prior: None):
        ``origins`` where given, else drawn at random."""
        labels = np.broadcast_to(np.eye(len(self.cell_types), dtype=np.float32)[self.cell_types.index(cell_type)],
                                 (n, len(self.cell_types)))
        latent, origins = self.draw_latent(cell_type, labels, rng, origins)
        decoded = from_images(np.asarray(self.model.decoder.predict_on_batch([latent, labels])), self.pixel)
        if self.proportions:
            # Softmax without the division: draw_counts normalises each row itself.
            return np.exp(decoded - decoded.max(axis=1, keepdims=True)), origins
        return np.maximum(unscale(decoded.astype(np.float64), self.scale, self.scaling), 0.0), origins

    def expected_profiles(self, cell_type: str, n: int, rng: np.random.Generator,
                          calibration: Calibration | None = None, origins: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (and calibrated) profiles of ``n`` cells with their library sizes."""
        profiles, origins = self.decode(cell_type, n, rng, origins)
        if self.library_sizes == "resampled":
            totals = rng.choice(self.training_libraries[cell_type], size=len(profiles))
        elif self.library_sizes == "paired":
            totals = self.training_totals[origins]
        else:
            totals = profiles.sum(axis=1)
        if calibration is not None:
            profiles = profiles * calibration.factors  # float64, as the factors
        return profiles, totals

    def draw_cells(self, expected: Future, cell_type: str, rng: np.random.Generator,
                   calibration: Calibration | None = None, truth: ExpectedExpression | None = None
                   ) -> tuple[sp.csr_matrix, str]:
        """Integer counts around the expected profiles of one batch."""
        profiles, totals = expected.result()
        if calibration is not None and calibration.dispersion is not None:  # type_moments
            counts = draw_counts(profiles, totals, "negative_binomial", rng, calibration.dispersion)
        else:
            counts = draw_counts(profiles, totals, self.count_sampling, rng, self.dispersion)
        if self.calibration == "type_quantiles":
            counts = rank_matched(counts, self.training_counts[cell_type], rng)
        if truth is not None:
            # Rounded counts are fixed by their profiles, and rank-matched ones are, gene by gene, the training
            # quantiles at fixed ranks whichever cell gets which: either way the counts are their own expectation.
            fixed = self.count_sampling == "round" or self.calibration == "type_quantiles"
            truth.add(cell_type, counts.toarray() if fixed else expected_counts(profiles, totals))
        return counts, cell_type

    def share_moments(self, cell_types: list[str], rng: np.random.Generator
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per type, each gene's mean share of a decoded cell's expression and its mean square,
        over ``CALIBRATION_CELLS`` decoded cells."""
        moments = {}
        for cell_type in cell_types:
            share_sum, share_squares = np.zeros(len(self.pixel)), np.zeros(len(self.pixel))
            for start in range(0, CALIBRATION_CELLS, self.batch_size):
                profiles, _ = self.decode(cell_type, min(self.batch_size, CALIBRATION_CELLS - start), rng)
                sums = profiles.sum(axis=1, keepdims=True)
                shares = profiles / np.where(sums > 0, sums, 1.0)
                share_sum += shares.sum(axis=0)
                share_squares += (shares * shares).sum(axis=0)
            moments[cell_type] = share_sum / CALIBRATION_CELLS, share_squares / CALIBRATION_CELLS
        return moments

    def calibrate(self, share_moments: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Calibration]:
        """Per type, each gene's factor from its mean decoded share to its share of the training counts
        and, for ``type_moments``, the dispersion that brings its variance to the training cells'."""
        calibrations = {}
        for cell_type, (mean_share, mean_square) in share_moments.items():
            real_mean, real_variance = self.training_moments[cell_type]
            # A gene the decoder never expresses in this type cannot be scaled up: it stays at zero.
            factors = np.divide(real_mean / max(real_mean.sum(), 1e-300), mean_share, out=np.zeros(len(self.pixel)),
                                where=mean_share > 0)
            dispersion = None
            if self.calibration == "type_moments":
                # Expected count mu = library x share x factor, the library taken as independent of the
                # share (paired libraries are not quite): a Poisson around mu varies by E[mu] + Var[mu];
                # a negative binomial adds E[mu^2] / theta.
                libraries = self.training_libraries[cell_type].astype(np.float64)
                mu_mean = libraries.mean() * mean_share * factors
                mu_square = (libraries**2).mean() * mean_square * factors**2
                shortfall = real_variance - (mu_mean + mu_square - mu_mean**2)
                # Genes never drawn (mu = 0) stay Poisson: a zero dispersion would divide by zero.
                dispersion = np.divide(mu_square, shortfall, out=np.full(len(self.pixel), np.inf),
                                       where=(shortfall > 0) & (mu_square > 0))
            calibrations[cell_type] = Calibration(factors, dispersion)
        log.info("calibrated %d cell types (%s) on %d decoded cells each%s", len(calibrations), self.calibration,
                 CALIBRATION_CELLS, " (saved with the posteriors)" if self.saved_share_moments else "")
        return calibrations

    def draw_latent(self, cell_type: str, labels: np.ndarray, rng: np.random.Generator,
                    origins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Latent draws, with the training cells whose posteriors they came from (``origins``, else drawn at
        random; prior draws: None)."""
        n = len(labels)
        epsilon = rng.standard_normal((n, self.model.latent_dim))
        if self.latent == "prior":
            return epsilon.astype(np.float32), None
        rows = rng.choice(self.training_rows[cell_type], size=n) if origins is None else origins
        self.encode(np.unique(rows[~self.is_encoded[rows]]), labels[0])
        z_mean, z_log_var = self.z_mean[rows].astype(np.float64), self.z_log_var[rows].astype(np.float64)
        return (z_mean + np.exp(0.5 * z_log_var) * epsilon).astype(np.float32), rows

    def encode(self, rows: np.ndarray, label: np.ndarray) -> None:
        """Posterior mean and log-variance of these training cells (all of one type)."""
        if not len(rows):
            return
        labels = np.broadcast_to(label, (len(rows), label.size))
        self.z_mean[rows], self.z_log_var[rows] = encode_cells(
            self.model.encoder, self.training_values, rows, labels, self.pixel, self.side, self.batch_size)
        self.is_encoded[rows] = True

    def to_anndata(self, cells_per_type: dict[str, int], seed: int, truth: ExpectedExpression | None = None
                   ) -> ad.AnnData:
        """All requested cells in memory; for many cells, write :meth:`batches` as they come."""
        blocks, labels = [], []
        for counts, cell_type in self.batches(cells_per_type, seed, truth):
            blocks.append(counts)
            labels.extend([cell_type] * counts.shape[0])
        counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.pixel)), dtype=np.int32)
        obs = pd.DataFrame({"cell_type": pd.Categorical(labels, categories=self.cell_types)},
                           index=cell_names(len(labels)))
        simulated = ad.AnnData(X=counts, obs=obs, var=self.var)
        simulated.uns["simulation"] = self.settings(seed)
        return simulated

    def settings(self, seed: int) -> dict:
        settings = {"seed": seed, "count_sampling": self.count_sampling, "library_sizes": self.library_sizes,
                    "latent": self.latent, "calibration": self.calibration}
        if self.latent == "posterior":
            settings["origins"] = self.origins
        return settings


class ExpectedExpression:
    """The known truth behind a set of simulated cells: per cell type, each gene's mean over the type's
    cells of the mean its count was drawn from (``mean_count``), and of that mean per 10,000 of the cell's
    expected counts (``mean_per_10k``: what library-normalised expression averages to). Differential
    expression between simulated types is measured against these; the drawn counts scatter around them."""

    def __init__(self, genes: pd.Index):
        self.genes = genes
        self.cells: dict[str, int] = {}
        self.count_sums: dict[str, np.ndarray] = {}
        self.per_10k_sums: dict[str, np.ndarray] = {}

    def add(self, cell_type: str, expected: np.ndarray) -> None:
        """One batch of cells of a type: their expected counts (cells x genes)."""
        totals = expected.sum(axis=1, keepdims=True)
        per_10k = np.divide(expected, totals, out=np.zeros(expected.shape), where=totals > 0) * 1e4
        self.cells[cell_type] = self.cells.get(cell_type, 0) + len(expected)
        self.count_sums[cell_type] = self.count_sums.get(cell_type, 0.0) + expected.sum(axis=0)
        self.per_10k_sums[cell_type] = self.per_10k_sums.get(cell_type, 0.0) + per_10k.sum(axis=0)

    def table(self) -> pd.DataFrame:
        """One row per simulated type and gene, the types in the order they were simulated."""
        return pd.concat([pd.DataFrame({"cell_type": cell_type, "gene": self.genes,
                                        "mean_count": self.count_sums[cell_type] / n,
                                        "mean_per_10k": self.per_10k_sums[cell_type] / n})
                          for cell_type, n in self.cells.items()], ignore_index=True)


@dataclass(frozen=True)
class Calibration:
    """One cell type's per-gene factors on the decoded profiles and, optionally, negative-binomial dispersions."""

    factors: np.ndarray
    dispersion: np.ndarray | None = None  # inf: Poisson


@dataclass(frozen=True)
class SortedColumns:
    """Each gene's counts over a set of cells, in order, kept sparse: the zeros counted, the rest sorted."""

    n_cells: int
    zeros: np.ndarray  # per gene
    indptr: np.ndarray  # gene g's non-zero counts are values[indptr[g]:indptr[g + 1]]
    values: np.ndarray

    @classmethod
    def of(cls, counts: sp.spmatrix) -> SortedColumns:
        columns = sp.csc_matrix(counts, dtype=np.float64)
        columns.data = np.rint(columns.data)  # unscaled counts are integers up to floating-point error
        columns.eliminate_zeros()
        gene = np.repeat(np.arange(columns.shape[1]), np.diff(columns.indptr))
        values = columns.data[np.lexsort((columns.data, gene))].astype(np.int32)
        return cls(columns.shape[0], columns.shape[0] - np.diff(columns.indptr), columns.indptr, values)

    def quantiles(self, ranks: np.ndarray) -> np.ndarray:
        """The counts at these positions in [0, 1] (cells x genes) of each gene's distribution."""
        position = np.minimum((ranks * self.n_cells).astype(np.int64), self.n_cells - 1)
        nonzero = position >= self.zeros
        gene = np.broadcast_to(np.arange(ranks.shape[1]), ranks.shape)[nonzero]
        counts = np.zeros(ranks.shape, dtype=np.int32)
        counts[nonzero] = self.values[self.indptr[gene] + position[nonzero] - self.zeros[gene]]
        return counts


def check_store(store_meta: ad.AnnData, model: ConditionalConvVAE) -> None:
    """Refuse, naming the file, a store that the reshape rule did not write or that belongs to another model."""
    source = store_meta.filename or "the image store"
    missing = ([f"var['{key}']" for key in ("pixel", "scale") if key not in store_meta.var]
               + [f"obs['{key}']" for key in ("cell_type", "split", "total_counts") if key not in store_meta.obs]
               + ([] if "image" in store_meta.uns else ["uns['image']"]))
    if missing and "pixel" in store_meta.var and "image" in store_meta.uns:  # an earlier version's store
        raise InputError(f"{source}: an image store written by an earlier version of the workflow (no "
                         f"{', '.join(missing)}); rerun it from the reshape rule (snakemake --forcerun reshape) "
                         f"and simulate with the model trained on the new store")
    if missing:
        raise InputError(f"{source}: not an image store written by the reshape rule (no {', '.join(missing)}); "
                         f"give the images.h5ad the model was trained on")
    store = {"image side": int(store_meta.uns["image"]["side"]),
             "cell types": len(store_meta.obs["cell_type"].cat.categories)}
    trained = {"image side": model.image_side, "cell types": model.hyperparameters["n_cell_types"]}
    if model.hyperparameters["n_genes"] is not None:  # an MSE model's image holds the genes without saying how many
        store["genes"], trained["genes"] = store_meta.n_vars, model.hyperparameters["n_genes"]
    if store != trained:
        store_sizes, trained_sizes = (", ".join(f"{key} {value}" for key, value in sizes.items())
                                      for sizes in (store, trained))
        raise InputError(f"{source}: {store_sizes}, but the model was trained on a store with {trained_sizes}; "
                         f"give the images.h5ad it was trained on")


def balanced_draws(members: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``members``, each once before any twice: random permutations of them, the last cut short."""
    return np.concatenate([rng.permutation(members) for _ in range(math.ceil(n / len(members)))])[:n]


def count_chunks(store: ad.AnnData, rows: np.ndarray, chunk_size: int = 4096
                 ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """The counts of the store's cells ``rows`` (ascending) with their cell-type codes, a chunk at a time."""
    codes = store.obs["cell_type"].cat.codes.to_numpy()
    scale, scaling = store.var["scale"].to_numpy(), store.uns["image"]["scaling"]
    totals = store.obs["total_counts"].to_numpy()
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        yield codes[chunk], unscale_counts(sp.csr_matrix(store.X[chunk]), scale, scaling, totals[chunk])


def gene_moments_by_type(store: ad.AnnData, rows: np.ndarray, chunk_size: int = 4096
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each cell type's per-gene mean and variance of the counts of its cells among ``rows`` (ascending)."""
    cell_types = store.obs["cell_type"].cat.categories
    sums, squares = np.zeros((len(cell_types), store.n_vars)), np.zeros((len(cell_types), store.n_vars))
    n_cells = np.zeros(len(cell_types))
    for codes, counts in count_chunks(store, rows, chunk_size):
        membership = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                                   shape=(len(cell_types), len(codes)))
        sums += (membership @ counts).toarray()
        squares += (membership @ counts.multiply(counts)).toarray()
        n_cells += np.bincount(codes, minlength=len(cell_types))
    n_cells = np.maximum(n_cells, 1)[:, np.newaxis]
    means = sums / n_cells
    return {name: (mean, np.maximum(square / n - mean**2, 0.0))
            for name, mean, square, n in zip(cell_types, means, squares, n_cells)}


def rank_matched(counts: sp.csr_matrix, training: SortedColumns, rng: np.random.Generator) -> sp.csr_matrix:
    """Each gene's counts over these cells replaced by the training counts at the same rank (ties in random order):
    the genes keep the training cells' distribution, the cells keep the model's order within each gene."""
    dense = counts.toarray()
    # A random fraction below one breaks ties between equal counts and keeps every other order.
    order = np.argsort(dense + rng.random(dense.shape) * 0.5, axis=0)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(len(dense))[:, np.newaxis], axis=0)
    return sp.csr_matrix(training.quantiles((ranks + 0.5) / len(dense)))


def sorted_counts_by_type(store: ad.AnnData, rows: np.ndarray, chunk_size: int = 4096) -> dict[str, SortedColumns]:
    """Each cell type's counts of its cells among ``rows`` (ascending), sorted gene by gene."""
    parts = {}
    for codes, counts in count_chunks(store, rows, chunk_size):
        for code in np.unique(codes):
            parts.setdefault(code, []).append(counts[codes == code])
    return {store.obs["cell_type"].cat.categories[code]: SortedColumns.of(sp.vstack(blocks))
            for code, blocks in parts.items()}


def encode_cells(encoder, values, rows: np.ndarray, labels: np.ndarray, pixel: np.ndarray, side: int,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and log-variances of ``values[rows]`` (sparse scaled values, in memory or
    backed; ``rows`` ascending), read and densified a batch at a time."""
    z_mean, z_log_var = [], []
    for start in range(0, len(rows), batch_size):
        images = to_images(values[rows[start:start + batch_size]], pixel, side)
        mean, log_var = encoder.predict_on_batch([images, labels[start:start + batch_size]])
        z_mean.append(np.asarray(mean))
        z_log_var.append(np.asarray(log_var))
    return np.concatenate(z_mean), np.concatenate(z_log_var)


@dataclass(frozen=True)
class Posteriors:
    """The posterior N(z_mean, exp(z_log_var)) of every training cell, computed once after training."""

    cells: np.ndarray  # the training cells' names, in the image store's order
    z_mean: np.ndarray
    z_log_var: np.ndarray
    source: str = "posteriors"  # for messages
    # Cell types x genes: the mean share and mean squared share of each gene in cells decoded from
    # these posteriors, for calibrated simulations (see Simulator.share_moments); optional.
    share_mean: np.ndarray | None = None
    share_square: np.ndarray | None = None

    @classmethod
    def of_training_cells(cls, model: ConditionalConvVAE, store: ad.AnnData, batch_size: int = 256,
                          seed: int = 0) -> "Posteriors":
        """Encodes every training cell, then decodes cells of each type for the calibration's share
        moments (seeded), so that simulations need not decode them each time."""
        rows = np.flatnonzero((store.obs["split"] == "train").to_numpy())
        codes = store.obs["cell_type"].cat.codes.to_numpy()[rows]
        labels = np.eye(len(store.obs["cell_type"].cat.categories), dtype=np.float32)[codes]
        # Read from the store a batch at a time: a copy of PBMC68k's training cells would take 0.5 GB.
        z_mean, z_log_var = encode_cells(model.encoder, store.X, rows, labels, store.var["pixel"].to_numpy(),
                                         int(store.uns["image"]["side"]), batch_size)
        posteriors = cls(store.obs_names[rows].to_numpy(dtype=str), z_mean, z_log_var)
        simulator = Simulator(model, store, batch_size, latent="posterior", posteriors=posteriors)
        moments = simulator.share_moments(list(simulator.training_libraries), np.random.default_rng(seed))
        empty = np.zeros(len(simulator.pixel))  # a type without training cells is never simulated
        return replace(posteriors,
                       share_mean=np.stack([moments.get(name, (empty, empty))[0] for name in simulator.cell_types]),
                       share_square=np.stack([moments.get(name, (empty, empty))[1] for name in simulator.cell_types]))

    def share_moments_by_type(self, cell_types: list[str], n_genes: int
                              ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        if self.share_mean is None or self.share_square is None:
            return None
        if self.share_mean.shape != (len(cell_types), n_genes) or self.share_square.shape != self.share_mean.shape:
            raise InputError(f"{self.source}: its decoded share moments have shape {self.share_mean.shape}, the store "
                             f"has {len(cell_types)} types x {n_genes} genes; rerun the train rule")
        return {name: (self.share_mean[i], self.share_square[i]) for i, name in enumerate(cell_types)}

    def save(self, path) -> None:
        moments = {} if self.share_mean is None else {"share_mean": self.share_mean, "share_square": self.share_square}
        with open(path, "wb") as handle:  # a handle: np.savez would add ".npz" to a temporary name
            np.savez(handle, cells=self.cells, z_mean=self.z_mean, z_log_var=self.z_log_var, **moments)

    @classmethod
    def load(cls, path) -> "Posteriors":
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                # Files written before the share moments were saved have none: simulations decode them.
                moments = ((arrays["share_mean"], arrays["share_square"]) if "share_mean" in arrays.files
                           else (None, None))
                return cls(arrays["cells"], arrays["z_mean"], arrays["z_log_var"], str(path), *moments)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # cut off: BadZipFile
            raise InputError(f"{path}: not a posteriors file written by the train rule, or one cut off ({error})"
                             ) from error


def simulate(
    model: ConditionalConvVAE,
    store_meta: ad.AnnData,
    cells_per_type: dict[str, int],
    seed: int,
    batch_size: int = 256,
    count_sampling: str | None = None,
    library_sizes: str = "resampled",
    latent: str = "prior",
    posteriors: Posteriors | str | Path | None = None,
    calibration: str | None = "none",
    origins: str = "balanced",
) -> ad.AnnData:
    """All requested cells in memory, as one AnnData (see :class:`Simulator`)."""
    return Simulator(model, store_meta, batch_size, count_sampling, library_sizes, latent, posteriors,
                     calibration, origins).to_anndata(cells_per_type, seed)
