"""The book's figure and table helpers: keys, files, labels, one build at a time, one house style."""

import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from cxrcore import report
from cxrcore.cohorts import SyntheticCohort


def test_keys_must_be_namespaced():
    assert report.check_key("fig-panel-auc") == "fig-panel-auc"
    for bad in ("panel-auc", "fig_panel", "Fig-x", "fig-"):
        with pytest.raises(ValueError, match="glue key"):
            report.check_key(bad)


def test_publish_writes_files_returns_none_and_leaves_no_temp(tmp_path):
    df = pd.DataFrame({"pooling": ["cls", "patch_mean", "roi_local"], "auc": [0.5, 0.55, 0.9],
                       "ci_low": [0.4, 0.45, 0.8], "ci_high": [0.6, 0.65, 0.97], "encoder": "rad-dino"})
    assert report.publish_table(df, "tab-x-auc", tmp_path) is None
    assert report.publish_figure(report.auc_by_pooling_figure(df, x="encoder"), "fig-x-auc", tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig-x-auc.png", "tab-x-auc.csv"]
    assert pd.read_csv(tmp_path / "tab-x-auc.csv").equals(df)


def test_with_ci_formats_missing_values_honestly():
    df = pd.DataFrame({"auc": [0.7123, 0.6, np.nan], "ci_low": [0.65, np.nan, np.nan], "ci_high": [0.77, np.nan, np.nan]})
    assert report.with_ci(df).tolist() == ["0.712 [0.650, 0.770]", "0.600", "not estimable"]


def test_provenance_label_and_record(tmp_path, monkeypatch):
    c = SyntheticCohort(n_images=2)
    monkeypatch.setenv("CXRCORE_BUILD_MODE", "smoke")
    label = report.record_run(tmp_path, cohort=c, stand_in=True, encoders=["rad-dino"])
    assert label == report.STAND_IN_LABEL
    rec = json.loads((tmp_path / report.PROVENANCE_FILE).read_text())
    assert rec["build_mode"] == "smoke" and rec["synthetic"] and rec["stand_in"]
    assert report.provenance_label("nih", False, False) == "nih cohort, published encoder weights"


def test_summaries_from_two_builds_are_refused(tmp_path, monkeypatch):
    row = pd.DataFrame([{c: 0.5 if c in ("auc", "ci_low", "ci_high") else "x" for c in report.SUMMARY_COLUMNS}])
    c = SyntheticCohort(n_images=2)
    for name, mode in (("a", "default"), ("b", "default")):
        monkeypatch.setenv("CXRCORE_BUILD_MODE", mode)
        report.record_run(tmp_path / name, cohort=c, stand_in=True, encoders=[])
        report.write_summary(row, tmp_path / name)
    assert report.collect_summaries(tmp_path)["chapter"].tolist() == ["a", "b"]
    monkeypatch.setenv("CXRCORE_BUILD_MODE", "smoke")
    report.record_run(tmp_path / "b", cohort=c, stand_in=True, encoders=[])
    with pytest.raises(ValueError, match="different builds"):
        report.collect_summaries(tmp_path)
    with pytest.raises(ValueError, match="lack column"):
        report.write_summary(row.drop(columns=["what"]), tmp_path / "a")


# -- tables for reading --------------------------------------------------------------------
def test_tables_read_like_a_paper():
    df = pd.DataFrame({"encoder": ["rad-dino", "biomedclip"], "auc": [0.774123, 0.5], "excluded": [2.0, 0.0],
                       "footprint_px": [12.0, 24.0], "p_value": [0.0067, 3e-9], "log10_p": [-2.17, -8.5],
                       "se": [2e-6, 0.0123], "seconds": [86.580480, 1.011719], "area_px": [12345.6, 7.0],
                       "where": [Path("/data/x.png"), None], "cells": [["a", "b"], [1, 2]]})
    out = report.format_for_reading(df)
    assert list(out.columns) == list(df.columns)  # no index column
    r0, r1 = out.iloc[0], out.iloc[1]
    assert (r0["auc"], r1["auc"]) == ("0.774", "0.500")
    assert (r0["excluded"], r1["excluded"]) == ("2", "0")  # counts are integers, not "2.0"
    assert r0["footprint_px"] == "12"
    assert (r0["p_value"], r1["p_value"]) == ("0.0067", "3e-09")  # stats.format_p: two significant digits
    assert r0["log10_p"] == "-2.170"  # not a p-value column
    assert r0["se"] == "2.0e-06" and r1["se"] == "0.012"  # never "0.000" for a non-zero value
    assert (r0["seconds"], r1["seconds"]) == ("86.580", "1.012")
    assert r0["area_px"] == "12,346"
    assert r0["where"] == "/data/x.png" and r1["where"] == "–"
    assert (r0["cells"], r1["cells"]) == ("a, b", "1, 2")
    text = " ".join(out.to_numpy().ravel())
    assert "PosixPath" not in text and "[" not in text and "nan" not in text


def test_a_pivots_row_labels_become_columns_and_headers_flatten():
    tidy = pd.DataFrame({"encoder": ["a", "a", "b", "b"], "pooling": ["cls", "roi_local"] * 2, "auc": [0.5, 0.9, 0.6, 0.8]})
    wide = tidy.pivot_table(index="encoder", columns="pooling", values="auc")
    out = report.format_for_reading(wide)
    assert list(out.columns) == ["encoder", "cls", "roi_local"]
    assert out.iloc[1].tolist() == ["b", "0.600", "0.800"]
    multi = tidy.pivot_table(index="encoder", columns="pooling", values=["auc"])
    assert list(report.format_for_reading(multi).columns) == ["encoder", "auc / cls", "auc / roi_local"]


def test_a_page_shows_eight_columns_and_notes_what_it_left_in_the_csv():
    df = pd.DataFrame({f"c{i}": [0.1 * i] * 50 for i in range(12)}).assign(produced_with="synthetic cohort")
    shown, notes = report.table_for_page(df, max_columns=8, max_rows=40)
    assert shown.shape == (40, 8)
    assert "produced_with" not in shown.columns
    assert notes == ["Produced with: synthetic cohort.", "Showing 8 of 12 columns;", "Showing the first 40 of 50 rows;"]


def test_publish_table_glues_a_numbered_table_with_its_csv_a_click_away(tmp_path, monkeypatch):
    glued = {}
    monkeypatch.setattr(report, "glue", lambda key, value, display=False: glued.__setitem__(key, value))
    monkeypatch.setenv("CXRCORE_PAGE_DIR", str(tmp_path))
    full = pd.DataFrame({"encoder": ["rad-dino"], "auc": [0.77412], "ci_low": [0.713], "ci_high": [0.8371],
                         "n_pos": [40], "produced_with": ["synthetic cohort, random-weight stand-in encoders"]})
    shown = full.assign(**{"AUC [95% CI]": report.with_ci(full)})[["encoder", "AUC [95% CI]", "produced_with"]]
    report.publish_table(shown, "tab-x-auc", tmp_path / "figures" / "x", full=full)
    assert pd.read_csv(tmp_path / "figures" / "x" / "tab-x-auc.csv").columns.tolist() == full.columns.tolist()
    md = glued["tab-x-auc"]._repr_markdown_()
    lines = md.splitlines()
    assert lines[0] == "| encoder | AUC \\[95% CI\\] |"
    assert lines[2] == "| rad-dino | 0.774 \\[0.713, 0.837\\] |"
    assert "(path:figures/x/tab-x-auc.csv)" in md and "1 rows × 6 columns" in md
    assert "Produced with: synthetic cohort, random-weight stand-in encoders." in md
    assert "0.774 [0.713, 0.837]" in glued["tab-x-auc"]._repr_html_()
    assert "rows" in repr(glued["tab-x-auc"]) and "0.774" not in repr(glued["tab-x-auc"])


def test_markdown_cells_cannot_break_the_table():
    df = pd.DataFrame({"what": ["a | b", "x_y *z* $1$ `c` [l](u)"]})
    shown, notes = report.table_for_page(df)
    md = report.GluedTable(shown, notes, "t.csv", 2, 1)._repr_markdown_()
    body = md.splitlines()[2:4]
    assert all(line.count("|") - line.count("\\|") == 2 for line in body)
    assert "\\$1\\$" in body[1] and "\\`c\\`" in body[1]


def test_numbers_for_prose(monkeypatch):
    glued = {}
    monkeypatch.setattr(report, "glue", lambda key, value, display=False: glued.__setitem__(key, value))
    assert report.glue_text("num-x-auc", 0.77412, "{:.3f}") is None
    report.glue_text("num-x-share", 0.0088, "{:.1%}")
    report.glue_text("num-x-verdict", "Only roi_local.")
    assert glued == {"num-x-auc": "0.774", "num-x-share": "0.9%", "num-x-verdict": "Only roi_local."}
    with pytest.raises(ValueError, match="num-"):
        report.glue_text("fig-x-auc", 0.5)
    assert report.format_p(0.15) == "0.15" and report.format_p(0.0067, prefix=True) == "p = 0.0067"
    assert report.format_p(1e-300, prefix=True) == "p < 1e-16" and report.format_p(float("nan")) == "not estimable"
    # never more than four decimals on a page: 0.00076 reads as the book's other small numbers do
    assert report.format_p(0.00076) == "7.6e-04" and report.format_p(0.0001) == "0.0001"
    assert report.format_p(0.00012, prefix=True) == "p = 1.2e-04" and report.format_p(3e-7) == "3e-07"
    assert report.format_ci(0.77412, 0.713, 0.8371) == "0.774 [0.713, 0.837]"


# -- one colour per pooling mode, one encoder order ----------------------------------------
def test_every_pooling_mode_has_its_own_colour_and_marker():
    from cxrcore.pooling import POOLING_MODES

    modes = set(report.POOLING_ORDER)
    assert {"cls", "patch_mean", "roi_local", "gem", "patch_max", "topk_mean", "mil"} <= modes
    assert set(POOLING_MODES) <= modes
    assert set(report.POOLING_COLORS) == modes == set(report.POOLING_MARKERS)
    assert len(set(report.POOLING_COLORS.values())) == len(modes)
    assert len(set(report.POOLING_MARKERS.values())) == len(modes)
    assert report.POOLING_PALETTE is report.POOLING_COLORS
    with pytest.raises(ValueError, match="POOLING_COLORS"):
        report.pooling_color("no-such-mode")


def test_encoder_order_covers_the_registry():
    from cxrcore.encoders import list_encoders

    assert set(list_encoders()) <= set(report.ENCODER_ORDER)
    assert report.order_encoders(["timm:x", "dino-resnet50", "rad-dino"]) == ["rad-dino", "dino-resnet50", "timm:x"]


def _auc_table(encoders, modes=("roi_local", "cls", "patch_mean")):
    rows = []
    for i, e in enumerate(encoders):
        for j, m in enumerate(modes):
            a = [0.208, 0.5, 0.95][j]
            rows.append({"encoder": e, "pooling": m, "auc": a, "ci_low": a - 0.05, "ci_high": min(1.0, a + 0.05),
                         "cell": "c"})
    return pd.DataFrame(rows)


def test_auc_figure_runs_zero_to_one_in_one_order_with_the_legend_off_the_data():
    table = _auc_table(["dino-resnet50", "biomedclip", "rad-dino"])
    fig = report.auc_by_pooling_figure(table, x="encoder")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 0 and hi >= 1  # a 0.208 cannot fall off the plot
    assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.lines)  # chance line
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rad-dino", "biomedclip", "dino-resnet50"]
    colours = {matplotlib.colors.to_hex(line.get_color()).upper() for line in ax.lines}
    assert {report.POOLING_COLORS[m].upper() for m in ("cls", "patch_mean", "roi_local")} <= colours
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for a in fig.axes:
        assert not legend.overlaps(a.get_window_extent()), "the legend covers a panel"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cls", "patch_mean", "roi_local"]
    assert fig.get_figwidth() <= report.PAGE_WIDTH_IN + 1e-9
    plt.close(fig)


