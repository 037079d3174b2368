"""Box-free readouts of the same forward pass: what survives when no region of interest is given.

The paper's signal is recoverable *given a box* (``roi_local``). These readouts use the
stored patch-token grid of the same forward pass, without a box at test time, and sit
next to ``cls``, ``patch_mean`` and ``roi_local`` in the same tables:

=============  =======================================================================  ==========================
readout        what it is                                                               what it needs
=============  =======================================================================  ==========================
``gem``        generalised-mean pooling of the tokens (signed, around a label-free      training-free pooling;
               token centre), then the usual linear probe                               probe on image labels
``patch_max``  max over tokens of a per-token linear score; the token scorer is        patch labels (boxes on
               trained on tokens under the boxes of positive training images vs        training images)
               tokens of negative training images
``topk_mean``  the mean of the ``top_k`` highest token scores (same scorer)            patch labels
``mil``        multiple-instance learning with image labels only: log-sum-exp          trained head on image
               pooling of a per-token linear score, trained end to end                  labels (no boxes)
=============  =======================================================================  ==========================

:func:`readout_scores` adds out-of-fold scores of every readout to the out-of-fold table
of :func:`cxrcore.probes.out_of_fold_table` (same rows, same patient-grouped folds), so
:func:`cxrcore.stats.auc_table` and :func:`cxrcore.stats.compare_table` compare them with
``cls`` pairwise; :func:`gap_closure_table` reports how much of the ``roi_local`` - ``cls``
gap each closes, its paired test against ``cls`` and its false-positive cost.

Every trained part (the gem probe and token centre, the token scorer, the MIL head) is
fitted on the training folds' images only; a test-fold image or box is never seen
(checked: :func:`readout_scores` refuses folds that share a patient or a forward pass).
Grids are float16 (a panel of one full-width encoder is ~1 GB); everything here reads
them in chunks and converts only a chunk at a time to float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, clone

from .geometry import Geometry

__all__ = ["GeMPooling", "GridView", "LSEMIL", "READOUTS", "READOUT_NEEDS", "TokenScorer", "check_readouts",
           "gap_closure_table", "gem", "needs_table", "readout_scores", "top_k_mean"]

#: The box-free readouts, in the order tables show them.
READOUTS: tuple[str, ...] = ("gem", "patch_max", "topk_mean", "mil")



def check_readouts(readouts, readout_encoders, encoders) -> None:
    """Stop on a notebook's readout parameters before any work: unknown readouts, or readout encoders not encoded."""
    bad = [r for r in readouts if r not in READOUTS]
    if bad:
        raise ValueError(f"readouts {bad}: accepted are {list(READOUTS)}, or [] for none "
                         f"({', '.join(map(str, bad))}: unknown readout)")
    if readouts and not set(readout_encoders) & set(encoders):
        raise ValueError(f"readout_encoders {list(readout_encoders)} share no encoder with encoders {list(encoders)}; "
                         "accepted: a subset of encoders, or readouts=[] to skip the box-free readouts")


#: What each score needs, for the reader to judge a comparison: (training, at test time, kind).
READOUT_NEEDS: dict[str, tuple[str, str, str]] = {
    "cls": ("linear probe on image labels", "nothing", "training-free pooling"),
    "patch_mean": ("linear probe on image labels", "nothing", "training-free pooling"),
    "roi_local": ("linear probe on image labels; a box on every training image", "a box", "box at test time"),
    "gem": ("token centre from training images (no labels); linear probe on image labels", "nothing",
            "training-free pooling"),
    "patch_max": ("token scorer on patch labels (boxes on training images)", "nothing", "patch labels"),
    "topk_mean": ("token scorer on patch labels (boxes on training images)", "nothing", "patch labels"),
    "mil": ("MIL head on image labels only", "nothing", "trained head on image labels"),
}


def needs_table(scores: Sequence[str] = ("cls", "patch_mean", "roi_local", *READOUTS)) -> pd.DataFrame:
    """What each score needs (training, at test time, kind): the column every readout table carries."""
    return pd.DataFrame([{"score": s, "trained on": READOUT_NEEDS[s][0], "at test time": READOUT_NEEDS[s][1],
                          "needs": READOUT_NEEDS[s][2]} for s in scores])


