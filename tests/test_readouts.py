"""Box-free readouts: gem, token scorer (patch_max / topk_mean), LSE-MIL; no leakage across folds; gap closure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrcore import readouts as R
from cxrcore.geometry import make_geometry
from cxrcore.perturb import PerturbationCell, footprint_box
from cxrcore.pooling import patch_mean, roi_local
from cxrcore.probes import LinearProbe, out_of_fold_table

FAST = LinearProbe(Cs=(1.0,))  # one C: the tests are about the readouts, not about choosing C
from cxrcore.stats import auc
from cxrcore.store import Grids, geometry_to_json


def token_panel(footprints=(16, 40), *, n_images=60, dim=16, grid=8, stride=16, delta=3.0, s_between=0.5,
                s_within=1.0, seed=0):
    """A two-cell panel with tokens built directly (no model): the perturbed arm adds ``delta * u`` under the box.

    Returns (meta with cls / patch_mean / roi_local features, Grids of every forward pass).
    ``cls`` is unrelated to the lesion (the same random vector in both arms).
    """
    rng = np.random.default_rng(seed)
    side = grid * stride
    geom = make_geometry((side, side), side, stride, "resize")
    gj = geometry_to_json(geom)
    u = rng.normal(size=dim)
    u /= np.linalg.norm(u)
    cells = [PerturbationCell("nodule", f, 0.3) for f in footprints]
    meta, feats = [], {"cls": [], "patch_mean": [], "roi_local": []}
    pass_ids, grids = [], []
    for i in range(n_images):
        base = (rng.normal(0, s_between, dim) + rng.normal(0, s_within, (grid, grid, dim))).astype(np.float32)
        cls = rng.normal(size=dim)
        pid0 = i * (len(cells) + 1)
        pass_ids.append(pid0)
        grids.append(base)
        for c, cell in enumerate(cells):
            r = cell.footprint_px / 2 + 2
            box = footprint_box((rng.uniform(r, side - r), rng.uniform(r, side - r)), cell.footprint_px, (side, side))
            pert = base.copy()
            pert[geom.cell_mask(box)] += delta * u
            pass_ids.append(pid0 + c + 1)
            grids.append(pert)
            for arm, t, pid in ((0, base, pid0), (1, pert, pid0 + c + 1)):
                g = torch.from_numpy(t[None])
                feats["cls"].append(cls)
                feats["patch_mean"].append(patch_mean(g).numpy()[0])
                feats["roi_local"].append(roi_local(g, [geom], [[box]])[0][0])
                meta.append({"image_id": f"img{i:03d}", "patient_id": f"p{i:03d}", "cell": cell.name, "arm": arm,
                             "pass_id": pid, "box_index": c if arm == 0 else 0, "geometry": gj,
                             "x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3])})
    meta = pd.DataFrame(meta)
    feats = {k: np.asarray(v, np.float32) for k, v in feats.items()}
    g = Grids(np.asarray(pass_ids, np.int64), np.stack(grids).astype(np.float16), [geom] * len(pass_ids))
    return meta, feats, g


@pytest.fixture(scope="module")
def panel():
    meta, feats, grids = token_panel()
    oof = out_of_fold_table(meta, feats, "arm", by=["cell"], n_splits=4, seed=0, probe=FAST)
    scored, fits = R.readout_scores(oof, grids, "arm", by=["cell"], seed=0, probe=FAST, return_fits=True)
    return meta, feats, grids, oof, scored, fits


def _auc(df, col):
    return auc(df["arm"].to_numpy(), df[col].to_numpy())


def test_box_free_readouts_recover_a_diluted_lesion(panel):
    *_, scored, _ = panel
    small = scored[scored["cell"] == "nodule_d16_s0.3"]
    assert scored[list(R.READOUTS)].notna().all().all()
    assert _auc(small, "roi_local") > 0.95 and _auc(small, "cls") < 0.65
    for r in ("patch_max", "topk_mean", "mil"):
        assert _auc(small, r) > _auc(small, "patch_mean") + 0.1, r
    assert _auc(small, "gem") > _auc(small, "cls")


def test_no_fit_sees_a_test_fold_image(panel):
    *_, scored, fits = panel
    assert {f["readout"] for f in fits} == {"gem", "token_scorer", "mil"}
    assert len(fits) == 2 * 4 * 3  # cells x folds x fits
    for f in fits:
        assert not set(f["train_groups"]) & set(f["test_groups"])
        if f["readout"] == "token_scorer":
            seen = set(f["estimator"].train_groups_)
            assert seen and not seen & set(f["test_groups"]), "the token scorer trained on a test-fold image"
            assert seen <= set(f["train_groups"])
            assert f["estimator"].n_pos_ > 0 and f["estimator"].n_neg_ > 0


def test_folds_that_share_a_patient_are_refused(panel):
    *_, grids, oof, _, _ = panel
    bad = oof.copy()
    first = bad.index[bad["patient_id"] == bad["patient_id"].iloc[0]]
    bad.loc[first[0], "fold"] = (bad.loc[first[0], "fold"] + 1) % 4
    with pytest.raises(ValueError, match="both the training and the test rows"):
        R.readout_scores(bad, grids, "arm", by=["cell"], readouts=("gem",))


def test_shuffled_labels_give_chance(panel):
    """Leakage check: with labels shuffled (folds kept), no readout beats chance out of fold."""
    meta, feats, grids = token_panel(n_images=100, dim=48, footprints=(40,), seed=3)
    oof = out_of_fold_table(meta, feats, "arm", by=["cell"], n_splits=4, seed=0, probe=FAST)
    aucs = {r: [] for r in R.READOUTS}
    for k in range(3):
        shuffled = oof.assign(arm=np.random.default_rng(k).permutation(oof["arm"].to_numpy()))
        s = R.readout_scores(shuffled, grids, "arm", by=["cell"], seed=0, probe=FAST)
        for r in R.READOUTS:
            aucs[r].append(_auc(s, r))
    for r, v in aucs.items():
        assert abs(np.mean(v) - 0.5) < 0.08, (r, v)


def test_gem_spans_mean_to_signed_max():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float16)
    center = rng.normal(size=6)
    xf = x.astype(np.float32).reshape(3, -1, 6)
    np.testing.assert_allclose(R.gem(x, 1.0, center), xf.mean(1) - center.astype(np.float32), rtol=1e-5, atol=1e-5)
    z = xf - center.astype(np.float32)
    extreme = np.take_along_axis(z, np.abs(z).argmax(1)[:, None], 1)[:, 0]
    np.testing.assert_allclose(R.gem(x, 101.0, center), extreme, rtol=0.06)
    np.testing.assert_array_equal(R.gem(x, 3.0, center, chunk=1), R.gem(x, 3.0, center, chunk=64))
    pool = R.GeMPooling(p=3.0).fit(x)
    np.testing.assert_allclose(pool.center_, xf.reshape(-1, 6).mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match="p must be >= 1"):
        R.gem(x, 0.5)


def test_top_k_mean():
    s = np.array([[[1.0, 5.0], [3.0, 2.0]]])
    assert R.top_k_mean(s, 1)[0] == 5.0 and R.top_k_mean(s, 2)[0] == 4.0 and R.top_k_mean(s, 99)[0] == 2.75


def test_lse_mil_is_deterministic_and_learns_from_image_labels_only():
    rng = np.random.default_rng(1)
    n, tokens, dim = 80, 36, 8
    x = rng.normal(size=(n, 6, 6, dim)).astype(np.float32)
    y = np.r_[np.zeros(n // 2), np.ones(n // 2)]
    x[y == 1, 2, 3, 0] += 4.0  # one positive instance per positive bag
    a = R.LSEMIL(r=8.0).fit(x[::2].astype(np.float16), y[::2])
    b = R.LSEMIL(r=8.0, chunk=3).fit(x[::2].astype(np.float16), y[::2])
    torch.testing.assert_close(a.w_, b.w_, rtol=1e-4, atol=1e-5)
    held_out = a.decision_function(x[1::2])
    assert auc(y[1::2], held_out) > 0.9
    assert auc(y[1::2], x[1::2].reshape(n // 2, tokens, dim).mean(1)[:, 0]) < 0.85  # the mean token dilutes it
    with pytest.raises(ValueError, match="both classes"):
        R.LSEMIL().fit(x[:4], np.zeros(4))


def test_token_scorer_needs_boxes_and_negatives():
    g = make_geometry((64, 64), 64, 16, "resize")
    x = np.zeros((2, 4, 4, 3), np.float16)
    with pytest.raises(ValueError, match="positive images with boxes"):
        R.TokenScorer().fit(x, [1, 1], [g, g], [[(0, 0, 16, 16)], []])


def test_gap_closure_table(panel):
    *_, scored, _ = panel
    t = R.gap_closure_table(scored, "arm", by=["cell"], n_boot=200, seed=0)
    assert set(t["score"]) == {"cls", "patch_mean", "roi_local", *R.READOUTS}
    assert len(t) == 2 * 7 and t["needs"].notna().all()
    one = t[t["cell"] == "nodule_d16_s0.3"].set_index("score")
    assert one.loc["cls", "closure"] == 0 and one.loc["roi_local", "closure"] == 1
    assert one.loc["roi_local", "gap"] > 0.3
    pm = one.loc["patch_max"]
    assert pm["closure_ci_low"] <= pm["closure"] <= pm["closure_ci_high"]
    assert pm["closure"] == pytest.approx((pm["auc"] - one.loc["cls", "auc"]) / pm["gap"])
    assert pm["p_value"] < 0.05 and pm["delta"] > 0
    assert 0 <= pm["fpr"] <= 1 and pm["fpr"] < one.loc["cls", "fpr"]
    assert (one["fpr_cls"] == one.loc["cls", "fpr"]).all()
    assert np.isnan(one.loc["cls", "p_value"])  # cls is the reference, not tested against itself


def test_fpr_at_sensitivity_definition():
    y = np.r_[np.ones(10), np.zeros(4)]
    s = np.r_[np.arange(10.0), [0.5, 1.0, 8.5, 20.0]]
    fpr, fp, n = R._fpr_at_sensitivity(y, s, 0.9)  # threshold 1.0 keeps 9 of 10 positives
    assert (fp, n) == (3, 4) and fpr == 0.75


def test_check_readouts_names_what_is_accepted():
    from cxrcore.readouts import READOUTS, check_readouts

    check_readouts(list(READOUTS), ["rad-dino"], ["rad-dino", "biomedclip"])
    check_readouts([], ["dinov2-b14"], ["rad-dino"])  # no readouts: their encoders do not matter
    with pytest.raises(ValueError, match=r"readouts \['max_pool'\]: accepted are .*max_pool: unknown readout"):
        check_readouts(["gem", "max_pool"], ["rad-dino"], ["rad-dino"])
    with pytest.raises(ValueError, match="share no encoder with encoders.*accepted: a subset of encoders"):
        check_readouts(["gem"], ["dinov2-b14"], ["rad-dino"])
