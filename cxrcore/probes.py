"""Linear probes on frozen embeddings, cross-validated with patients kept in one fold.

The probe is what the paper fits on top of every pooling mode: standardised features,
L2 logistic regression, C chosen by an inner cross-validation. Outer folds are built
once per label and reused for ``cls``, ``patch_mean`` and ``roi_local`` so their
out-of-fold scores sit on the same rows and a paired DeLong test applies.
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


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardised features + L2 logistic regression (lbfgs, float32), C by inner CV.

    Cs: candidate inverse regularisation strengths; a single value skips the inner CV.
    inner_splits: folds of the inner CV, grouped by patient when ``fit`` gets groups.
    inner_max_samples: C is chosen on at most this many rows (whole patients, sampled
    with ``random_state``) to keep 100k-row fits affordable; the final fit uses all rows.
    class_weight: passed to LogisticRegression ("balanced" for rare labels if wanted).
    blas_threads: BLAS threads while fitting and scoring. 1 by default: lbfgs on these
    shapes is memory-bound, and on a shared 2-core machine one OpenBLAS thread was 2x
    (80,000 x 768) to 70x (2,000 x 256) faster than two. None keeps the library default.
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
    ):
        self.Cs = Cs
        self.inner_splits = inner_splits
        self.inner_max_samples = inner_max_samples
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.random_state = random_state
        self.blas_threads = blas_threads

    def _logreg(self, C: float, warm_start: bool = False) -> LogisticRegression:
        return LogisticRegression(
            C=C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol,
            class_weight=self.class_weight, warm_start=warm_start,
        )

    def _select_C(self, Z: np.ndarray, y: np.ndarray, codes: np.ndarray) -> tuple[float, np.ndarray]:
        Cs = np.sort(np.asarray(self.Cs, dtype=np.float64))
        rng = np.random.default_rng(self.random_state)
        n_groups = int(codes.max()) + 1
        if self.inner_max_samples is not None and Z.shape[0] > self.inner_max_samples:
            # Whole patients, so the inner folds stay grouped.
            keep_groups = rng.permutation(n_groups)[: max(1, int(n_groups * self.inner_max_samples / Z.shape[0]))]
            keep = np.isin(codes, keep_groups)
            Z, y, codes = Z[keep], y[keep], codes[keep]
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
            clf = self._logreg(Cs[0], warm_start=True)
            for i, C in enumerate(Cs):
                clf.set_params(C=C)
                clf.fit(Z[train], y[train])
                scores[i, k] = roc_auc_score(y[test], clf.decision_function(Z[test]))
        mean = scores.mean(axis=1)
        # On ties prefer the strongest regularisation (the first, smallest C).
        return float(Cs[int(np.argmax(mean))]), mean

    def fit(self, X, y, groups=None):
        """Fit the scaler, choose C (grouped inner CV when ``groups`` given), refit on all rows."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D [n_rows, n_features]; got shape {X.shape}")
        yb = _labels01(y)
        if yb.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {yb.shape[0]}; they must be aligned.")
        if not np.isfinite(X).all():
            raise ValueError("X has NaN or infinite values; fix the embeddings before fitting a probe.")
        if np.unique(yb).shape[0] < 2:
            raise ValueError(f"y holds a single class ({yb.shape[0]} rows); a probe needs both.")
        codes = _group_codes(groups, yb.shape[0])
        with _blas_threads(self.blas_threads):
            return self._fit(X, yb, codes)

    def _fit(self, X: np.ndarray, yb: np.ndarray, codes: np.ndarray) -> "LinearProbe":
        self.scaler_ = StandardScaler().fit(X)
        Z = self.scaler_.transform(X).astype(np.float32, copy=False)
        self.basis_ = _row_space_basis(Z)
        if self.basis_ is not None:
            Z = Z @ self.basis_.T
        Cs = np.atleast_1d(np.asarray(self.Cs, dtype=np.float64))
        with warnings.catch_warnings(record=True) as caught:
            # lbfgs may stop at max_iter on separable data at weak regularisation; that is
            # recorded in converged_, not printed on every page of the book.
            warnings.simplefilter("always", ConvergenceWarning)
            if Cs.shape[0] == 1:
                self.C_, self.cv_auc_ = float(Cs[0]), None
            else:
                # The scaler was fitted on all rows, inner-validation rows included. That only
                # touches the choice of C; the outer out-of-fold scores stay clean.
                self.C_, self.cv_auc_ = self._select_C(Z, yb, codes)
            n_before = len(caught)
            self.model_ = self._logreg(self.C_).fit(Z, yb)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught[n_before:])
        self.classes_ = self.model_.classes_
        self.coef_ = self.model_.coef_ if self.basis_ is None else self.model_.coef_ @ self.basis_
        self.intercept_ = self.model_.intercept_
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logit of the positive class: the score every AUC here is computed from."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have {self.n_features_in_} columns (as in fit); got shape {X.shape}")
        with _blas_threads(self.blas_threads):
            return self.model_.decision_function(self._features(X))

    def _features(self, X: np.ndarray) -> np.ndarray:
        Z = self.scaler_.transform(X).astype(np.float32, copy=False)
        return Z if self.basis_ is None else Z @ self.basis_.T

    def predict_proba(self, X) -> np.ndarray:
        with _blas_threads(self.blas_threads):
            return self.model_.predict_proba(self._features(np.asarray(X, dtype=np.float32)))

    def predict(self, X) -> np.ndarray:
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


def out_of_fold_scores(X, y, groups=None, folds=None, probe=None, *, n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Score every row with a probe fitted on the other folds (float64 logits).

    folds: fold index per row, e.g. from :func:`grouped_folds`; pass the same array for
    every pooling mode so the scores are paired. Built here from ``groups`` when None.
    probe: an unfitted estimator with ``fit(X, y, groups)`` and ``decision_function``
    (default :class:`LinearProbe`); it is cloned for every fold.
    """
    X = np.asarray(X, dtype=np.float32)
    yb = _labels01(y)
    if X.ndim != 2 or X.shape[0] != yb.shape[0]:
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
    scores = np.full(yb.shape[0], np.nan)
    for k in np.unique(folds):
        test = folds == k
        est = clone(probe)
        g_train = None if codes is None else codes[~test]
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
            for mode, X in features.items():
                part[mode] = out_of_fold_scores(np.asarray(X)[idx], y, g, folds=folds, probe=probe)
        except ValueError as err:
            raise ValueError(f"stratum {dict(zip(by, key if isinstance(key, tuple) else (key,)))}: {err}") from err
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
