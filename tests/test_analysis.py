"""cxrcore.analysis: the probe loops moved out of the ChestX-Det10 and box-jitter notebooks.

Each test runs the loop as the notebook wrote it (copied below, calling today's
cxrcore.stats) and the moved function on one small case, and checks they give the same
table, except where the old loop was wrong (its hand-made normal p-value).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as t_dist

from cxrcore import analysis
from cxrcore.boxes import jitter_frame, still_overlapping
from cxrcore.geometry import make_geometry
from cxrcore.pooling import roi_local
from cxrcore.probes import grouped_folds, out_of_fold_scores
from cxrcore.stats import (NotEstimable, auc, bootstrap_auc, bootstrap_auc_gap, compare_table, delong, delong_paired,
                           fdr_bh)

CLASSES = ["Nodule", "Mass"]


def _cohort(seed=0, n=36, d=6):
    """One image per patient, two classes, boxes with small/large strata, embeddings with some signal."""
    rng = np.random.default_rng(seed)
    md = pd.DataFrame({"image_id": [f"img{i:03d}.png" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)]})
    boxes = []
    for c in CLASSES:
        y = (rng.random(n) < 0.4).astype(int)
        md[c] = y
        for i in np.flatnonzero(y):
            for _ in range(rng.integers(1, 3)):
                boxes.append({"image_id": md.image_id[i], "class": c, "stratum": rng.choice(["small", "large"])})
    boxes = pd.DataFrame(boxes)
    emb = {}
    for key in ("enc_a", "enc_b"):
        base = rng.normal(size=(n, d))
        emb[key] = {"cls": base + 0.8 * md[CLASSES].to_numpy() @ rng.normal(size=(2, d)),
                    "patch_mean": base + 0.3 * rng.normal(size=(n, d))}
    return md, boxes, emb


def _old_image_loop(md, boxes, emb, n_splits, seed, n_boot):
    """notebooks/chestxdet10.py before the move (image level), verbatim but for the inputs."""
    classes, encoders = CLASSES, list(emb)
    image_stratum = {c: boxes[boxes["class"] == c].groupby("image_id")["stratum"]
                     .agg(lambda s: "large" if (s == "large").any() else "small") for c in classes}
    img_rows, strata_rows, img_tests = [], [], []
    for key in encoders:
        for c in classes:
            y = md[c].to_numpy().astype(int)
            groups = md["patient_id"].to_numpy()
            folds = grouped_folds(y, groups, n_splits=n_splits, seed=seed)
            stratum = md["image_id"].map(image_stratum[c]).fillna("none").to_numpy()
            scores = {}
            for mode in ("cls", "patch_mean"):
                s = scores[mode] = out_of_fold_scores(emb[key][mode], y, groups, folds=folds)
                b = bootstrap_auc(y, s, n_boot=n_boot, seed=seed)
                img_rows.append({"encoder": key, "class": c, "pooling": mode, "auc": b.auc, "ci_low": b.ci_low,
                                 "ci_high": b.ci_high, "n_pos": b.n_pos, "n_neg": b.n_neg})
                by = {}
                for st in ("small", "large"):
                    keep = (y == 0) | (stratum == st)
                    enough = (stratum == st).sum() >= 2 and (y == 0).sum() >= 2
                    by[st] = bootstrap_auc(y[keep], s[keep], n_boot=n_boot, seed=seed) if enough else None
                gap = None
                if by["small"] is not None and by["large"] is not None:
                    g = bootstrap_auc_gap(y, s, stratum, "large", "small", n_boot=n_boot, seed=seed)
                    gap = (g.gap, g.ci_low, g.ci_high)
                for st in ("small", "large"):
                    r = by[st]
                    strata_rows.append({"encoder": key, "class": c, "pooling": mode, "stratum": st,
                                        "auc": np.nan if r is None else r.auc, "ci_low": np.nan if r is None else r.ci_low,
                                        "ci_high": np.nan if r is None else r.ci_high, "n_pos": int((stratum == st).sum()),
                                        "gap": np.nan if gap is None else gap[0],
                                        "gap_low": np.nan if gap is None else gap[1], "gap_high": np.nan if gap is None else gap[2]})
            d = delong_paired(y, scores["patch_mean"], scores["cls"])
            img_tests.append({"encoder": key, "class": c, "a": "patch_mean", "b": "cls", "auc_a": d.auc_a, "auc_b": d.auc_b,
                              "delta": d.delta, "z": d.z, "p_value": d.p_value})
    img_tests = pd.DataFrame(img_tests)
    img_tests["p_bh"] = fdr_bh(img_tests["p_value"].to_numpy())
    return pd.DataFrame(img_rows), pd.DataFrame(strata_rows), img_tests


def test_image_strata_gives_the_old_notebook_tables():
    md, boxes, emb = _cohort()
    old_aucs, old_strata, old_tests = _old_image_loop(md, boxes, emb, n_splits=3, seed=2, n_boot=80)
    new = analysis.image_strata(md, boxes, emb, CLASSES, n_splits=3, seed=2, n_boot=80)
    pd.testing.assert_frame_equal(new.aucs[old_aucs.columns], old_aucs)
    pd.testing.assert_frame_equal(new.strata[old_strata.columns], old_strata)
    pd.testing.assert_frame_equal(new.tests[old_tests.columns], old_tests)
    assert (new.tests.method == "delong").all() and set(new.scores) == {(k, c, m) for k in emb for c in CLASSES
                                                                        for m in ("cls", "patch_mean")}


def test_image_strata_clusters_repeated_patients():
    md, boxes, emb = _cohort(seed=1)
    md["patient_id"] = [f"p{i // 2}" for i in range(len(md))]  # two images per patient
    new = analysis.image_strata(md, boxes, emb, CLASSES, n_splits=3, seed=0, n_boot=60)
    assert (new.tests.method == "delong_clustered").all()
    y = md["Nodule"].to_numpy()
    s_pm, s_cls = new.scores["enc_a", "Nodule", "patch_mean"], new.scores["enc_a", "Nodule", "cls"]
    ref = delong_paired(y, s_pm, s_cls, groups=md["patient_id"].to_numpy())
    row = new.tests[(new.tests.encoder == "enc_a") & (new.tests["class"] == "Nodule")].iloc[0]
    assert (row.p_value, row.ci_low) == pytest.approx((ref.p_value, ref.ci[0]))


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_image_strata_gap_resamples_patients_and_every_table_names_its_procedure():
    # before: the gap CI resampled images as if independent (bootstrap_auc_gap had no groups),
    # and the strata table had no method or note column
    md, boxes, emb = _cohort(seed=1, n=60)
    md["patient_id"] = [f"p{i // 3}" for i in range(len(md))]  # three images per patient
    new = analysis.image_strata(md, boxes, emb, CLASSES, n_splits=3, seed=0, n_boot=200)
    for table, cols in ((new.aucs, ["ci_method", "note"]), (new.strata, ["ci_method", "gap_method", "note"]),
                        (new.tests, ["method", "note"])):
        assert set(cols) <= set(table.columns)
    assert set(new.strata.ci_method) <= {"percentile", "score", ""} and set(new.tests.method) == {"delong_clustered"}
    y, g = md["Mass"].to_numpy(), md["patient_id"].to_numpy()
    s = new.scores["enc_a", "Mass", "cls"]
    ist = boxes[boxes["class"] == "Mass"].groupby("image_id")["stratum"].agg(
        lambda t: "large" if (t == "large").any() else "small")
    st = md["image_id"].map(ist).fillna("none").to_numpy()
    row = new.strata[(new.strata.encoder == "enc_a") & (new.strata["class"] == "Mass") & (new.strata.pooling == "cls")]
    try:
        ref = bootstrap_auc_gap(y, s, st, "large", "small", n_boot=200, seed=0, groups=g)
        assert (row.gap_method == "cluster_percentile").all()
        assert row[["gap", "gap_low", "gap_high"]].iloc[0].tolist() == pytest.approx([ref.gap, ref.ci_low, ref.ci_high])
        rows_only = bootstrap_auc_gap(y, s, st, "large", "small", n_boot=200, seed=0)
        assert (rows_only.ci_low, rows_only.ci_high) != pytest.approx((ref.ci_low, ref.ci_high))
    except NotEstimable:
        assert row.gap_low.isna().all() and row.note.str.contains("gap CI not estimable").all()
    # one image per patient: rows are the units, and the method says so
    md1, boxes1, emb1 = _cohort(seed=1)
    assert set(analysis.image_strata(md1, boxes1, emb1, CLASSES, n_splits=3, seed=0, n_boot=50).strata.gap_method) \
        <= {"percentile", ""}


def _boxes(seed=0, n_images=30, d=5):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        for c in CLASSES:
            for _ in range(rng.integers(0, 3)):
                st = rng.choice(["small", "large"])
                for kind in ("lesion", "control"):
                    rows.append({"image_id": f"img{i:03d}", "class": c, "stratum": st, "kind": kind})
    roi = pd.DataFrame(rows)
    y = (roi.kind == "lesion").to_numpy()
    emb = {k: rng.normal(size=(len(roi), d)) + 0.7 * y[:, None] * rng.normal(size=d) for k in ("enc_a", "enc_b")}
    return roi, emb


def _old_box_loop(roi_rows, emb, n_splits, seed, n_boot):
    """notebooks/chestxdet10.py before the move (box level), verbatim but for the inputs and norm."""
    from scipy.stats import norm

    box_rows = []
    for key in emb:
        for c in CLASSES:
            sel = (roi_rows["class"] == c).to_numpy()
            sub = roi_rows[sel]
            y = (sub["kind"] == "lesion").to_numpy().astype(int)
            groups = sub["image_id"].to_numpy()
            k = min(n_splits, sub["image_id"].nunique())
            s = out_of_fold_scores(emb[key][sel], y, groups, folds=grouped_folds(y, groups, n_splits=k, seed=seed))
            b = bootstrap_auc(y, s, n_boot=n_boot, seed=seed, groups=groups)
            dl = delong(y, s, groups=groups, method="wald")
            z = (dl.auc - 0.5) / dl.se if dl.se > 0 else np.copysign(np.inf, dl.auc - 0.5)
            row = {"encoder": key, "class": c, "pooling": "roi_local", "auc": b.auc, "ci_low": b.ci_low, "ci_high": b.ci_high,
                   "delong_low": dl.ci[0], "delong_high": dl.ci[1], "z_vs_chance": z, "p_value": float(2 * norm.sf(abs(z))),
                   "n_boxes": b.n_pos, "n_images": int(sub["image_id"].nunique())}
            for st in ("small", "large"):
                keep = (sub["stratum"] == st).to_numpy()
                row[f"auc_{st}"] = auc(y[keep], s[keep]) if 0 < y[keep].sum() < keep.sum() else np.nan
            box_rows.append(row)
    return pd.DataFrame(box_rows)


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_box_level_gives_the_old_notebook_table_but_the_ci_and_p_of_its_own_procedure():
    roi, emb = _boxes()
    old = _old_box_loop(roi, emb, n_splits=3, seed=1, n_boot=80)
    new = analysis.box_level(roi, emb, CLASSES, n_splits=3, seed=1, n_boot=80)
    same = [c for c in old.columns if c not in ("p_value", "z_vs_chance", "delong_low", "delong_high")]
    pd.testing.assert_frame_equal(new.table[same], old[same])
    # the interval and test are delong's default (the clustered score interval), one statistic
    for r in new.table.itertuples():
        sel = (roi["class"] == r[2]).to_numpy()
        ref = delong((roi.kind[sel] == "lesion").astype(int), new.scores[r.encoder, r[2]], groups=roi.image_id[sel])
        assert (r.score_low, r.score_high, r.z_vs_chance, r.df) == pytest.approx((*ref.ci, ref.z, ref.df))
    assert (new.table.score_method == "score_clustered").all() and (new.table.n_excluded == 0).all()
    np.testing.assert_allclose(new.table.p_value, 2 * t_dist.sf(np.abs(new.table.z_vs_chance), new.table.df), rtol=1e-10)
    np.testing.assert_allclose(new.table.p_bh, fdr_bh(new.table.p_value))
    excludes = (new.table.score_low > 0.5) | (new.table.score_high < 0.5)
    assert ((new.table.p_value < 0.05) == excludes).all()
    assert not new.skipped and new.exclusions.empty


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_box_level_leaves_out_a_cropped_away_box_with_its_pair_and_counts_it():
    # before: one NaN roi_local row (a box the centre crop cut away) aborted the whole table
    roi, emb = _boxes(seed=3)
    roi = roi.assign(pair=np.arange(len(roi)) // 2)  # _boxes writes each lesion just before its control
    bad = int(np.flatnonzero((roi["class"] == "Nodule").to_numpy())[0])  # a Nodule lesion box
    assert roi.kind[bad] == "lesion" and roi.pair[bad] == roi.pair[bad + 1]
    reason = "box cropped away: less than 50% of it inside the model input"
    roi["roi_excluded"] = ""
    roi.loc[bad, "roi_excluded"] = reason
    emb_nan = {k: v.copy() for k, v in emb.items()}
    for v in emb_nan.values():
        v[bad] = np.nan
    new = analysis.box_level(roi, emb_nan, CLASSES, n_splits=3, seed=1, n_boot=80)
    # the same table as without that pair, plus the count and its reasons
    kept = roi.drop(index=[bad, bad + 1])
    ref = analysis.box_level(kept.reset_index(drop=True), {k: np.delete(v, [bad, bad + 1], axis=0) for k, v in emb.items()},
                             CLASSES, n_splits=3, seed=1, n_boot=80)
    cols = ["auc", "ci_low", "ci_high", "score_low", "score_high", "p_value", "n_boxes", "n_images"]
    pd.testing.assert_frame_equal(new.table[cols], ref.table[cols])
    nod = new.table["class"] == "Nodule"
    assert (new.table.n_excluded[nod] == 2).all() and (new.table.n_excluded[~nod] == 0).all()
    assert new.table.note[nod].str.contains("2 boxes excluded").all()
    ex = new.exclusions
    assert list(ex.columns) == ["encoder", "class", "reason", "count", "item"]
    assert sorted(ex.reason.unique()) == sorted([reason, "pair left out with it: its other box was excluded"])
    assert (ex["count"] == 1).all() and len(ex) == 2 * len(emb) and set(ex["class"]) == {"Nodule"}
    # an Encoding's own reasons win (each encoder crops differently), and the scores stay aligned
    from cxrcore.encoders.base import Encoding

    e = Encoding(cls=np.zeros((1, 2)), patch_mean=np.zeros((1, 2)), roi_local=emb_nan["enc_a"],
                 roi_image=np.zeros(len(roi), int), geometry=[], roi_visible=np.ones(len(roi)),
                 roi_excluded=np.where(np.arange(len(roi)) == bad, "cut by enc_a", "").astype(object))
    one = analysis.box_level(roi.drop(columns="roi_excluded"), {"enc_a": e}, ["Nodule"], n_splits=3, seed=1, n_boot=40)
    assert "cut by enc_a" in set(one.exclusions.reason)
    s = one.scores["enc_a", "Nodule"]
    assert len(s) == int((roi["class"] == "Nodule").sum()) and np.isnan(s[:2]).all() and np.isfinite(s[2:]).all()


def test_box_level_keeps_a_class_with_too_few_images_and_says_why():
    # 4 images with one nodule box each: too few for an image-cluster bootstrap (5 needed),
    # enough for the clustered DeLong interval
    rng = np.random.default_rng(2)
    roi = pd.DataFrame({"image_id": np.repeat([f"img{i}" for i in range(4)], 2), "class": "Nodule",
                        "stratum": "small", "kind": ["lesion", "control"] * 4})
    emb = {"enc_a": rng.normal(size=(8, 4)) + np.tile([[1.0], [0.0]], (4, 1))}
    new = analysis.box_level(roi, emb, ["Nodule"], n_splits=3, seed=0, n_boot=40)
    row = new.table.iloc[0]
    assert np.isnan(row.ci_low) and "bootstrap CI not estimable: 4 clusters" in row.note
    assert row.auc == pytest.approx(auc((roi.kind == "lesion").astype(int), new.scores["enc_a", "Nodule"]))
    assert np.isfinite(row.score_low) and np.isfinite(row.p_value)


def _jitter_inputs(seed=0, n_images=24, side=64, grid=8, d=6):
    rng = np.random.default_rng(seed)
    image_ids = [f"img{i:03d}" for i in range(n_images)]
    geoms = [make_geometry((side, side), side, side // grid, "resize") for _ in image_ids]
    grids = {}
    rows = []
    for i, image_id in enumerate(image_ids):
        for _ in range(rng.integers(1, 3)):
            w = rng.integers(6, 20)
            x1, y1 = rng.integers(0, side - w, 2)
            cx1, cy1 = rng.integers(0, side - w, 2)
            rows.append({"image_id": image_id, "stratum": "small" if w < 12 else "large", "x1": x1, "y1": y1,
                         "x2": x1 + w, "y2": y1 + w, "cx1": cx1, "cy1": cy1, "cx2": cx1 + w, "cy2": cy1 + w})
    pairs = pd.DataFrame(rows).astype({c: float for c in ("x1", "y1", "x2", "y2", "cx1", "cy1", "cx2", "cy2")})
    for key in ("enc_a", "enc_b"):
        g = rng.normal(size=(n_images, grid, grid, d)).astype(np.float32)
        for r in pairs.itertuples():  # lesion cells carry a signal
            i = image_ids.index(r.image_id)
            g[i, int(r.y1) // 8:int(np.ceil(r.y2 / 8)), int(r.x1) // 8:int(np.ceil(r.x2 / 8)), 0] += 1.5
        grids[key] = (g, geoms)
    return pairs, grids, image_ids, {i: (side, side) for i in image_ids}


def _old_jitter_loop(pairs, store, md_ids, hw_of, sigmas_px, scale_sigmas, scale_px, n_splits, seed, n_boot):
    """notebooks/box_jitter.py before the move, verbatim but for the inputs."""
    encoders = list(store)
    lesion0 = pairs[["x1", "y1", "x2", "y2"]].to_numpy(float)
    y = np.r_[np.ones(len(pairs), int), np.zeros(len(pairs), int)]
    groups = np.r_[pairs["image_id"].to_numpy(), pairs["image_id"].to_numpy()]
    stratum = np.r_[pairs["stratum"].to_numpy(), pairs["stratum"].to_numpy()]
    folds = grouped_folds(y, groups, n_splits=min(n_splits, pairs["image_id"].nunique()), seed=seed)
    position = {i: k for k, i in enumerate(md_ids)}
    rows, overlap_rows, scores = [], [], {}
    for scale in scale_sigmas:
        for sigma in sigmas_px:
            s_px = float(sigma) * scale_px
            lesion = jitter_frame(pairs, s_px, scale_sigma=scale, seed=seed, image_hw=hw_of.get)
            control = jitter_frame(pairs, s_px, scale_sigma=scale, seed=seed + 1, image_hw=hw_of.get,
                                   columns=("cx1", "cy1", "cx2", "cy2"))
            hit = still_overlapping(lesion, lesion0)
            for st in ("all", "small", "large"):
                keep = np.ones(len(pairs), bool) if st == "all" else (pairs["stratum"] == st).to_numpy()
                overlap_rows.append({"sigma_px": sigma, "sigma_image_px": s_px, "scale_sigma": scale, "stratum": st,
                                     "still_overlapping": float(hit[keep].mean()), "n_boxes": int(keep.sum())})
            per_image = [[] for _ in range(len(md_ids))]
            where = [[] for _ in range(len(md_ids))]
            for k, image_id in enumerate(pairs["image_id"]):
                per_image[position[image_id]].append(lesion[k].tolist())
                where[position[image_id]].append(k)
            for k, image_id in enumerate(pairs["image_id"]):
                per_image[position[image_id]].append(control[k].tolist())
                where[position[image_id]].append(len(pairs) + k)
            order = np.concatenate([w for w in where if w]).astype(int)
            for key in encoders:
                grid, geoms = store[key]
                feats, _ = roi_local(grid, geoms, per_image)
                X = np.empty_like(feats)
                X[order] = feats
                s = scores[key, sigma, scale] = out_of_fold_scores(X, y, groups, folds=folds)
                b = bootstrap_auc(y, s, n_boot=n_boot, seed=seed, groups=groups)
                row = {"encoder": key, "sigma_px": sigma, "scale_sigma": scale, "pooling": "roi_local", "auc": b.auc,
                       "ci_low": b.ci_low, "ci_high": b.ci_high, "still_overlapping": float(hit.mean())}
                for st in ("small", "large"):
                    keep = stratum == st
                    row[f"auc_{st}"] = auc(y[keep], s[keep]) if 0 < y[keep].sum() < keep.sum() else np.nan
                rows.append(row)

    def setting(sigma, scale):
        return f"sigma {sigma:g}, scale {scale:g}"

    by_encoder = pd.concat([pd.DataFrame({"encoder": key, "image_id": groups, "label": y,
                                          **{setting(sg, sc): scores[key, sg, sc] for sg in sigmas_px for sc in scale_sigmas}})
                            for key in encoders], ignore_index=True)
    pairs_tested = [(setting(sg, sc), setting(0, 0.0)) for sc in scale_sigmas for sg in sigmas_px if (sg, sc) != (0, 0.0)]
    tests = compare_table(by_encoder, [c for p in pairs_tested for c in p], "label", pairs=pairs_tested, by=["encoder"],
                          group_col="image_id", seed=seed)
    return pd.DataFrame(rows), pd.DataFrame(overlap_rows), tests, scores


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_jitter_probes_give_the_old_notebook_tables():
    pairs, grids, ids, hw = _jitter_inputs()
    kw = dict(sigmas_px=[0, 6], scale_sigmas=[0.0, 0.2], n_splits=3, seed=1, n_boot=60)
    old_table, old_overlap, old_tests, old_scores = _old_jitter_loop(pairs, grids, ids, hw, kw["sigmas_px"],
                                                                     kw["scale_sigmas"], 0.5, 3, 1, 60)
    new = analysis.jitter_probes(pairs, grids, ids, hw.get, px_per_sigma=0.5, **kw)
    pd.testing.assert_frame_equal(new.table[old_table.columns], old_table)
    pd.testing.assert_frame_equal(new.overlap, old_overlap)
    pd.testing.assert_frame_equal(new.tests, old_tests)
    assert set(new.scores) == set(old_scores)
    assert (new.tests.method == "delong_clustered").all() and len(new.tests) == 2 * 3
    # the unjittered setting reads the lesion cells: its AUC is high, and jitter does not raise it
    base = new.table[(new.table.sigma_px == 0) & (new.table.scale_sigma == 0.0)]
    assert (base.auc > 0.8).all()


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_jitter_probes_leave_out_a_cropped_away_pair_and_count_it():
    # before: a lesion box in the margin a centre crop cuts away made roi_local NaN, and the
    # probe raised "X has NaN or infinite values" for the whole analysis (reviewer's c6)
    from cxrcore.pooling import exclusion_reason

    rng = np.random.default_rng(0)
    h, w, side, stride, d = 64, 96, 64, 8, 6
    ids = [f"img{i:03d}" for i in range(24)]
    geoms = [make_geometry((h, w), side, stride, "center_crop") for _ in ids]
    rows = []
    for i, image_id in enumerate(ids):
        x1 = 2.0 if i == 0 else float(rng.integers(20, w - 32))  # image 0's lesion: wholly in the cropped margin
        y1, cx1, cy1 = float(rng.integers(0, h - 12)), float(rng.integers(20, w - 32)), float(rng.integers(0, h - 12))
        rows.append(dict(image_id=image_id, stratum="small" if i % 2 else "large", x1=x1, y1=y1, x2=x1 + 12,
                         y2=y1 + 12, cx1=cx1, cy1=cy1, cx2=cx1 + 12, cy2=cy1 + 12))
    pairs = pd.DataFrame(rows)
    grid = rng.normal(size=(len(ids), side // stride, side // stride, d)).astype(np.float32)
    for r in pairs.itertuples():  # lesion cells carry a signal (crop offset 16 px)
        i = ids.index(r.image_id)
        c0, c1 = max(0, int(r.x1 - 16) // stride), max(0, int(np.ceil((r.x2 - 16) / stride)))
        grid[i, int(r.y1) // stride:int(np.ceil(r.y2 / stride)), c0:c1, 0] += 2.0
    assert geoms[0].visible_fraction([tuple(pairs.loc[0, ["x1", "y1", "x2", "y2"]])])[0] == 0.0
    j = analysis.jitter_probes(pairs, {"enc": (grid, geoms)}, ids, lambda i: (h, w), sigmas_px=[0, 2],
                               scale_sigmas=[0.0], n_splits=3, seed=0, n_boot=50)
    base = j.table[j.table.sigma_px == 0].iloc[0]
    assert base.n_excluded == 2 and "2 boxes excluded" in base.note and np.isfinite(base.auc)
    s0 = j.scores["enc", 0, 0.0]
    assert np.isnan(s0[[0, len(pairs)]]).all() and np.isfinite(np.delete(s0, [0, len(pairs)])).all()
    ex = j.exclusions[j.exclusions.sigma_px == 0]
    assert dict(zip(ex.reason, ex["count"])) == {exclusion_reason(): 1,
                                                 "pair left out with it: its other box was excluded": 1}
    assert list(j.exclusions.columns) == ["encoder", "sigma_px", "scale_sigma", "reason", "count", "item"]
    # the comparison with no jitter uses the pairs pooled in both settings
    t = j.tests.iloc[0]
    n_both = int(np.isfinite(s0[: len(pairs)] + j.scores["enc", 2, 0.0][: len(pairs)]).sum())
    assert (t.n_pos, t.method) == (n_both, "delong_clustered") and np.isfinite(t.p_value)


def _readout_inputs(seed=0, n=48, side=96, stride=16, d=16, delta=4.0, shared=True, blob_on_decoys=False):
    """A ChestX-Det10-like cohort in tokens (no model): two images per patient, lesion boxes on positives with
    their controls, one decoy on each lesion-free image, per class.

    Tokens under a lesion box move by ``delta`` along the class's direction (``shared``) or
    along a direction of their own (nothing to learn from one image for another);
    ``blob_on_decoys`` moves the tokens under each decoy the same way, so that positives and
    negatives are alike in distribution and only the label tells them apart.
    Returns (meta, roi_rows, roi_local rows, Grids, pass ids, image scores).
    """
    from cxrcore.store import Grids

    rng = np.random.default_rng(seed)
    geom = make_geometry((side, side), side, stride, "resize")
    md = pd.DataFrame({"image_id": [f"img{i:03d}.png" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)]})
    for c in CLASSES:
        md[c] = (rng.permutation(n) < int(0.4 * n)).astype(int)
    grid = rng.normal(size=(n, side // stride, side // stride, d)).astype(np.float32)
    direction = {c: rng.normal(size=d) for c in CLASSES}
    rows, per_image = [], [[] for _ in range(n)]

    def box():
        w = float(rng.integers(16, 33))
        x1, y1 = rng.integers(0, side - w, 2).astype(float)
        return [x1, y1, x1 + w, y1 + w]

    def move(i, b, c):
        u = direction[c] if shared else rng.normal(size=d)
        grid[i][geom.cell_mask(tuple(b))] += delta * u / np.linalg.norm(u)

    for i, image_id in enumerate(md["image_id"]):
        for c in CLASSES:
            kinds = ["lesion"] * int(rng.integers(1, 3)) + ["control"] if md.at[i, c] else ["decoy"]
            for kind in kinds:
                b = box()
                if kind == "lesion" or (kind == "decoy" and blob_on_decoys):
                    move(i, b, c)
                rows.append({"image_id": image_id, "class": c, "kind": kind, "x1": b[0], "y1": b[1], "x2": b[2],
                             "y2": b[3]})
                per_image[i].append(b)
    roi_rows = pd.DataFrame(rows)
    X_roi, _ = roi_local(grid, [geom] * n, per_image)  # in roi_rows order: image by image
    pass_id = np.arange(n) + 100
    grids = Grids(pass_id, grid.astype(np.float16), [geom] * n)
    image_scores = {(k, c, m): rng.normal(size=n) for k in ("enc_a", "enc_b") for c in CLASSES
                    for m in ("cls", "patch_mean")}
    return md, roi_rows, X_roi, grids, pass_id, image_scores


def _old_readout_loop(md, roi_rows, roi_feats, grids, pass_ids, image_scores, readout_encoders, readouts, n_splits,
                      seed):
    """notebooks/chestxdet10.py before the move ("Recovery without a box"), verbatim but for the inputs."""
    from cxrcore.readouts import readout_scores

    classes, coords = CLASSES, ["x1", "y1", "x2", "y2"]
    visible = {key: np.isfinite(roi_feats[key]).all(axis=1) for key in readout_encoders}
    frames = []
    for key in readout_encoders:
        for c in classes:
            y = md[c].to_numpy().astype(int)
            folds = grouped_folds(y, md["patient_id"].to_numpy(), n_splits=n_splits, seed=seed)  # image_strata's folds
            # roi_local given a box: mean over the image's lesion boxes of the class, or its decoy
            mine = roi_rows["class"].eq(c) & roi_rows["kind"].isin(["lesion", "decoy"]) & visible[key]
            ids = roi_rows.loc[mine, "image_id"].to_numpy()
            X_roi = pd.DataFrame(roi_feats[key][mine.to_numpy()]).groupby(ids).mean()
            # patch labels for the token scorer: the lesion boxes of the image (none on lesion-free images)
            lesion = roi_rows[mine & roi_rows["kind"].eq("lesion")]
            patch_labels = {i: [tuple(b) for b in g[coords].to_numpy(float)] for i, g in lesion.groupby("image_id")}
            f = md[["image_id", "patient_id"]].assign(
                encoder=key, label=y, fold=folds, pass_id=pass_ids[key],
                boxes=[patch_labels.get(i, []) for i in md["image_id"]],
                cls=image_scores[key, c, "cls"], patch_mean=image_scores[key, c, "patch_mean"])
            f["class"] = c
            f = f[f["image_id"].isin(X_roi.index)]  # an image whose every box was excluded has no roi_local
            f["roi_local"] = out_of_fold_scores(X_roi.loc[f["image_id"]].to_numpy(), f["label"].to_numpy(),
                                                f["patient_id"].to_numpy(), folds=f["fold"].to_numpy())
            frames.append(readout_scores(f, grids[key], "label", by=["class"], box_col="boxes",
                                         readouts=readouts, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _with_a_cropped_away_decoy(md, roi_rows, X_roi):
    """enc_b's rows with the decoy of the first lesion-free Mass image cut away (NaN), as the crop leaves it."""
    decoy = roi_rows.index[(roi_rows["class"] == "Mass") & (roi_rows["kind"] == "decoy")][0]
    cut = X_roi.copy()
    cut[decoy] = np.nan
    return {"enc_a": X_roi, "enc_b": cut}, roi_rows.at[decoy, "image_id"]