def test_panels_follow_the_encoder_order():
    table = _auc_table(["medsiglip-448", "rad-dino", "dinov2-b14", "dino-resnet50"])
    fig = report.auc_by_pooling_figure(table, x="pooling", col="encoder")
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles == ["rad-dino", "dinov2-b14", "medsiglip-448", "dino-resnet50"]
    plt.close(fig)


def _sweep(encoders=("dino-resnet50", "rad-dino"), modes=("cls", "patch_mean", "roi_local", "gem")):
    rows = []
    for e in encoders:
        for m in modes:
            for d in (12, 24, 48, 96, 192):
                a = min(1.0, 0.5 + (0.4 if m == "roi_local" else 0.1) * np.log2(d / 12) / 4)
                rows.append({"encoder": e, "pooling": m, "footprint_px": float(d), "auc": a, "ci_low": a - 0.05,
                             "ci_high": min(1.0, a + 0.05)})
    return pd.DataFrame(rows)


def test_dilution_figure_one_panel_per_encoder_one_line_per_mode_px_and_patches():
    table = _sweep()
    fig = report.dilution_figure(table, patches_per_px={"rad-dino": 518 / 1024 / 14, "dino-resnet50": 224 / 1024 / 32})
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["rad-dino", "dino-resnet50"]
    for ax in panels:
        assert ax.get_xscale() == "log"
        lo, hi = ax.get_ylim()
        assert lo <= 0 and hi >= 1
        lines = [line for line in ax.lines if len(line.get_xdata()) == 5]
        assert sorted(matplotlib.colors.to_hex(line.get_color()).upper() for line in lines) == sorted(
            report.POOLING_COLORS[m].upper() for m in ("cls", "patch_mean", "roi_local", "gem"))
        assert len(ax.collections) == 4  # one CI band per mode
        assert [c for c in ax.get_children() if type(c).__name__ == "SecondaryAxis"], "no axis in patches"
    fig.canvas.draw()
    top = [c for c in panels[0].get_children() if type(c).__name__ == "SecondaryAxis"][0]
    assert top.get_xticklabels()[0].get_text() == f"{12 * 518 / 1024 / 14:.2g}"
    plt.close(fig)
    with pytest.raises(ValueError, match="one sweep"):
        report.dilution_figure(pd.concat([table, table.head(1)]))
    with pytest.raises(ValueError, match="footprint_px"):
        report.dilution_figure(table.drop(columns="footprint_px"))