# -- float16 grids, a chunk at a time ---------------------------------------------------------------
@dataclass
class GridView:
    """Rows ``idx`` of a stored grid array ``[n, h, w, D]`` (float16), without copying them.

    ``view[a:b]`` returns those rows as an array (still float16); estimators here take a
    GridView or any array and convert one chunk at a time to float32.
    """

    grid: np.ndarray
    idx: np.ndarray

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.grid[np.asarray(self.idx)[s]]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.idx), *self.grid.shape[1:])


def _chunks(X, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, float32 [b, h*w, D])`` chunks of a grid array or :class:`GridView`."""
    n = len(X)
    for s in range(0, n, size):
        a = np.asarray(X[s:s + size], dtype=np.float32)
        yield s, a.reshape(a.shape[0], -1, a.shape[-1])


def _token_moments(X, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and SD over every token of ``X`` (float64 accumulation)."""
    total, sq, count = None, None, 0
    for _, a in _chunks(X, chunk):
        t = a.reshape(-1, a.shape[-1]).astype(np.float64)
        total = t.sum(0) if total is None else total + t.sum(0)
        sq = (t * t).sum(0) if sq is None else sq + (t * t).sum(0)
        count += t.shape[0]
    if not count:
        raise ValueError("no tokens to fit on: the training set is empty")
    mean = total / count
    sd = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
    return mean, np.where(sd > 0, sd, 1.0)


# -- gem ------------------------------------------------------------------------------------------
def gem(tokens, p: float = 3.0, center: np.ndarray | None = None, *, chunk: int = 32) -> np.ndarray:
    """Signed generalised-mean (GeM) pooling over tokens: ``[B, h, w, D]`` (or ``[B, N, D]``) -> ``[B, D]``.

    Per dimension, ``z = x - center``; ``m = mean_j sign(z_j) |z_j|**p``; the pooled value is
    ``sign(m) |m|**(1/p)``. GeM (Radenovic, Tolias & Chum 2018, "Fine-tuning CNN image
    retrieval with no human annotation", IEEE TPAMI 41:1655) is defined on non-negative
    (post-ReLU) activations, where p = 1 is average and p -> infinity max pooling. ViT
    tokens are signed and a lesion may move a dimension either way, so the power is applied
    to the magnitude and the sign kept (an odd power mean): p = 1 gives ``patch_mean -
    center`` (the same probe as ``patch_mean``), large p the most extreme token per
    dimension, with its sign. ``center`` (a label-free typical token, e.g. the mean token of
    the training images) makes "extreme" mean "atypical" rather than "far from zero".
    """
    if not p >= 1:
        raise ValueError(f"gem: p must be >= 1 (1 = mean pooling), got {p}")
    out = []
    for _, a in _chunks(tokens, chunk):
        z = a - center.astype(np.float32) if center is not None else a
        # scaled by the largest magnitude per image and dimension, so |z|**p cannot overflow float32 for large p
        top = np.abs(z).max(axis=1, keepdims=True)
        top = np.where(top > 0, top, 1.0)
        m = np.mean(np.sign(z) * (np.abs(z) / top) ** p, axis=1)
        out.append(top[:, 0] * np.sign(m) * np.abs(m) ** (1.0 / p))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


class GeMPooling(BaseEstimator):
    """:func:`gem` with its token centre learned (no labels) from training grids: ``fit(X).transform(X)``.

    Attributes: ``center_`` (mean token of the training grids), ``n_images_``.
    """

    def __init__(self, p: float = 3.0, chunk: int = 32):
        self.p = p
        self.chunk = chunk

    def fit(self, X, y=None):
        self.center_, _ = _token_moments(X, self.chunk)
        self.n_images_ = len(X)
        return self

    def transform(self, X) -> np.ndarray:
        return gem(X, self.p, self.center_, chunk=self.chunk)


