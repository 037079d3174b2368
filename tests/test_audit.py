"""The audit card: the dilution expectation on exactly mean-shifted tokens, detectable footprints, the record's
schema, the command (resume, bad input)."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch

from cxrcore import audit as A
from cxrcore.geometry import make_geometry
from cxrcore.perturb import PerturbationCell, footprint_box
from cxrcore.pooling import patch_mean, roi_local
from cxrcore.probes import LinearProbe
from cxrcore.store import Embeddings, geometry_to_json


def mean_shift_panel(footprints=(16, 48, 96), *, n_images=500, dim=8, grid=16, stride=16, delta=4.0,
                     s_between=0.3, s_within=1.0, seed=0):
    """A panel 'encoded' by a synthetic encoder: tokens are built, not computed by a model.

    Image i's tokens are mu_i + noise (mu_i ~ N(0, s_between^2), noise ~ N(0, s_within^2) per
    token); its perturbed copy in a cell adds exactly ``delta * u`` to the tokens of the cells
    the box touches and nothing elsewhere (the dilution model's assumption, exactly true).
    ``cls`` carries no lesion signal at all (the same random vector in both arms).
    """
    rng = np.random.default_rng(seed)
    side = grid * stride
    geom = make_geometry((side, side), side, stride, "resize")
    gj = geometry_to_json(geom)
    u = np.zeros(dim)
    u[0] = 1.0
    meta, feats = [], {"cls": [], "patch_mean": [], "roi_local": []}
    cells = [PerturbationCell("nodule", f, 0.3) for f in footprints]
    for i in range(n_images):
        tokens = rng.normal(0, s_between, dim) + rng.normal(0, s_within, (grid, grid, dim))
        cls = rng.normal(size=dim)
        for c, cell in enumerate(cells):
            r = cell.footprint_px / 2 + 2
            center = (rng.uniform(r, side - r), rng.uniform(r, side - r))
            box = footprint_box(center, cell.footprint_px, (side, side))
            mask = geom.cell_mask(box)
            pert = tokens.copy()
            pert[mask] += delta * u
            for arm, t in ((0, tokens), (1, pert)):
                g = torch.from_numpy(t[None]).float()
                feats["cls"].append(cls)
                feats["patch_mean"].append(patch_mean(g).numpy()[0])
                feats["roi_local"].append(roi_local(g, [geom], [[box]])[0][0])
                meta.append({"image_index": i, "image_id": f"img{i:04d}", "patient_id": f"p{i:04d}", "cell": cell.name,
                             "kind": cell.kind, "footprint_px": cell.footprint_px, "strength": cell.strength, "arm": arm,
                             "pass_id": i * 10 + (c + 1) * arm, "box_index": c if arm == 0 else 0, "geometry": gj,
                             "x1": float(box[0]), "y1": float(box[1]), "x2": float(box[2]), "y2": float(box[3])})
    emb = Embeddings(pd.DataFrame(meta), {k: np.asarray(v, np.float32) for k, v in feats.items()})
    n_tok = grid * grid
    sigma = math.sqrt(s_between ** 2 + s_within ** 2 / n_tok)
    return emb, [c.to_dict() for c in cells], {"n_tokens": n_tok, "sigma": sigma, "delta": delta}


def test_expected_auc_is_the_binormal_formula():
    assert A.expected_auc(0.0, 1.0) == pytest.approx(0.5)
    assert A.expected_auc(math.sqrt(2), 1.0) == pytest.approx(0.8413447, abs=1e-6)  # Phi(1)
    assert A.expected_auc(-math.sqrt(2), 2.0) == pytest.approx(1 - A.expected_auc(math.sqrt(2), 2.0))


@pytest.fixture(scope="module")
def mean_shift_audit():
    emb, cells, truth = mean_shift_panel()
    # one C: the expectation is for a readout along a direction, not for a C chosen per fold (whose strong
    # regularisation changes the score scale between folds and costs the pooled out-of-fold AUC a little)
    found = A.analyse(emb, cells, n_splits=4, n_boot=300, seed=0, probe=LinearProbe(Cs=(1.0,)))
    return found, truth


def test_measured_patch_mean_auc_matches_the_dilution_expectation(mean_shift_audit):
    """Tokens exactly mean-shifted under the box: the measured patch_mean AUC's CI holds the expectation."""
    found, truth = mean_shift_audit
    dil = found["dilution"].set_index("cell")
    pm = found["auc"][found["auc"]["pooling"] == "patch_mean"].set_index("cell")
    assert len(dil) == 3
    for cell, r in dil.iterrows():
        # the estimates recover the construction
        assert r["n_tokens"] == truth["n_tokens"]
        assert r["delta"] == pytest.approx(truth["delta"], rel=1e-4)
        assert r["sigma"] == pytest.approx(truth["sigma"], rel=0.15)
        assert r["spill_ratio"] == pytest.approx(1.0, abs=1e-4)  # nothing outside the box moved
        assert r["predicted_shift"] == pytest.approx(r["k_mean"] * truth["delta"] / truth["n_tokens"], rel=1e-4)
        # the analytic AUC from the true parameters lies in the estimate's CI
        truth_auc = A.expected_auc(r["k_mean"] * truth["delta"] / truth["n_tokens"], truth["sigma"])
        assert r["expected_ci_low"] - 0.02 <= truth_auc <= r["expected_ci_high"] + 0.02, cell
        m = pm.loc[cell]
        assert m["ci_low"] <= r["expected_auc"] <= m["ci_high"], (cell, m["auc"], m["ci_low"], m["ci_high"], r["expected_auc"])
    # the sweep spans chance to near-perfect, so the check is not trivially at one end
    assert dil["expected_auc"].min() < 0.6 and dil["expected_auc"].max() > 0.95
    assert (pm.loc[dil.index, "ci_high"] - pm.loc[dil.index, "ci_low"]).max() < 0.05  # a CI narrow enough to fail


def test_cls_without_signal_is_flagged_below_the_expectation(mean_shift_audit):
    found, _ = mean_shift_audit
    dil = found["dilution"]
    assert dil["cls_auc"].between(0.45, 0.55).all()
    assert dil["cls_below_expectation"].all()
    # a cls that carries the signal as well as patch_mean is not flagged
    pm = found["auc"][found["auc"]["pooling"] == "patch_mean"].set_index("cell")
    fake = dil.assign(cls_ci_high=dil["cell"].map(pm["ci_high"]))
    assert not (fake["cls_ci_high"] < fake["expected_auc"]).any()


def test_detectable_footprint_is_the_smallest_cleared_footprint():
    t = pd.DataFrame({"series": "s", "pooling": "cls", "footprint_px": [8, 16, 32, 64],
                      "footprint_patches": [0.5, 1, 2, 4], "ci_low": [0.5, 0.8, 0.7, 0.9]})
    t = pd.concat([t, t.assign(pooling="roi_local", ci_low=[0.5, 0.6, 0.7, 0.74])])
    d = A.detectable_footprint(t, 0.75).set_index("pooling")
    assert d.loc["cls", "footprint_px"] == 16 and d.loc["cls", "footprint_patches"] == 1 and d.loc["cls", "reached"]
    assert not d.loc["roi_local", "reached"] and np.isnan(d.loc["roi_local", "footprint_px"])
    assert d.loc["roi_local", "largest_px"] == 64


def test_effective_patch_side_in_original_pixels():
    g = make_geometry((512, 512), 518, 14, "center_crop")
    assert A.effective_patch_px(g) == pytest.approx(14 * 512 / 518)
    assert A.effective_patch_px(make_geometry((1024, 1024), 224, 16, "resize")) == pytest.approx(16 * 1024 / 224)


TINY_PANEL = """name: tiny-audit
cells:
  - kind: nodule
    footprint_px: [12, 48]
    strength: 0.4
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    panel = d / "tiny.yml"
    panel.write_text(TINY_PANEL)
    argv = ["rad-dino", "--stand-in", "--panel", str(panel), "--n-images", "8", "--n-boot", "20", "--n-splits", "2",
            "--image-size", "128", "--input-size", "112", "--num-workers", "0", "--no-progress", "--out", str(d / "out")]
    assert A.main(argv) == 0
    return d, argv


def test_audit_writes_a_record_that_validates_and_a_self_contained_card(tiny_run, capsys):
    d, _ = tiny_run
    rec = json.loads((d / "out" / "audit.json").read_text())
    A.validate_record(rec)
    jsonschema.Draft7Validator.check_schema(A.load_schema())
    assert rec["encoder"]["key"] == "rad-dino" and rec["stand_in"] and rec["synthetic"]
    assert rec["encoder"]["weights_id"].startswith("stand-in:")
    assert rec["encoder"]["grid"] == [8, 8] and rec["encoder"]["n_tokens"] == 64
    assert rec["cohort"]["n_images"] == 8 and rec["parameters"]["threshold"] == 0.75
    assert {r["pooling"] for r in rec["auc"]} == {"cls", "patch_mean", "roi_local"}
    assert len(rec["auc"]) == 2 * 3 and len(rec["dilution"]) == 2
    assert {r["pooling"] for r in rec["detectable"]} == {"cls", "patch_mean", "roi_local", A.EXPECTED}
    assert "stand-in" in rec["verdict"][0]
    page = (d / "out" / "audit.html").read_text()
    assert "data:image/png;base64," in page and "random-weight stand-in" in page
    assert "src=\"http" not in page and "<script" not in page  # one self-contained page
    # the analysis is reproducible from the store alone, without the model
    again = A.analyse_store(d / "out" / "store", n_splits=2, n_boot=20, seed=0)
    got = pd.DataFrame(rec["auc"]).set_index(["cell", "pooling"])["auc"]
    assert np.allclose(again["auc"].set_index(["cell", "pooling"])["auc"].reindex(got.index), got)


def test_rerun_resumes_from_the_store(tiny_run, capsys):
    d, argv = tiny_run
    capsys.readouterr()
    assert A.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = json.loads((d / "out" / "audit.json").read_text())
    assert summary["resumed_chunks"] == rec["store"]["chunks_total"] and rec["store"]["chunks_written"] == 0


def test_schema_rejects_a_broken_record(tiny_run):
    d, _ = tiny_run
    rec = json.loads((d / "out" / "audit.json").read_text())
    for broken in ({k: v for k, v in rec.items() if k != "verdict"},
                   {**rec, "auc": [{**rec["auc"][0], "auc": 1.7}] + rec["auc"][1:]},
                   {**rec, "encoder": {**rec["encoder"], "grid": [8]}}):
        with pytest.raises(jsonschema.ValidationError):
            A.validate_record(broken)


@pytest.mark.parametrize("argv, words", [
    (["no-such-encoder", "--stand-in", "--out", "X"], ["unknown encoder", "accepted", "rad-dino", "timm:"]),
    (["rad-dino", "--stand-in", "--cohort", "no-such-cohort", "--out", "X"], ["unknown cohort", "accepted", "synthetic"]),
    (["rad-dino", "--stand-in", "--cohort", "nih", "--out", "X"], ["needs data_root"]),
    (["rad-dino", "--stand-in", "--threshold", "0.3", "--out", "X"], ["threshold", "0.5"]),
])
def test_bad_input_stops_with_what_is_accepted(argv, words, tmp_path, capsys):
    argv = [a if a != "X" else str(tmp_path / "out") for a in argv]
    assert A.main(argv) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out" / "store").exists()  # stopped before any work


def test_register_adds_the_subcommand_to_a_parser():
    import argparse

    p = argparse.ArgumentParser(prog="cxrcore")
    sub = p.add_subparsers(dest="command", required=True)
    A.register(sub)
    args = p.parse_args(["audit", "timm:vit_small_patch16_224", "--stand-in", "--quick", "--device", "cuda", "--out", "d"])
    assert args.run is A.run and args.encoder == "timm:vit_small_patch16_224" and args.quick and args.device == "cuda"
    with pytest.raises(SystemExit):
        p.parse_args(["audit", "rad-dino", "--stand-in", "--weights", "w", "--out", "d"])  # one or the other


def test_audit_with_box_free_readouts(tmp_path):
    panel = tmp_path / "tiny.yml"
    panel.write_text(TINY_PANEL)
    out = tmp_path / "out"
    assert A.main(["rad-dino", "--stand-in", "--panel", str(panel), "--n-images", "8", "--n-boot", "20",
                   "--n-splits", "2", "--image-size", "128", "--input-size", "112", "--num-workers", "0",
                   "--no-progress", "--readouts", "--out", str(out)]) == 0
    rec = json.loads((out / "audit.json").read_text())
    A.validate_record(rec)
    assert rec["store"]["path"] == "store-grids" and (out / "store-grids").is_dir() and not (out / "store").exists()
    assert rec["parameters"]["readouts"] == ["gem", "patch_max", "topk_mean", "mil"]
    assert {r["pooling"] for r in rec["auc"]} == {"cls", "patch_mean", "roi_local", "gem", "patch_max", "topk_mean", "mil"}
    assert {r["score"] for r in rec["gap_closure"]} >= {"gem", "patch_max", "mil"}
    assert all(r["needs"] for r in rec["gap_closure"])
    assert "Without a box" in (out / "audit.html").read_text()


def test_side_by_side_helpers(mean_shift_audit):
    found, _ = mean_shift_audit
    rec = {"parameters": {"threshold": 0.75}, "label": "synthetic tokens", "stand_in": False, "synthetic": True}
    res = A.AuditResult(rec, found["auc"], found["dilution"], found["detectable"], found["comparisons"], [])
    both = {"a": res, "b": res}
    wide = A.footprints_side_by_side(both)
    assert list(wide.columns) == ["series", "pooling", "a", "b"]
    assert set(wide["pooling"]) == {"cls", "patch_mean", "roi_local", A.EXPECTED}
    flags = A.flags_table(both).set_index("encoder")
    assert flags.loc["a", "cls below expectation"] == 3 and flags.loc["a", "median spill ratio"] == pytest.approx(1.0)
    assert not any(line.startswith(("Produced with", "Detected means")) for line in res.findings)
    assert any("roi_local detects it from" in line for line in res.findings)
    fig = A.cards_figure(both, label="synthetic tokens")
    assert len(fig.axes) == 2 * 1
    three = {"dino-resnet50": res, "rad-dino": res, "biomedclip": res}  # drawn in the book's encoder order
    fig = A.encoders_figure(three, col_wrap=2, title="t", label="synthetic tokens")
    drawn = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.axison]
    assert drawn[:3] == ["rad-dino", "biomedclip", "dino-resnet50"] and "synthetic tokens" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="series 'nope' is not in the audits"):
        A.encoders_figure(three, series="nope")


def test_resize_short_reaches_the_encoder(monkeypatch, tmp_path, capsys):
    """`cxrcore audit ... --resize-short 256` loads the encoder with it (stopped there: the run is the extract path)."""
    seen = {}

    def load_encoder(key, **kw):
        seen.update(key=key, **kw)
        raise ValueError("stop here")

    monkeypatch.setattr("cxrcore.encoders.load_encoder", load_encoder)
    assert A.main(["dino-resnet50", "--stand-in", "--resize-short", "256", "--n-images", "2", "--num-workers", "0",
                   "--no-progress", "--out", str(tmp_path / "out")]) == 2
    assert "stop here" in capsys.readouterr().err
    assert (seen["key"], seen["resize_short"], seen["input_size"]) == ("dino-resnet50", 256, None)