def test_patches_per_px_follows_the_encoders_geometry():
    import cxrcore

    enc = cxrcore.load_encoder("rad-dino", stand_in=True)
    g = enc.geometry_for((1024, 1024))
    assert report.patches_per_px(enc, (1024, 1024)) == pytest.approx(g.scale_x / g.stride)
    assert report.patches_per_px(enc, (1024, 1024)) * 1024 == pytest.approx(enc.grid_shape[1])


def test_before_after_figure_shows_the_difference_of_the_crop():
    rng = np.random.default_rng(0)
    before = rng.random((300, 400)).astype(np.float32)
    after = before.copy()
    after[100:120, 200:220] += 0.3
    fig = report.before_after_figure(before, after, (200, 100, 220, 120))
    titles = [a.get_title().split("\n")[0] for a in fig.axes]
    assert titles[:4] == ["whole image", "before", "after", "after − before"]
    diff = fig.axes[3].images[0].get_array()
    assert diff.max() == pytest.approx(0.3, abs=1e-6) and diff.min() == pytest.approx(0.0, abs=1e-6)
    lo, hi = fig.axes[3].images[0].get_clim()
    assert lo == -hi  # symmetric: an opacity and a lucency read the same way
    plt.close(fig)
    with pytest.raises(ValueError, match="same 2-D image"):
        report.before_after_figure(before, after[:10], (0, 0, 5, 5))