def test_image_readouts_gives_the_old_notebook_frame():
    md, roi_rows, X_roi, grids, pass_id, image_scores = _readout_inputs(seed=1)
    roi, _ = _with_a_cropped_away_decoy(md, roi_rows, X_roi)
    kw = dict(readouts=["gem", "patch_max", "topk_mean", "mil"], n_splits=3, seed=2)
    both = {"enc_a": grids, "enc_b": grids}
    ids = {"enc_a": pass_id, "enc_b": pass_id}
    old = _old_readout_loop(md, roi_rows, roi, grids=both, pass_ids=ids, image_scores=image_scores,
                            readout_encoders=["enc_a", "enc_b"], **kw)
    new = analysis.image_readouts(md, roi_rows, roi, both, ids, image_scores, CLASSES, **kw)
    pd.testing.assert_frame_equal(new, old)
    assert analysis.image_readouts(md, roi_rows, roi, {}, {}, image_scores, CLASSES, **kw).empty


def test_image_readouts_rows_folds_and_patch_labels():
    md, roi_rows, X_roi, grids, pass_id, image_scores = _readout_inputs(seed=1)
    roi, cut_image = _with_a_cropped_away_decoy(md, roi_rows, X_roi)
    scores = analysis.image_readouts(md, roi_rows, roi, {"enc_b": grids, "enc_a": grids},
                                     {"enc_a": pass_id, "enc_b": pass_id}, image_scores, CLASSES,
                                     readouts=["gem", "patch_max"], n_splits=3, seed=0)
    assert list(scores.drop_duplicates(["encoder", "class"])[["encoder", "class"]].itertuples(index=False)) == [
        ("enc_b", "Nodule"), ("enc_b", "Mass"), ("enc_a", "Nodule"), ("enc_a", "Mass")], "grids' order, then classes"
    for (key, c), part in scores.groupby(["encoder", "class"], sort=False):
        gone = {cut_image} if (key, c) == ("enc_b", "Mass") else set()
        assert list(part["image_id"]) == [i for i in md["image_id"] if i not in gone], (key, c)
        keep = md["image_id"].isin(part["image_id"]).to_numpy()
        # cls and patch_mean are image_strata's scores; the folds are its patient-grouped folds
        np.testing.assert_array_equal(part["cls"], image_scores[key, c, "cls"][keep])
        np.testing.assert_array_equal(part["patch_mean"], image_scores[key, c, "patch_mean"][keep])
        folds = grouped_folds(md[c].to_numpy(), md["patient_id"].to_numpy(), n_splits=3, seed=0)
        np.testing.assert_array_equal(part["fold"], folds[keep])
        assert (part.groupby("patient_id")["fold"].nunique() == 1).all()
        np.testing.assert_array_equal(part["label"], md.loc[keep, c])
        np.testing.assert_array_equal(part["pass_id"], pass_id[keep])
        # patch labels: the image's lesion boxes of the class, never a control or a decoy
        lesions = roi_rows[(roi_rows["class"] == c) & (roi_rows["kind"] == "lesion")]
        for r in part.itertuples():
            want = [tuple(b) for b in lesions.loc[lesions["image_id"] == r.image_id, ["x1", "y1", "x2", "y2"]]
                    .to_numpy(float)]
            assert r.boxes == want, (key, c, r.image_id)
        assert part[["roi_local", "gem", "patch_max"]].notna().all().all()


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")
def test_image_readouts_token_scorer_never_sees_a_test_fold_image():
    """Leakage check: every lesion has a direction of its own and every decoy a blob like it, so a lesion image and a
    lesion-free one differ only in their label. Out of fold no score beats chance; a token scorer that had seen the
    test images' lesion boxes would (checked below on the same data)."""
    from cxrcore.readouts import TokenScorer, top_k_mean

    readouts = ["gem", "patch_max", "topk_mean", "mil"]
    aucs, leaked = {r: [] for r in ["roi_local", *readouts]}, []
    for seed in range(3):
        md, roi_rows, X_roi, grids, pass_id, image_scores = _readout_inputs(seed=seed, n=64, d=128, delta=8.0,
                                                                            shared=False, blob_on_decoys=True)
        scores = analysis.image_readouts(md, roi_rows, {"enc_a": X_roi}, {"enc_a": grids}, {"enc_a": pass_id},
                                         image_scores, CLASSES, readouts=readouts, n_splits=4, seed=seed)
        for c, part in scores.groupby("class"):
            y = part["label"].to_numpy()
            for r in aucs:
                aucs[r].append(auc(y, part[r].to_numpy()))
            # the same data, the same scorer, with every image's lesion boxes in its training set
            seen = TokenScorer(random_state=seed).fit(grids.grid, y, grids.geometry, list(part["boxes"]))
            leaked.append(auc(y, top_k_mean(seen.score_tokens(grids.grid), 1)))
    for r, v in aucs.items():
        assert abs(np.mean(v) - 0.5) < 0.1, (r, np.round(v, 3))
    assert np.mean(leaked) > 0.75, np.round(leaked, 3)  # the check has the power to see a leak