# -- a per-token linear score from patch labels ---------------------------------------------------------
def top_k_mean(token_scores: np.ndarray, k: int = 1) -> np.ndarray:
    """Mean of the ``k`` largest token scores per image: ``[B, h, w]`` or ``[B, N]`` -> ``[B]`` (k = 1: max)."""
    s = np.asarray(token_scores).reshape(len(token_scores), -1)
    k = int(min(max(k, 1), s.shape[1]))
    return np.partition(s, s.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


class TokenScorer(BaseEstimator):
    """A linear score per token, trained on patch labels: tokens under a positive image's boxes vs a negative's tokens.

    ``fit(X, y, geometries, boxes, groups)``: ``X`` grids ``[B, h, w, D]`` (array or
    :class:`GridView`), ``y`` image labels, ``geometries`` one per grid, ``boxes`` one list
    of boxes (original pixels) per grid. Positive tokens: the cells a box of a ``y == 1``
    image touches (at most ``max_pos_per_image``, drawn at random); negative tokens: any
    cells of a ``y == 0`` image (at most ``max_neg_per_image``). Positive images without a
    box add nothing (no patch label). The scorer is a :class:`cxrcore.probes.LinearProbe`
    (standardised, L2 logistic) with one ``C`` and balanced classes.
    Attributes: ``probe_``, ``train_groups_`` (the image groups it saw), ``n_pos_``, ``n_neg_``.
    """

    def __init__(self, C: float = 0.1, max_pos_per_image: int = 64, max_neg_per_image: int = 64, chunk: int = 32,
                 random_state: int = 0):
        self.C = C
        self.max_pos_per_image = max_pos_per_image
        self.max_neg_per_image = max_neg_per_image
        self.chunk = chunk
        self.random_state = random_state

    def fit(self, X, y, geometries: Sequence[Geometry], boxes: Sequence[Sequence], groups=None):
        from .probes import LinearProbe

        y = np.asarray(y).astype(int)
        n = len(X)
        if not (len(y) == len(geometries) == len(boxes) == n):
            raise ValueError(f"TokenScorer.fit: {n} grids, {len(y)} labels, {len(geometries)} geometries and "
                             f"{len(boxes)} box lists; give one of each per grid")
        groups = np.arange(n) if groups is None else np.asarray(groups)
        rng = np.random.default_rng(self.random_state)
        feats, labels, used = [], [], []
        for s, a in _chunks(X, self.chunk):
            for j in range(a.shape[0]):
                i = s + j
                g = geometries[i]
                if y[i] == 1:
                    if not boxes[i]:
                        continue
                    mask = np.zeros(g.grid, bool)
                    for b in boxes[i]:
                        mask |= g.cell_mask(b)
                    cells = np.flatnonzero(mask.ravel())
                    take = rng.permutation(cells)[: self.max_pos_per_image]
                else:
                    take = rng.permutation(a.shape[1])[: self.max_neg_per_image]
                feats.append(a[j, np.sort(take)])
                labels.append(np.full(len(take), y[i]))
                used.append(groups[i])
        t = np.concatenate(labels) if labels else np.zeros(0, int)
        if not len(t) or np.unique(t).shape[0] < 2:
            raise ValueError("TokenScorer needs positive images with boxes and negative images in its training rows; "
                             f"got {int((t == 1).sum())} positive and {int((t == 0).sum())} negative tokens")
        self.probe_ = LinearProbe(Cs=(self.C,), class_weight="balanced", random_state=self.random_state)
        self.probe_.fit(np.concatenate(feats), t)
        self.train_groups_ = np.unique(np.asarray(used))
        self.n_pos_, self.n_neg_ = int((t == 1).sum()), int((t == 0).sum())
        return self

    def score_tokens(self, X) -> np.ndarray:
        """Token scores ``[B, h, w]`` (float32 logits)."""
        out = []
        shape = X.shape[1:3]
        for _, a in _chunks(X, self.chunk):
            out.append(self.probe_.decision_function(a.reshape(-1, a.shape[-1])).reshape(a.shape[0], *shape))
        return np.concatenate(out).astype(np.float32)


# -- multiple-instance learning with image labels only -----------------------------------------------
class _torch_threads:
    """Set torch's intra-op threads inside a block (None: leave them), restoring them after."""

    def __init__(self, n: int | None):
        self.n, self.prev = n, None

    def __enter__(self):
        if self.n is not None:
            self.prev = torch.get_num_threads()
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.set_num_threads(self.prev)

class LSEMIL(BaseEstimator):
    """Multiple-instance readout trained with image labels only: log-sum-exp pooling of a linear token score.

    Image logit = ``b + (1/r) * log(mean_j exp(r * w . z_j))`` with ``z_j`` the token
    standardised by the training tokens' mean and SD; r -> 0 is a linear probe on the mean
    token (``patch_mean``), large r the max token (the MIL assumption: one positive
    instance makes a positive bag). Log-sum-exp pooling for weakly supervised localisation:
    Pinheiro & Collobert 2015 (CVPR); as a MIL pooling operator: Ilse, Tomczak & Welling
    2018 (ICML), who compare it with attention pooling. Here ``w`` (D weights) and ``b``
    are all that is learned (small on purpose: a few hundred training images), by full-batch
    L-BFGS on the class-balanced logistic loss plus ``weight_decay / 2 * |w|^2``, in float64
    on the CPU, from zero (deterministic: no random initialisation). Bags are streamed in
    chunks of ``chunk`` grids, so float16 grids are never converted all at once (the
    converted training bags are kept between L-BFGS evaluations only up to ``cache_mb``).
    ``threads``: torch threads while fitting and scoring (restored after). 1 by default: the
    ops are small, and on a shared 2-core machine two threads made a 16-element loss ~40x
    slower (thread hand-off); None keeps torch's setting.
    Attributes: ``w_``, ``b_``, ``mean_``, ``scale_``, ``n_iter_``, ``loss_``.
    """

    def __init__(self, r: float = 4.0, weight_decay: float = 1e-2, max_iter: int = 100, chunk: int = 16,
                 random_state: int = 0, threads: int | None = 1, cache_mb: float = 256):
        self.r = r
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.chunk = chunk
        self.random_state = random_state
        self.threads = threads
        self.cache_mb = cache_mb

    def _logits(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Bag logits of raw tokens ``a`` [b, N, D] (float64): standardising is folded into the weights."""
        inv = torch.from_numpy(1.0 / self.scale_)
        s = a @ (w * inv) - (torch.from_numpy(self.mean_) * inv) @ w
        return b + (torch.logsumexp(self.r * s, dim=1) - math.log(s.shape[1])) / self.r

    def _bags(self, X):
        """``(start, float64 tokens)`` per chunk; kept in memory when they fit in ``cache_mb``, else re-read each pass.

        float64: the loss is not convex (softplus of minus a convex pooling for positives), so
        rounding that depends on the chunking would otherwise steer L-BFGS to different
        stationary points.
        """
        per_grid = int(np.prod(X.shape[1:])) * 8
        if per_grid * len(X) <= self.cache_mb * 2**20:
            cached = [(s, torch.from_numpy(a.astype(np.float64))) for s, a in _chunks(X, self.chunk)]
            return lambda: iter(cached)
        return lambda: ((s, torch.from_numpy(a.astype(np.float64))) for s, a in _chunks(X, self.chunk))

    def fit(self, X, y):
        with _torch_threads(self.threads):
            return self._fit(X, y)

    def _fit(self, X, y):
        y = np.asarray(y).astype(np.float64)
        if len(y) != len(X):
            raise ValueError(f"LSEMIL.fit: {len(X)} grids but {len(y)} labels")
        if np.unique(y).shape[0] < 2:
            raise ValueError("LSEMIL needs both classes among its training images")
        self.mean_, self.scale_ = _token_moments(X, self.chunk)
        d = self.mean_.shape[0]
        n_pos = float(y.sum())
        pos_weight = torch.tensor((len(y) - n_pos) / n_pos, dtype=torch.float64)
        yt = torch.from_numpy(y)
        bags = self._bags(X)
        with torch.random.fork_rng():
            torch.manual_seed(self.random_state)
            w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
            b = torch.zeros((), dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(self.max_iter), history_size=10,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)
            n = float(len(y))

            def closure():
                opt.zero_grad()
                total = 0.0
                for s, a in bags():
                    logit = self._logits(a, w, b)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        logit, yt[s:s + a.shape[0]], pos_weight=pos_weight, reduction="sum") / n
                    loss.backward()
                    total += loss.item()
                reg = 0.5 * self.weight_decay * (w * w).sum()
                reg.backward()
                return torch.tensor(total + reg.item(), dtype=torch.float64)

            opt.step(closure)
        self.w_, self.b_ = w.detach().clone(), b.detach().clone()
        self.n_iter_ = int(opt.state[w].get("n_iter", 0))
        self.loss_ = float(closure())
        return self

    def decision_function(self, X) -> np.ndarray:
        with torch.no_grad(), _torch_threads(self.threads):
            return np.concatenate([self._logits(torch.from_numpy(a.astype(np.float64)), self.w_, self.b_).numpy()
                                   for _, a in _chunks(X, self.chunk)])


# -- out-of-fold scores of every readout --------------------------------------------------------------
def _row_boxes(part: pd.DataFrame, box_col: str | None) -> list[list]:
    if box_col is not None:
        return [list(v) if isinstance(v, (list, tuple)) else [] for v in part[box_col]]
    b = part[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    return [[tuple(r)] if np.isfinite(r).all() else [] for r in b]


def readout_scores(oof: pd.DataFrame, grids, label_col: str, *, by=(), fold_col: str = "fold",
                   group_col: str = "patient_id", readouts: Sequence[str] = READOUTS, probe=None, gem_p: float = 3.0,
                   top_k: int = 4, token_C: float = 0.1, mil_r: float = 4.0, mil_weight_decay: float = 1e-2,
                   box_col: str | None = None, seed: int = 0, return_fits: bool = False):
    """Out-of-fold scores of the box-free readouts, added as columns to ``oof``.

    ``oof``: rows with ``label_col``, ``group_col``, ``fold_col`` (e.g. the frame
    :func:`cxrcore.probes.out_of_fold_table` returns: the readouts then share the pooling
    modes' folds, so paired tests apply), ``pass_id`` (which stored grid a row reads) and the
    row's boxes: ``x1..y2`` (NaN: none) or a column ``box_col`` holding a list of boxes per row
    (ChestX-Det10 images with several). ``grids``: a :class:`cxrcore.store.Grids`
    (float16; see :func:`cxrcore.store.read_grids`). ``by``: strata scored separately (e.g.
    ``["cell"]``). Boxes are used only by the token scorer, only of training rows.
    ``return_fits``: also return a list of dicts (stratum, fold, readout, fitted estimator,
    training and test groups), for audits of what each fit saw.
    """
    from .probes import LinearProbe

    unknown = [r for r in readouts if r not in READOUTS]
    if unknown:
        raise ValueError(f"unknown readout(s) {unknown}; known: {list(READOUTS)}")
    by = [by] if isinstance(by, str) else list(by)
    need = [label_col, group_col, fold_col, "pass_id", *by] + ([box_col] if box_col else [])
    missing = [c for c in need if c not in oof.columns]
    if missing:
        raise ValueError(f"readout_scores: oof lacks column(s) {missing}; it has {list(oof.columns)}")
    out = oof.reset_index(drop=True).copy()
    for r in readouts:
        out[r] = np.nan
    fits = []
    probe = LinearProbe() if probe is None else probe
    strata = out.groupby(by, sort=False).indices.items() if by else [((), np.arange(len(out)))]
    for key, idx in strata:
        part = out.iloc[idx]
        pos = grids.index(part["pass_id"].to_numpy())
        y = part[label_col].to_numpy().astype(int)
        folds = part[fold_col].to_numpy()
        groups = part[group_col].to_numpy()
        boxes = _row_boxes(part, box_col)
        label = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for f in np.unique(folds):
            test, train = folds == f, folds != f
            shared = set(groups[test]) & set(groups[train])
            if shared:
                raise ValueError(f"stratum {label}, fold {f}: patient(s) {sorted(shared)[:3]} in both the training and "
                                 "the test rows; folds must be grouped by patient (cxrcore.probes.grouped_folds)")
            if set(pos[test]) & set(pos[train]):
                raise ValueError(f"stratum {label}, fold {f}: a stored forward pass is read by a training and a test row")
            tr_pass = np.unique(pos[train])
            te_pass, te_inv = np.unique(pos[test], return_inverse=True)
            tr_rows = np.flatnonzero(train)
            te_rows = idx[test]
            view_tr, view_te = GridView(grids.grid, tr_pass), GridView(grids.grid, te_pass)
            info = {"stratum": label, "fold": int(f), "train_groups": np.unique(groups[train]),
                    "test_groups": np.unique(groups[test])}
            if "gem" in readouts:
                pool = GeMPooling(p=gem_p).fit(view_tr)
                # rows of one pass share its pooled vector (a panel's unperturbed image in several cells)
                x_tr = pool.transform(GridView(grids.grid, pos[train]))
                x_te = pool.transform(view_te)[te_inv.reshape(-1)]
                est = clone(probe).fit(x_tr, y[train], groups=groups[train])
                out.loc[te_rows, "gem"] = est.decision_function(x_te)
                fits.append({**info, "readout": "gem", "estimator": (pool, est)})
            if "patch_max" in readouts or "topk_mean" in readouts:
                scorer = TokenScorer(C=token_C, random_state=seed).fit(
                    GridView(grids.grid, pos[train]), y[train], [grids.geometry[p] for p in pos[train]],
                    [boxes[i] for i in tr_rows], groups=groups[train])
                ts = scorer.score_tokens(view_te)
                if "patch_max" in readouts:
                    out.loc[te_rows, "patch_max"] = top_k_mean(ts, 1)[te_inv.reshape(-1)]
                if "topk_mean" in readouts:
                    out.loc[te_rows, "topk_mean"] = top_k_mean(ts, top_k)[te_inv.reshape(-1)]
                fits.append({**info, "readout": "token_scorer", "estimator": scorer})
            if "mil" in readouts:
                mil = LSEMIL(r=mil_r, weight_decay=mil_weight_decay, random_state=seed).fit(
                    GridView(grids.grid, pos[train]), y[train])
                out.loc[te_rows, "mil"] = mil.decision_function(view_te)[te_inv.reshape(-1)]
                fits.append({**info, "readout": "mil", "estimator": mil})
    return (out, fits) if return_fits else out


# -- how much of the roi_local - cls gap a readout closes ---------------------------------------------
def _fpr_at_sensitivity(y: np.ndarray, s: np.ndarray, sensitivity: float) -> tuple[float, int, int]:
    """FPR at the highest threshold that keeps at least ``sensitivity`` of positives: (fpr, false positives, negatives)."""
    pos, neg = np.sort(s[y == 1]), s[y == 0]
    k = int(math.floor((1.0 - sensitivity) * len(pos) + 1e-9))  # positives that may fall below the threshold
    t = pos[min(k, len(pos) - 1)]
    fp = int((neg >= t).sum())
    return fp / len(neg), fp, len(neg)


def gap_closure_table(scores: pd.DataFrame, label_col: str, *, readouts: Sequence[str] = READOUTS, by=(),
                      group_col: str = "patient_id", n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                      min_gap: float = 0.05, sensitivity: float = 0.9) -> pd.DataFrame:
    """Per stratum and score: AUC, the share of the ``roi_local`` - ``cls`` gap closed, the paired test against ``cls``,
    and the false-positive cost on lesion-free images.

    ``scores``: one row per image with a score column per pooling mode and readout (e.g.
    :func:`readout_scores`' output). Columns returned, one row per (stratum, score):
    ``auc`` [``auc_ci_low``, ``auc_ci_high``] (:func:`cxrcore.stats.auc_table`, patient
    bootstrap); ``gap`` = AUC(roi_local) - AUC(cls); ``closure`` = (AUC - AUC(cls)) / gap
    with a percentile CI over the same patient-bootstrap replicates (NaN where the gap is
    below ``min_gap``: there is nothing to close); ``delta`` = AUC - AUC(cls) with its CI,
    ``p_value`` and ``p_adj`` (:func:`cxrcore.stats.compare_table`, BH within each score);
    ``fpr`` = the false-positive rate on the negative (lesion-free) images at the threshold
    that keeps ``sensitivity`` of the positives (the highest such threshold), with a Wilson
    CI given that threshold; ``fpr_cls`` the same for ``cls``; and ``needs`` (what the
    score needs: training-free, image labels, patch labels, a box).
    """
    from statsmodels.stats.proportion import proportion_confint

    from .stats import auc_table, bootstrap_auc, compare_table

    by = [by] if isinstance(by, str) else list(by)
    cols = ["cls", "patch_mean", "roi_local", *readouts]
    missing = [c for c in cols + [label_col, group_col, *by] if c not in scores.columns]
    if missing:
        raise ValueError(f"gap_closure_table: scores lack column(s) {missing}")
    aucs = auc_table(scores, cols, label_col, by=by or None, score_name="score", group_col=group_col, n_boot=n_boot,
                     ci=ci, seed=seed)
    tests = compare_table(scores, cols, label_col, pairs=[(c, "cls") for c in cols if c != "cls"], by=by or None,
                          family=["a"], group_col=group_col, ci=ci, seed=seed)
    rows = []
    strata = scores.groupby(by, sort=False) if by else [((), scores)]
    for k_stratum, (key, part) in enumerate(strata):
        label = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        y = part[label_col].to_numpy().astype(int)
        g = part[group_col].to_numpy()
        # the same seed for every call (a fresh SeedSequence each time: spawning advances one): the replicates are
        # then the same resamples of patients (checked below), so the three AUCs of a replicate come from the same
        # data and their ratio is a replicate of the closure
        def ss() -> np.random.SeedSequence:
            return np.random.SeedSequence([int(seed), k_stratum])

        ref = bootstrap_auc(y, part["roi_local"].to_numpy(), score_b=part["cls"].to_numpy(), groups=g, n_boot=n_boot,
                            ci=ci, seed=ss())
        gap = ref.auc - ref.auc_b
        rep_gap = ref.replicates[:, 0] - ref.replicates[:, 1]
        fpr_cls = _fpr_at_sensitivity(y, part["cls"].to_numpy(), sensitivity)[0]
        for c in cols:
            s = part[c].to_numpy()
            if c in ("cls", "roi_local"):
                closure, lo, hi = (0.0 if c == "cls" else 1.0), np.nan, np.nan
            else:
                b = bootstrap_auc(y, s, score_b=part["cls"].to_numpy(), groups=g, n_boot=n_boot, ci=ci, seed=ss())
                if not np.array_equal(b.replicates[:, 1], ref.replicates[:, 1], equal_nan=True):
                    raise RuntimeError("cxrcore.stats.bootstrap_auc no longer draws the same resamples for the same "
                                       "seed and labels; gap_closure_table needs aligned replicates to form the ratio")
                if abs(gap) < min_gap:
                    closure, lo, hi = np.nan, np.nan, np.nan
                else:
                    closure = (b.auc - b.auc_b) / gap
                    with np.errstate(divide="ignore", invalid="ignore"):
                        rep = (b.replicates[:, 0] - b.replicates[:, 1]) / rep_gap
                    rep = rep[np.isfinite(rep)]
                    lo, hi = np.quantile(rep, [(1 - ci) / 2, 1 - (1 - ci) / 2]) if len(rep) else (np.nan, np.nan)
            fpr, fp, n_neg = _fpr_at_sensitivity(y, s, sensitivity)
            f_lo, f_hi = proportion_confint(fp, n_neg, alpha=1 - ci, method="wilson")
            rows.append({**label, "score": c, "gap": gap, "closure": closure, "closure_ci_low": lo,
                         "closure_ci_high": hi, "fpr": fpr, "fpr_ci_low": f_lo, "fpr_ci_high": f_hi,
                         "fpr_cls": fpr_cls, "sensitivity": sensitivity})
    res = pd.DataFrame(rows)
    a = aucs.rename(columns={"ci_low": "auc_ci_low", "ci_high": "auc_ci_high"})[
        [*by, "score", "auc", "auc_ci_low", "auc_ci_high", "n_pos", "n_neg"]]
    t = tests.rename(columns={"a": "score", "ci_low": "delta_ci_low", "ci_high": "delta_ci_high"})[
        [*by, "score", "delta", "delta_ci_low", "delta_ci_high", "p_value", "p_adj"]]
    res = res.merge(a, on=[*by, "score"], how="left").merge(t, on=[*by, "score"], how="left")
    res["needs"] = res["score"].map({k: v[2] for k, v in READOUT_NEEDS.items()})
    order = [*by, "score", "needs", "auc", "auc_ci_low", "auc_ci_high", "gap", "closure", "closure_ci_low",
             "closure_ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_value", "p_adj", "fpr", "fpr_ci_low",
             "fpr_ci_high", "fpr_cls", "sensitivity", "n_pos", "n_neg"]
    return res[order]