def test_patch_grid_figure_counts_the_tokens_under_the_box():
    import cxrcore

    enc = cxrcore.load_encoder("rad-dino", stand_in=True)
    image = np.zeros((512, 768), np.float32)
    g = enc.geometry_for(image.shape)
    box = (400, 200, 440, 240)
    r0, r1, c0, c1 = g.cells(box)
    fig = report.patch_grid_figure(image, g, box)
    text = " ".join(a.get_title() for a in fig.axes)
    assert f"{(r1 - r0) * (c1 - c0)} tokens" in text and f"{g.grid[0] * g.grid[1]:,} tokens" in text
    assert fig.get_figwidth() <= report.PAGE_WIDTH_IN + 1e-9
    plt.close(fig)


def test_an_empty_table_still_renders_and_says_none():
    empty = pd.DataFrame({"reason": pd.Series([], dtype=str), "count": pd.Series([], dtype=int)})
    shown, notes = report.table_for_page(empty)
    md = report.GluedTable(shown, notes, "t.csv", 0, 2)._repr_markdown_()
    assert md.splitlines()[:3] == ["| reason | count |", "|:---|:---|", "| none |  |"]


# -- box-level pages (ChestX-Det10 strata, box jitter) ---------------------------------------
def _strata_table(encoders=("dino-resnet50", "rad-dino"), classes=("Nodule", "Mass")):
    rows = []
    for e in encoders:
        for c in classes:
            for m in ("cls", "patch_mean"):
                for st, a in (("small", 0.208), ("large", 0.9)):
                    rows.append({"encoder": e, "class": c, "pooling": m, "stratum": st, "auc": a,
                                 "ci_low": a - 0.1, "ci_high": min(1.0, a + 0.05)})
    return pd.DataFrame(rows)