def test_image_readouts_uses_the_folds_image_strata_drew():
    """Given ImageStrata.folds, every image-level score of a class is out of fold on image_strata's very split."""
    md, roi_rows, X_roi, grids, pass_id, image_scores = _readout_inputs(seed=1)
    folds = {c: (np.arange(len(md)) * 7 + i) % 3 for i, c in enumerate(CLASSES)}  # not what grouped_folds draws
    md = md.assign(patient_id=md["image_id"])  # one image per patient, so any split is patient-grouped
    scores = analysis.image_readouts(md, roi_rows, {"enc_a": X_roi}, {"enc_a": grids}, {"enc_a": pass_id}, image_scores, CLASSES,
                                     readouts=["gem"], seed=0, folds=folds)
    for c, part in scores.groupby("class"):
        keep = md["image_id"].isin(part["image_id"]).to_numpy()
        np.testing.assert_array_equal(part["fold"], folds[c][keep])
    with pytest.raises(ValueError, match="folds\\['Nodule'\\] has 3 entries"):
        analysis.image_readouts(md, roi_rows, {"enc_a": X_roi}, {"enc_a": grids}, {"enc_a": pass_id}, image_scores, CLASSES,
                                readouts=["gem"], seed=0, folds={c: np.zeros(3, int) for c in CLASSES})


def test_image_strata_keeps_the_folds_it_drew():
    md, boxes, emb = _cohort()
    new = analysis.image_strata(md, boxes, emb, CLASSES, n_splits=3, seed=2, n_boot=20)
    for c in CLASSES:
        np.testing.assert_array_equal(new.folds[c], grouped_folds(md[c].to_numpy(), md["patient_id"].to_numpy(),
                                                                  n_splits=3, seed=2))
