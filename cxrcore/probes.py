"""Linear probes on frozen embeddings, cross-validated with patients kept in one fold.

The probe is what the paper fits on top of every pooling mode: standardised features,
L2 logistic regression, C chosen by an inner cross-validation. Outer folds are built
once per label and reused for ``cls``, ``patch_mean`` and ``roi_local`` so their
out-of-fold scores sit on the same rows and a paired DeLong test applies.

At the paper's scale (500,000 rows x 4,096 features of ViT-7B) X is read in place: folds
are passed by row index, the scaler is fitted in chunks, and ``LinearProbe(solver="torch")``
(picked automatically there) fits the same objective straight from X, on the CPU or a GPU,
without a standardised or float64 copy (``benchmarks/bench_probe_scale.py``).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import ThreadpoolController

__all__ = ["LinearProbe", "grouped_folds", "out_of_fold_scores"]

_THREADPOOLS: ThreadpoolController | None = None


def _blas_threads(n: int | None):
    """Context limiting BLAS threads (None: leave the library's default)."""
    global _THREADPOOLS
    if n is None:
        return contextlib.nullcontext()
    if _THREADPOOLS is None:  # inspecting the loaded libraries costs ~ms; do it once
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=int(n), user_api="blas")


def _labels01(y, name: str = "y") -> np.ndarray:
    """``y`` as int64 0/1, refusing anything else; the one label check of probes and stats."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row); got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold 0/1 or bool labels; got dtype {y.dtype}. "
                         "Map the label column to 0/1 (1 = positive) first.")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError(f"{name} has {int(np.isnan(y).sum())} NaN labels (first at row "
                         f"{int(np.flatnonzero(np.isnan(y))[0])}); drop unlabelled rows first.")
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(f"{name} must hold only 0/1 labels; found {np.unique(y[bad])[:5].tolist()} "
                         f"(first at row {int(np.flatnonzero(bad)[0])}). Map it to 0/1 (1 = positive) first.")
    return y.astype(np.int64)


def _group_codes(groups, n: int, what: str = "y") -> np.ndarray:
    """Patient id per row -> integer code 0..G-1 (None: every row its own group); the one group coder."""
    if groups is None:
        return np.arange(n)
    import pandas as pd  # only for its missing-value test, which covers None, NaN and NaT in object arrays

    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups has {g.shape[0] if g.ndim else 1} rows but {what} has {n}; pass one patient id per row.")
    if pd.isna(g).any():
        raise ValueError(f"groups has {int(pd.isna(g).sum())} missing patient ids (first at row "
                         f"{int(np.flatnonzero(pd.isna(g))[0])}); fill them (e.g. with the image id) first.")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def grouped_folds(y, groups=None, n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0..n_splits-1) per row: stratified by label, no group in two folds.

    groups: patient id per row (None: every row its own group). Uses scikit-learn's
    StratifiedGroupKFold with shuffling, so ``seed`` fixes the plan. Build it once per
    label and pass it to :func:`out_of_fold_scores` for every pooling mode.
    """
    yb = _labels01(y)
    codes = _group_codes(groups, yb.shape[0])
    n_splits = int(n_splits)
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2; got {n_splits}")
    n_groups = int(codes.max()) + 1 if codes.size else 0
    pos_groups = np.unique(codes[yb == 1]).shape[0]
    neg_groups = np.unique(codes[yb == 0]).shape[0]
    unit = "patients" if groups is not None else "rows"
    for count, what in ((n_groups, unit), (pos_groups, f"{unit} with a positive"), (neg_groups, f"{unit} with a negative")):
        if count < n_splits:
            raise ValueError(
                f"only {count} {what} for n_splits={n_splits}; every fold needs both classes. "
                "Lower n_splits or pool strata."
            )
    folds = np.full(yb.shape[0], -1, dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # StratifiedGroupKFold warns when a class has fewer members than folds; the
        # per-fold check below is the one that matters and says what to do.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, test) in enumerate(cv.split(np.zeros(yb.shape[0]), yb, codes)):
            folds[test] = k
    _check_fold_classes(yb, folds)
    return folds


def _check_fold_classes(y: np.ndarray, folds: np.ndarray) -> None:
    for k in np.unique(folds):
        test = folds == k
        for part, mask in (("test", test), ("training", ~test)):
            if np.unique(y[mask]).shape[0] < 2:
                raise ValueError(
                    f"fold {k}'s {part} rows hold a single class ({int(mask.sum())} rows); "
                    "use fewer folds or a different seed in grouped_folds."
                )


def _row_space_basis(Z: np.ndarray) -> np.ndarray | None:
    """Orthonormal basis ``[r, d]`` of the rows of ``Z`` when there are more features than rows, else None.

    An L2-penalised linear model's weights lie in the span of its training rows
    (representer theorem), so fitting on coordinates in that span gives the same scores
    and is far faster when d > n (a ResNet's 2,048-d pool on a few hundred images). The
    span of the outer training rows also holds every inner-CV training set, so choosing
    C there is exact too.
    """
    n, d = Z.shape
    if d <= n:
        return None
    _, sv, vt = np.linalg.svd(Z.astype(np.float64), full_matrices=False)
    keep = sv > sv[0] * 1e-7 if sv.size and sv[0] > 0 else np.zeros(sv.shape, bool)
    if not keep.any():
        keep[:1] = True
    return vt[keep].astype(np.float32)


# Rows per chunk in the passes that stream over X (scaler, standardised copy, scores):
# 16 MiB of float32 per chunk keeps sklearn's float64 temporaries in the scaler small.
_STREAM_BYTES = 16 * 2**20
# Rows per chunk of the torch objective: on a CPU a chunk small enough to stay in cache is
# gathered and centred once and read from cache by both products (X @ w, then X.T @ r); on
# a GPU large chunks amortise the launch cost.
_TORCH_CHUNK_BYTES = {"cpu": 4 * 2**20, "gpu": 256 * 2**20}
# solver="auto" picks torch from this many training elements (rows x features; 128 MiB of
# float32), where the standardised copy sklearn's lbfgs needs starts to matter.
_TORCH_FROM_ELEMENTS = 2**25


def _chunk_rows(n_features: int, nbytes: int) -> int:
    return max(1, nbytes // (4 * max(1, n_features)))


def _as_matrix(X) -> np.ndarray:
    """X as a C-contiguous float32 matrix (no copy when it already is one)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n_rows, n_features]; got shape {X.shape}")
    return X


def _as_rows(rows, n: int, name: str = "rows") -> np.ndarray:
    """Row indices into X (None: all rows), checked in range and unique."""
    if rows is None:
        return np.arange(n)
    r = np.asarray(rows)
    if r.ndim != 1 or r.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D integer index into the rows of X; got {r.dtype} {r.shape}")
    if r.size and (r.min() < 0 or r.max() >= n):
        raise ValueError(f"{name} holds indices outside 0..{n - 1} (X has {n} rows)")
    if np.unique(r).size != r.size:
        raise ValueError(f"{name} holds a row twice; pass each row of X at most once")
    return r


def _fit_scaler(X: np.ndarray, rows: np.ndarray) -> StandardScaler:
    """StandardScaler of ``X[rows]``, fitted chunk by chunk, refusing non-finite rows.

    StandardScaler.fit on float32 X builds a float64 ``X - mean`` (twice the size of X)
    and a float32 copy of its NaN mask; partial_fit over chunks gives the same statistics
    with temporaries the size of one chunk.
    """
    scaler = StandardScaler()
    step = _chunk_rows(X.shape[1], _STREAM_BYTES)
    for s in range(0, rows.shape[0], step):
        chunk = X[rows[s:s + step]]
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            raise ValueError(
                f"X row {int(rows[s + int(np.argmax(bad))])} (and {int(bad.sum()) - 1} more in its chunk) "
                "has NaN or infinite values; fix the embeddings before fitting a probe."
            )
        scaler.partial_fit(chunk)
    return scaler


def _standardised(X: np.ndarray, rows: np.ndarray, scaler: StandardScaler) -> np.ndarray:
    """``scaler.transform(X[rows])`` as one float32 array, built without a second full copy."""
    Z = np.empty((rows.shape[0], X.shape[1]), dtype=np.float32)
    step = _chunk_rows(X.shape[1], _STREAM_BYTES)
    for s in range(0, rows.shape[0], step):
        Z[s:s + step] = scaler.transform(X[rows[s:s + step]], copy=False)
    return Z


def _torch_threads(n: int | None):
    """Context setting torch's intra-op threads (None: leave them)."""
    import torch

    @contextlib.contextmanager
    def ctx():
        before = torch.get_num_threads()
        torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return contextlib.nullcontext() if n is None else ctx()


class _LogisticLoss:
    """scikit-learn's binary L2-logistic objective over rows ``idx`` of a float32 matrix, in torch.

    The objective of LogisticRegression(solver="lbfgs") (sklearn.linear_model._linear_loss):
    ``sum_i sw_i [log(1 + e^z_i) - y_i z_i] / sum(sw) + ||w||^2 / (2 C sum(sw))`` with
    ``z_i = (x_i - mean) * inv_scale @ w + b``; the intercept is not penalised. Written by
    hand rather than calling sklearn because sklearn needs the standardised rows
    materialised (a copy of X) and runs only on the CPU. Here rows are taken from M one
    chunk at a time into a chunk-sized buffer and centred there (subtracting the mean
    inside the float32 products instead would cancel badly for features whose mean is large
    against their spread); the scale is folded into the weights; products run in float32
    within a chunk and are summed over chunks in float64. No standardised or float64 copy
    of X exists, and the same code runs on a GPU.
    """

    def __init__(self, M, idx: np.ndarray, y: np.ndarray, sw: np.ndarray, mean, inv_scale, chunk_rows: int):
        import torch

        self.torch, self.M = torch, M
        dev = M.device
        order = np.argsort(idx, kind="stable")  # ascending rows: sequential reads of M
        self.idx = np.asarray(idx)[order]
        self.y = torch.as_tensor(np.asarray(y, dtype=np.float64)[order], device=dev)
        self.sw = torch.as_tensor(np.asarray(sw, dtype=np.float64)[order], device=dev)
        self.sw_sum = float(np.sum(sw))
        self.uniform = bool(np.all(np.asarray(sw) == 1))
        self.mean = None if not np.any(mean) else torch.as_tensor(mean, dtype=torch.float32, device=dev)
        self.inv_scale = torch.as_tensor(inv_scale, dtype=torch.float64, device=dev)
        self.step = max(1, int(chunk_rows))
        self.buf = None

    def _blocks(self, idx: np.ndarray):
        """(start, end, centred rows of M) for consecutive chunks of ``idx`` (sorted)."""
        torch = self.torch
        for s in range(0, idx.shape[0], self.step):
            e = min(idx.shape[0], s + self.step)
            lo, hi = int(idx[s]), int(idx[e - 1])
            if self.mean is None and hi - lo == e - s - 1:
                yield s, e, self.M[lo:hi + 1]  # already centred and consecutive: a view
                continue
            if self.buf is None:
                self.buf = torch.empty((self.step, self.M.shape[1]), dtype=self.M.dtype, device=self.M.device)
            B = self.buf[: e - s]
            if hi - lo == e - s - 1:
                torch.sub(self.M[lo:hi + 1], self.mean, out=B)
            else:
                torch.index_select(self.M, 0, torch.as_tensor(idx[s:e], device=self.M.device), out=B)
                if self.mean is not None:
                    B.sub_(self.mean)
            yield s, e, B

    def _fold(self, wb: np.ndarray):
        torch = self.torch
        w = torch.as_tensor(wb[:-1], dtype=torch.float64, device=self.M.device)
        return w, (w * self.inv_scale).to(torch.float32), float(wb[-1])

    def loss_grad(self, wb: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
        """Objective and gradient at ``wb = [w, b]`` (float64), the pair scipy's L-BFGS-B takes."""
        torch = self.torch
        w, v, c = self._fold(wb)
        zero = torch.zeros((), dtype=torch.float64, device=self.M.device)
        loss, r_sum = zero.clone(), zero.clone()
        xr = torch.zeros(self.M.shape[1], dtype=torch.float64, device=self.M.device)
        bce = torch.nn.functional.binary_cross_entropy_with_logits  # log(1 + e^z) - y z, stable
        for s, e, B in self._blocks(self.idx):
            z = torch.mv(B, v).to(torch.float64).add_(c)
            y = self.y[s:e]
            if self.uniform:
                loss += bce(z, y, reduction="sum")
                r = torch.sigmoid(z).sub_(y)
            else:
                sw = self.sw[s:e]
                loss += bce(z, y, weight=sw, reduction="sum")
                r = torch.sigmoid(z).sub_(y).mul_(sw)
            r_sum += r.sum()
            xr += torch.mv(B.T, r.to(torch.float32))
        n = self.sw_sum
        grad_w = xr * self.inv_scale / n + l2 * w
        value = loss / n + 0.5 * l2 * (w @ w)
        grad = np.empty(wb.shape[0], dtype=np.float64)
        grad[:-1] = grad_w.cpu().numpy()
        grad[-1] = float(r_sum) / n
        return float(value), grad

    def decision(self, wb: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``z`` (float64) for rows ``idx`` of M, in the order given."""
        torch = self.torch
        _, v, c = self._fold(wb)
        order = np.argsort(idx, kind="stable")
        out = torch.empty(idx.shape[0], dtype=torch.float64, device=self.M.device)
        for s, e, B in self._blocks(np.asarray(idx)[order]):
            out[s:e] = torch.mv(B, v).to(torch.float64) + c
        res = np.empty(idx.shape[0])
        res[order] = out.cpu().numpy()
        return res


def _sample_weight(class_weight, y: np.ndarray) -> np.ndarray:
    """Per-row weights as LogisticRegression derives them from ``class_weight``."""
    return np.ones(y.shape[0]) if class_weight is None else compute_sample_weight(class_weight, y)


def _lbfgs(loss: _LogisticLoss, C: float, w0: np.ndarray, max_iter: int, tol: float):
    """Minimise the objective with the L-BFGS-B call and options LogisticRegression(solver="lbfgs") uses.

    The optimizer's state is d + 1 float64 numbers, so running scipy's L-BFGS-B on the host
    costs nothing next to one pass over X; it keeps the stopping rule (max |gradient| <= tol,
    ftol, maxls, max_iter) identical to scikit-learn's, so both solvers select C alike.
    """
    from scipy import optimize

    return optimize.minimize(
        loss.loss_grad, w0, method="L-BFGS-B", jac=True, args=(1.0 / (C * loss.sw_sum),),
        options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
    )


class _SklearnRows:
    """Fits on a materialised standardised matrix with scikit-learn's LogisticRegression."""

    def __init__(self, probe: "LinearProbe", Z: np.ndarray, y: np.ndarray):
        self.probe, self.Z, self.y = probe, Z, y

    def subset(self, idx: np.ndarray) -> "_SklearnRows":
        return _SklearnRows(self.probe, self.Z[idx], self.y[idx])

    def path(self, train: np.ndarray) -> "_SklearnPath":
        return _SklearnPath(self, train)

    def fit(self, C: float):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = self.probe._logreg(C).fit(self.Z, self.y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        wb = np.r_[model.coef_[0].astype(np.float64), model.intercept_.astype(np.float64)]
        return wb, converged, int(model.n_iter_[0])

    def loss(self, mask: np.ndarray) -> _LogisticLoss:
        """The objective over the rows where ``mask`` is set (here only to report the final gradient)."""
        import torch

        d = self.Z.shape[1]
        return _LogisticLoss(torch.from_numpy(self.Z), np.flatnonzero(mask), self.y[mask],
                             _sample_weight(self.probe.class_weight, self.y[mask]),
                             np.zeros(d), np.ones(d), _chunk_rows(d, _TORCH_CHUNK_BYTES["cpu"]))


class _SklearnPath:
    """The regularisation path over C on one inner training set, warm-started as LogisticRegressionCV does."""

    def __init__(self, rows: _SklearnRows, train: np.ndarray):
        self.rows, self.Ztr, self.ytr = rows, rows.Z[train], rows.y[train]
        self.clf = None

    def fit(self, C: float) -> None:
        if self.clf is None:
            self.clf = self.rows.probe._logreg(C, warm_start=True)
        self.clf.set_params(C=C).fit(self.Ztr, self.ytr)

    def decision(self, test: np.ndarray) -> np.ndarray:
        return self.clf.decision_function(self.rows.Z[test])


class _TorchRows:
    """Fits with :class:`_LogisticLoss` and scipy's L-BFGS-B on rows ``pos`` of a torch matrix M.

    M is X itself on the CPU (shared memory, no copy) or the fit's rows copied once to the
    GPU; mean/inv_scale standardise on the fly.
    """

    def __init__(self, probe: "LinearProbe", M, pos: np.ndarray, y: np.ndarray, mean, inv_scale):
        self.probe, self.M, self.pos, self.y = probe, M, pos, y
        self.mean, self.inv_scale = mean, inv_scale
        kind = "cpu" if M.device.type == "cpu" else "gpu"
        self.chunk = _chunk_rows(M.shape[1], _TORCH_CHUNK_BYTES[kind])

    def subset(self, idx: np.ndarray) -> "_TorchRows":
        import torch

        sel = torch.as_tensor(self.pos[idx], device=self.M.device)
        M = torch.index_select(self.M, 0, sel)  # the inner-CV sample: small, so copied for fast passes
        return _TorchRows(self.probe, M, np.arange(idx.shape[0]), self.y[idx], self.mean, self.inv_scale)

    def loss(self, mask: np.ndarray) -> _LogisticLoss:
        """The objective over the fit rows where ``mask`` is set, weighted as LogisticRegression would."""
        sw = _sample_weight(self.probe.class_weight, self.y[mask])
        return _LogisticLoss(self.M, self.pos[mask], self.y[mask], sw, self.mean, self.inv_scale, self.chunk)

    def path(self, train: np.ndarray) -> "_TorchPath":
        return _TorchPath(self, train)

    def fit(self, C: float):
        loss = self.loss(np.ones(self.y.shape[0], bool))
        res = _lbfgs(loss, C, np.zeros(self.M.shape[1] + 1), self.probe.max_iter, self.probe.tol)
        return res.x, bool(res.status == 0), int(min(res.nit, self.probe.max_iter))


def _x_stays_in_place(device) -> bool:
    """Whether the torch solver reads X where it lies (CPU) rather than copying the fit's rows to ``device``."""
    import torch

    return torch.device(device).type == "cpu"


class _TorchPath:
    def __init__(self, rows: _TorchRows, train: np.ndarray):
        self.rows = rows
        self.obj = rows.loss(train)
        self.wb = np.zeros(rows.M.shape[1] + 1)

    def fit(self, C: float) -> None:
        p = self.rows.probe
        self.wb = _lbfgs(self.obj, C, self.wb, p.max_iter, p.tol).x

    def decision(self, test: np.ndarray) -> np.ndarray:
        return self.obj.decision(self.wb, self.rows.pos[test])


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardised features + L2 logistic regression, C by inner CV; scikit-learn's or a torch solver.

    Cs: candidate inverse regularisation strengths; a single value skips the inner CV.
    inner_splits: folds of the inner CV, grouped by patient when ``fit`` gets groups.
    inner_max_samples: C is chosen on at most this many rows (whole patients, sampled
    with ``random_state``) to keep 100k-row fits affordable; the final fit uses all rows.
    class_weight: as in LogisticRegression ("balanced" for rare labels if wanted).
    blas_threads: BLAS (and torch) threads while fitting and scoring. 1 by default: lbfgs
    on these shapes is memory-bound, and on a shared 2-core machine one OpenBLAS thread was
    2x (80,000 x 768) to 70x (2,000 x 256) faster than two. None keeps the library default.
    solver: "sklearn" (LogisticRegression, lbfgs, on a standardised float32 copy of the
    training rows), "torch" (the same objective, C convention, intercept, L-BFGS-B call
    and stopping rule, with the loss and gradient computed in torch straight from X: no
    copy of X, float32 products summed in float64, on ``device``), or "auto": torch when
    ``device`` is not the CPU or the training rows hold at least 2**25 elements (rows x
    features, 128 MiB of float32), else sklearn. Both pick C by the same inner CV.
    device: where the torch solver runs ("cpu", "cuda", "cuda:1", ...). Off the CPU the
    training rows are copied to the device once per fit; scores are computed on the CPU.

    Fitted: ``coef_``/``intercept_`` (float32, on standardised features), ``scaler_``,
    ``C_``, ``cv_auc_`` (mean inner-CV AUC per C, None for a single C), ``solver_`` (the
    solver used), ``n_iter_`` and ``converged_`` of the final fit, and ``grad_max_``: the
    largest absolute gradient of the objective at the solution (what ``tol`` bounds),
    computed the same way for both solvers.
    """

    def __init__(
        self,
        Cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0),
        inner_splits: int = 3,
        inner_max_samples: int | None = 20_000,
        max_iter: int = 300,
        tol: float = 1e-4,
        class_weight=None,
        random_state: int = 0,
        blas_threads: int | None = 1,
        solver: str = "auto",
        device: str = "cpu",
    ):
        self.Cs = Cs
        self.inner_splits = inner_splits
        self.inner_max_samples = inner_max_samples
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state
        self.blas_threads = blas_threads
        self.solver = solver
        self.device = device

    def _logreg(self, C: float, warm_start: bool = False) -> LogisticRegression:
        return LogisticRegression(
            C=C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol,
            class_weight=self.class_weight, warm_start=warm_start,
        )

    def _resolve_solver(self, n_rows: int, n_features: int) -> str:
        on_cpu = str(self.device).split(":")[0] == "cpu"
        if self.solver not in ("auto", "sklearn", "torch"):
            raise ValueError(f"solver must be 'auto', 'sklearn' or 'torch'; got {self.solver!r}")
        if self.solver == "sklearn" and not on_cpu:
            raise ValueError(f"solver='sklearn' runs on the CPU only; got device={self.device!r}. Use solver='torch'.")
        if self.solver != "auto":
            return self.solver
        big = n_rows * min(n_features, n_rows) >= _TORCH_FROM_ELEMENTS
        return "torch" if (big or not on_cpu) else "sklearn"

    def _select_C(self, rows, y: np.ndarray, codes: np.ndarray) -> tuple[float, np.ndarray]:
        Cs = np.sort(np.asarray(self.Cs, dtype=np.float64))
        rng = np.random.default_rng(self.random_state)
        n_groups = int(codes.max()) + 1
        if self.inner_max_samples is not None and y.shape[0] > self.inner_max_samples:
            # Whole patients, so the inner folds stay grouped.
            keep_groups = rng.permutation(n_groups)[: max(1, int(n_groups * self.inner_max_samples / y.shape[0]))]
            keep = np.flatnonzero(np.isin(codes, keep_groups))
            rows, y, codes = rows.subset(keep), y[keep], codes[keep]
        # Small training sets may not have inner_splits patients of each class; use as
        # many inner folds as they allow rather than failing the outer fold.
        n_inner = min(int(self.inner_splits), np.unique(codes[y == 1]).shape[0], np.unique(codes[y == 0]).shape[0])
        if n_inner < 2:
            raise ValueError(
                "too few patients of one class to choose C by inner CV; pass a single C, "
                "e.g. LinearProbe(Cs=(1.0,))."
            )
        folds = grouped_folds(y, codes, n_splits=n_inner, seed=self.random_state)
        scores = np.zeros((Cs.shape[0], n_inner))
        for k in range(n_inner):
            train, test = folds != k, folds == k
            # The regularisation path from strong to weak, warm-started: each fit starts
            # near its optimum, which is most of the speed of LogisticRegressionCV.
            path = rows.path(train)
            for i, C in enumerate(Cs):
                path.fit(C)
                scores[i, k] = roc_auc_score(y[test], path.decision(test))
        mean = scores.mean(axis=1)
        # On ties prefer the strongest regularisation (the first, smallest C).
        return float(Cs[int(np.argmax(mean))]), mean

    def fit(self, X, y, groups=None, *, rows=None):
        """Fit the scaler, choose C (grouped inner CV when ``groups`` given), refit on all rows.

        rows: fit on ``X[rows]`` without copying them (y and groups then hold one entry
        per selected row); :func:`out_of_fold_scores` passes each fold's training rows.
        """
        X = _as_matrix(X)
        rows = _as_rows(rows, X.shape[0])
        yb = _labels01(y)
        if yb.shape[0] != rows.shape[0]:
            raise ValueError(f"X has {rows.shape[0]} rows (selected) but y has {yb.shape[0]}; they must be aligned.")
        if np.unique(yb).shape[0] < 2:
            raise ValueError(f"y holds a single class ({yb.shape[0]} rows); a probe needs both.")
        codes = _group_codes(groups, yb.shape[0])
        self.solver_ = self._resolve_solver(rows.shape[0], X.shape[1])
        with _blas_threads(self.blas_threads), _torch_threads(self.blas_threads if self.solver_ == "torch" else None):
            return self._fit(X, rows, yb, codes)

    def _fit(self, X: np.ndarray, rows: np.ndarray, yb: np.ndarray, codes: np.ndarray) -> "LinearProbe":
        import torch

        d = X.shape[1]
        self.scaler_ = _fit_scaler(X, rows)
        self.basis_ = None
        if d > rows.shape[0]:
            Z = _standardised(X, rows, self.scaler_)
            self.basis_ = _row_space_basis(Z)
            Z = Z @ self.basis_.T
        elif self.solver_ == "sklearn":
            Z = _standardised(X, rows, self.scaler_)
        if self.solver_ == "sklearn":
            data = _SklearnRows(self, Z, yb)
        elif self.basis_ is not None:
            M = torch.from_numpy(Z).to(self.device)
            data = _TorchRows(self, M, np.arange(rows.shape[0]), yb, np.zeros(Z.shape[1]), np.ones(Z.shape[1]))
        else:
            mean, inv_scale = self.scaler_.mean_, 1.0 / self.scaler_.scale_
            if _x_stays_in_place(self.device):
                data = _TorchRows(self, torch.from_numpy(X), rows, yb, mean, inv_scale)
            else:
                M = torch.empty((rows.shape[0], d), dtype=torch.float32, device=self.device)
                step = _chunk_rows(d, _STREAM_BYTES)
                for s in range(0, rows.shape[0], step):
                    M[s:s + step] = torch.from_numpy(X[rows[s:s + step]]).to(self.device)
                data = _TorchRows(self, M, np.arange(rows.shape[0]), yb, mean, inv_scale)
        Cs = np.atleast_1d(np.asarray(self.Cs, dtype=np.float64))
        with warnings.catch_warnings():
            # lbfgs may stop at max_iter on separable data at weak regularisation; that is
            # recorded in converged_, not printed on every page of the book.
            warnings.simplefilter("ignore", ConvergenceWarning)
            if Cs.shape[0] == 1:
                self.C_, self.cv_auc_ = float(Cs[0]), None
            else:
                # The scaler was fitted on all rows, inner-validation rows included. That only
                # touches the choice of C; the outer out-of-fold scores stay clean.
                self.C_, self.cv_auc_ = self._select_C(data, yb, codes)
            wb, self.converged_, self.n_iter_ = data.fit(self.C_)
        # max |gradient| of the objective at the solution: the quantity tol bounds, computed
        # the same way (float64 sums) for both solvers
        obj = data.loss(np.ones(yb.shape[0], bool))
        self.grad_max_ = float(np.abs(obj.loss_grad(wb, 1.0 / (self.C_ * obj.sw_sum))[1]).max())
        coef = wb[None, :-1].astype(np.float32)
        self.coef_ = coef if self.basis_ is None else coef @ self.basis_
        self.intercept_ = wb[-1:].astype(np.float32)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = d
        return self

    def decision_function(self, X, *, rows=None) -> np.ndarray:
        """Logit of the positive class (float64): the score every AUC here is computed from.

        rows: score only ``X[rows]`` (without copying them).
        """
        X = _as_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have {self.n_features_in_} columns (as in fit); got shape {X.shape}")
        rows = _as_rows(rows, X.shape[0])
        out = np.empty(rows.shape[0], dtype=np.float64)
        step = _chunk_rows(X.shape[1], _STREAM_BYTES)
        with _blas_threads(self.blas_threads):
            for s in range(0, rows.shape[0], step):
                Z = self.scaler_.transform(X[rows[s:s + step]], copy=False)
                out[s:s + step] = Z @ self.coef_[0] + self.intercept_[0]
        return out

    def predict_proba(self, X) -> np.ndarray:
        from scipy.special import expit

        p = expit(self.decision_function(X))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


def out_of_fold_scores(X, y, groups=None, folds=None, probe=None, *, n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Score every row with a probe fitted on the other folds (float64 logits).

    folds: fold index per row, e.g. from :func:`grouped_folds`; pass the same array for
    every pooling mode so the scores are paired. Built here from ``groups`` when None.
    probe: an unfitted estimator with ``fit(X, y, groups)`` and ``decision_function``
    (default :class:`LinearProbe`); it is cloned for every fold. A LinearProbe is handed
    each fold's rows by index, so no fold's rows are copied out of X.
    """
    X = _as_matrix(X)
    yb = _labels01(y)
    if X.shape[0] != yb.shape[0]:
        raise ValueError(f"X must be 2-D with one row per label ({yb.shape[0]}); got shape {X.shape}")
    codes = _group_codes(groups, yb.shape[0]) if groups is not None else None
    if folds is None:
        folds = grouped_folds(yb, groups, n_splits=n_splits, seed=seed)
    folds = np.asarray(folds)
    if folds.shape != yb.shape or folds.dtype.kind not in "iu":
        raise ValueError(f"folds must be one integer fold index per row ({yb.shape[0]}); got {folds.dtype} {folds.shape}")
    if codes is not None:
        per_group = np.unique(np.stack([codes, folds]), axis=1)
        leaks = np.flatnonzero(np.bincount(per_group[0]) > 1)
        if leaks.size:
            gid = np.unique(np.asarray(groups))[leaks[0]]
            raise ValueError(
                f"patient {gid!r} (and {leaks.size - 1} more) appears in more than one fold; "
                "build folds with grouped_folds(y, groups)."
            )
    _check_fold_classes(yb, folds)
    probe = LinearProbe() if probe is None else probe
    by_rows = isinstance(probe, LinearProbe)
    scores = np.full(yb.shape[0], np.nan)
    for k in np.unique(folds):
        test = folds == k
        est = clone(probe)
        g_train = None if codes is None else codes[~test]
        if by_rows:
            est.fit(X, yb[~test], groups=g_train, rows=np.flatnonzero(~test))
            scores[test] = est.decision_function(X, rows=np.flatnonzero(test))
        else:
            est.fit(X[~test], yb[~test], groups=g_train)
            scores[test] = est.decision_function(X[test])
    return scores


def out_of_fold_table(meta, features: dict, label_col: str, *, by=(), group_col: str = "patient_id",
                      n_splits: int = 5, seed: int = 0, probe=None) -> "pd.DataFrame":
    """Out-of-fold scores of every pooling mode, per stratum, as one tidy frame.

    meta: one row per image (or box) with ``label_col``, ``group_col`` and the ``by``
    columns; features: pooling mode -> ``[n, D]`` array row-aligned with ``meta``. Within
    each stratum of ``by``, rows with an unknown (NaN) label are left out, one set of
    patient-grouped folds is drawn, and every mode is scored on those same folds, so the
    modes' AUCs are paired. Returns the kept ``meta`` rows with one score column per mode
    and a ``fold`` column.
    """
    import pandas as pd

    by = list(by)
    missing = [c for c in [label_col, group_col, *by] if c not in meta.columns]
    if missing:
        raise ValueError(f"meta lacks column(s) {missing}; it has {list(meta.columns)}")
    meta = meta.reset_index(drop=True)
    parts = []
    strata = meta.groupby(by, sort=False).indices.items() if by else [((), np.arange(len(meta)))]
    for key, idx in strata:
        idx = np.asarray(idx)
        idx = idx[meta[label_col].to_numpy()[idx] == meta[label_col].to_numpy()[idx]]  # drop NaN labels
        y = meta[label_col].to_numpy()[idx].astype(int)
        g = meta[group_col].to_numpy()[idx]
        try:
            folds = grouped_folds(y, g, n_splits=n_splits, seed=seed)
            part = meta.iloc[idx].copy()
            part["fold"] = folds
            whole = idx.shape[0] == len(meta) and bool((idx == np.arange(len(meta))).all())
            for mode, X in features.items():
                # a stratum that is the whole table (the paper-scale case) is scored without a copy
                Xs = X if whole else np.asarray(X)[idx]
                part[mode] = out_of_fold_scores(Xs, y, g, folds=folds, probe=probe)
        except ValueError as err:
            raise ValueError(f"stratum {dict(zip(by, key if isinstance(key, tuple) else (key,)))}: {err}") from err
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