def test_stratum_figure_draws_small_hollow_and_large_filled_on_zero_to_one():
    fig = report.stratum_figure(_strata_table())
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["Nodule", "Mass"]
    for ax in panels:
        lo, hi = ax.get_ylim()
        assert lo <= 0 and hi >= 1
        assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.lines)  # chance line
        assert [t.get_text() for t in ax.get_xticklabels()] == ["rad-dino", "dino-resnet50"]
        points = [line for line in ax.lines if line.get_marker() in (report.POOLING_MARKERS["cls"],
                                                                     report.POOLING_MARKERS["patch_mean"])]
        hollow = [line for line in points if line.get_markerfacecolor() in ("white", "w", (1.0, 1.0, 1.0, 1.0))]
        assert len(points) == 4 and len(hollow) == 2
        assert all(np.allclose(line.get_ydata(), 0.208) for line in hollow)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["cls, small", "cls, large", "patch_mean, small", "patch_mean, large"]
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(legend.overlaps(a.get_window_extent()) for a in panels), "the legend covers a panel"
    assert fig.get_figwidth() <= report.PAGE_WIDTH_IN + 1e-9
    plt.close(fig)
    with pytest.raises(ValueError, match="stratum"):
        report.stratum_figure(_strata_table().drop(columns="stratum"))


def test_jitter_figure_one_panel_per_encoder_and_the_overlap_panel():
    rows, over = [], []
    for e in ("dino-resnet50", "rad-dino"):
        for scale in (0.0, 0.2):
            for s in (0, 5, 10, 20):
                a = 0.9 - 0.02 * s - scale
                rows.append({"encoder": e, "sigma_px": s, "scale_sigma": scale, "auc": a, "ci_low": a - 0.1,
                             "ci_high": a + 0.05})
    for st in ("all", "small", "large"):
        for scale in (0.0, 0.2):
            for s in (0, 5, 10, 20):
                over.append({"sigma_px": s, "scale_sigma": scale, "stratum": st, "still_overlapping": 1 - 0.03 * s})
    fig = report.jitter_figure(pd.DataFrame(rows), pd.DataFrame(over))
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["rad-dino", "dino-resnet50", "lesion boxes still on their lesion"]
    for ax in panels[:2]:
        lo, hi = ax.get_ylim()
        assert lo <= 0 and hi >= 1
        curves = [line for line in ax.lines if len(line.get_xdata()) == 4]
        assert [line.get_linestyle() for line in curves] == ["-", "--"]
        assert {matplotlib.colors.to_hex(line.get_color()).upper() for line in curves} == {report.POOLING_COLORS["roi_local"].upper()}
        assert len(ax.collections) == 2  # one CI band per scale setting
    assert len([line for line in panels[2].lines if len(line.get_xdata()) == 4]) == 6
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:2] == ["roi_local, scale sd 0", "roi_local, scale sd 0.2"] and "overlap, small boxes" in texts
    plt.close(fig)
    with pytest.raises(ValueError, match="sigma_px"):
        report.jitter_figure(pd.DataFrame(rows).drop(columns="sigma_px"))


def test_reference_line_marks_every_panel_with_its_label():
    fig = report.auc_by_pooling_figure(_auc_table(["rad-dino", "biomedclip"]), x="encoder", col="encoder")
    report.reference_line(fig, 0.899, "reported (paper): 0.899")
    panels = [a for a in fig.axes if a.get_title()]
    for ax in panels:
        assert any(np.allclose(line.get_ydata(), 0.899) for line in ax.lines)
    labels = [t.get_text() for ax in panels for t in ax.texts]
    assert labels == ["reported (paper): 0.899"]  # one label for the one line
    plt.close(fig)


def test_text_columns_read_left_aligned_even_when_a_sentence_starts_with_a_digit(tmp_path, monkeypatch):
    glued = {}
    monkeypatch.setattr(report, "glue", lambda key, value, display=False: glued.__setitem__(key, value))
    df = pd.DataFrame({"encoder": ["rad-dino", "dino-resnet50"], "input": ["518: the published processor", "224: DINO's"],
                       "token layout": ["[CLS, 37x37 patch tokens]", "7x7 layer4 cells"], "GFLOPs": [303.1, 8.2]})
    report.publish_table(df, "tab-x-plain", tmp_path)
    report.publish_text_table(df, "tab-x-text", tmp_path, text_columns=["input", "token layout"])
    assert glued["tab-x-plain"]._repr_markdown_().splitlines()[1] == "|:---|---:|---:|---:|"
    assert glued["tab-x-text"]._repr_markdown_().splitlines()[1] == "|:---|:---|:---|---:|"
    assert glued["tab-x-text"]._repr_markdown_().splitlines()[2:4] == glued["tab-x-plain"]._repr_markdown_().splitlines()[2:4]
    assert pd.read_csv(tmp_path / "tab-x-text.csv").equals(df)
    with pytest.raises(ValueError, match="text_columns"):
        report.publish_text_table(df, "tab-x-bad", tmp_path, text_columns=["nope"])


def test_ranges_for_prose():
    assert report.format_range([0.524, 0.5, np.nan]) == "0.500 to 0.524"
    assert report.format_range([0.4121, 0.488], signed=True) == "+0.412 to +0.488"
    assert report.format_range([-0.01, 0.2], "{:.2f}", signed=True) == "-0.01 to +0.20"
    assert report.format_range([0.7, 0.7]) == "0.700" and report.format_range([]) == "none"


def test_methods_are_described_as_the_table_names_them():
    t = pd.DataFrame({"method": ["delong_clustered"] * 3 + ["paired_swap"]})
    words = report.describe_methods(t)
    assert words.startswith("DeLong's test clustered by patient (Obuchowski 1997), t reference") and ", for 3 rows" in words
    assert "permutation" in words and words.endswith(", for 1 row")
    # a renamed column and a code this module does not know: shown as it is, never as another procedure
    assert report.describe_methods(pd.DataFrame({"ci_method": ["new_thing"]})) == "`new_thing`"
    assert report.describe_methods(["percentile", "percentile"]) == report.METHOD_WORDS["percentile"]
    with pytest.raises(ValueError, match="none of the columns"):
        report.describe_methods(pd.DataFrame({"auc": [0.5]}))


def test_the_footprint_sweep_is_the_longest_series_of_one_kind():
    from cxrcore.perturb import load_panel

    cells = load_panel("default").table()
    sweep = report.footprint_sweep(cells)
    assert sweep["footprint_px"].tolist() == [12, 24, 48, 96, 192]
    assert set(sweep["strength"]) == {0.4} and set(sweep["kind"]) == {"nodule"}
    assert report.footprint_sweep(load_panel("smoke").table())["cell"].tolist() in (["nodule_d32_s0.05"],
                                                                                      ["nodule_d32_s0.4"])
    assert report.footprint_sweep(cells, kind="no-such-kind").empty
    assert report.footprint_sweep(load_panel("audit-quick").table(), kind="iso_blur")["footprint_px"].tolist() == [32, 128]


def test_patches_per_px_from_a_stored_geometry():
    import cxrcore
    from cxrcore.store import geometry_to_json

    enc = cxrcore.load_encoder("rad-dino", stand_in=True)
    g = enc.geometry_for((512, 640))
    assert report.patches_per_px(g) == report.patches_per_px(geometry_to_json(g)) == report.patches_per_px(enc, (512, 640))


def test_read_published_finds_one_chapters_table_of_this_build(tmp_path, monkeypatch):
    c = SyntheticCohort(n_images=2)
    monkeypatch.setenv("CXRCORE_BUILD_MODE", "default")
    report.record_run(tmp_path / "perturbation_panel", cohort=c, stand_in=True, encoders=[])
    df = pd.DataFrame({"encoder": ["rad-dino"], "auc": [0.7]})
    report.save_table(df, "tab-perturbation-dilution", tmp_path / "perturbation_panel")
    assert report.read_published(tmp_path, "tab-perturbation-dilution").equals(df)
    with pytest.raises(FileNotFoundError, match="run the chapter"):
        report.read_published(tmp_path, "tab-perturbation-nothing")
    monkeypatch.setenv("CXRCORE_BUILD_MODE", "smoke")
    report.record_run(tmp_path / "other", cohort=c, stand_in=True, encoders=[])
    report.write_summary(pd.DataFrame([{k: "x" for k in report.SUMMARY_COLUMNS}]), tmp_path / "other")
    with pytest.raises(ValueError, match="different builds"):
        report.read_published(tmp_path, "tab-perturbation-dilution")


def test_sentences_in_markdown_are_glued_as_markdown(monkeypatch):
    glued = {}
    monkeypatch.setattr(report, "glue", lambda key, value, display=False: glued.__setitem__(key, value))
    report.glue_markdown("num-x-verdict", "Only `roi_local` sees it.")
    assert glued["num-x-verdict"]._repr_markdown_() == "Only `roi_local` sees it."
    with pytest.raises(ValueError, match="num-"):
        report.glue_markdown("tab-x-y", "text")


def test_page_path_is_relative_to_where_the_page_lands(tmp_path, monkeypatch):
    out = tmp_path / "gen" / "figures" / "summary"
    card = tmp_path / "gen" / "figures" / "audit" / "cards" / "rad-dino" / "audit.html"
    monkeypatch.delenv("CXRCORE_PAGE_DIR", raising=False)
    assert report.page_path(card, out) == "figures/audit/cards/rad-dino/audit.html"
    monkeypatch.setenv("CXRCORE_PAGE_DIR", str(tmp_path))
    assert report.page_path(card, out) == "gen/figures/audit/cards/rad-dino/audit.html"


def test_notes_sentence_counts_the_rows_with_a_note():
    t = pd.DataFrame({"auc": [0.5, 0.6, 0.7], "note": [None, "few clusters", ""]})
    assert report.notes_sentence(t) == '1 of 3 rows carry a note (`note` column of the CSV), e.g. "few clusters".'
    assert report.notes_sentence(t.assign(note="")) == "No row carries a note."
    assert report.notes_sentence(t.drop(columns="note")) == "No row carries a note."
