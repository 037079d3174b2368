"""The ``cxrcore extract`` command: killed with SIGKILL mid-run and restarted, every image ends up exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrcore.cli import main
from cxrcore.store import list_parts, missing_chunks, read_store

N = 24
ARGS = ["extract", "--encoder", "dinov3-vit7b16", "--stand-in", "--cohort", "synthetic", "--n-images", str(N),
        "--cohort-option", "size=96", "--panel", "smoke", "--chunk-size", "2", "--batch-size", "4",
        "--num-workers", "1", "--no-progress"]


def _run(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cxrcore.cli", *ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def _kill_after_parts(proc: subprocess.Popen, out: Path, n_parts: int, timeout: float = 120) -> int:
    """SIGKILL the whole job (main process and its DataLoader workers) once ``n_parts`` chunks are on disk."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"extraction ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if out.exists() and len(list_parts(out)) >= n_parts:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return len(list_parts(out))


def test_sigkill_and_resume_every_image_exactly_once(tmp_path):
    out = tmp_path / "store"
    done_at_kill = []
    for n_parts in (1, 5):  # killed twice, at different points
        done_at_kill.append(_kill_after_parts(_run(out), out, n_parts))
        assert missing_chunks(out), "the run finished before the kill; make it longer"
    assert done_at_kill[0] < N // 2 and done_at_kill[1] >= done_at_kill[0]
    proc = _run(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert not missing_chunks(out)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    emb = read_store(out)  # raises on any duplicated (image, pass, box)
    m = emb.meta
    cells = sorted(set(m["cell"]))
    assert len(cells) == 3
    counts = m.groupby(["image_index", "cell", "arm"]).size()
    assert len(counts) == N * 3 * 2 and (counts == 1).all()  # every image, every cell, both arms, exactly once
    assert sorted(m["image_index"].unique()) == list(range(N))


def test_provenance_mismatch_exits_with_message(tmp_path, capsys):
    out = tmp_path / "s"
    base = [a for a in ARGS if a not in ("--no-progress",)] + ["--no-progress", "--num-workers", "0"]
    base[base.index("--n-images") + 1] = "2"
    assert main([*base, "--out", str(out)]) == 0
    capsys.readouterr()
    other = list(base)
    other[other.index("--encoder") + 1] = "biomedclip"
    assert main([*other, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "encoder.key: stored 'dinov3-vit7b16', this run 'biomedclip'" in err and "new --out directory" in err
    assert main([*base, "--shard", "2/2", "--out", str(out)]) == 2
    assert "i/n" in capsys.readouterr().err


def test_folder_cohort_and_grid(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 60), dtype=np.uint8)).save(root / ("sub" if k else "") / f"im{k}.png")
    out = tmp_path / "s"
    rc = main(["extract", "--encoder", "biomedclip", "--stand-in", "--cohort", "folder", "--data-root", str(root),
               "--store-grid", "--num-workers", "0", "--no-progress", "--panel", "smoke", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert '"images": 3' in capsys.readouterr().out
    emb = read_store(out)
    assert set(emb.meta["image_id"]) == {"im0.png", "sub/im1.png", "sub/im2.png"}
    assert list(out.glob("grids-*.parquet"))


def test_help_lists_the_options():
    r = subprocess.run([sys.executable, "-m", "cxrcore.cli", "extract", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--encoder", "--stand-in", "--weights", "--cohort", "--data-root", "--panel", "--n-images", "--shard",
                "--store-grid", "--out"):
        assert opt in r.stdout


def _tiny(out, *extra):
    return ["extract", "--encoder", "dinov3-vit7b16", "--stand-in", "--input-size", "32", "--cohort", "synthetic",
            "--n-images", "2", "--cohort-option", "size=64", "--num-workers", "0", "--no-progress", *extra,
            "--out", str(out)]


def test_dtype_batch_size_auto_and_the_deprecated_bf16(tmp_path, capsys):
    import json

    assert main(_tiny(tmp_path / "a")) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dtype"] == "float32" and got["batch_size"] == 16 and got["device"] == "cpu" and got["backend"] == "local"
    assert main(_tiny(tmp_path / "b", "--dtype", "bfloat16", "--batch-size", "1")) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dtype"] == "bfloat16" and got["batch_size"] == 1 and got["forward_passes"] == 2
    assert read_store(tmp_path / "b").provenance["encoder"]["dtype"].endswith("bfloat16")
    assert main(_tiny(tmp_path / "c", "--bf16")) == 0  # still accepted, with a notice
    out = capsys.readouterr()
    assert json.loads(out.out)["dtype"] == "bfloat16" and "--bf16 is deprecated" in out.err
    assert main(_tiny(tmp_path / "d", "--bf16", "--dtype", "float32")) == 2
    assert "contradict" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "cxrcore.cli", "extract", "--help"], capture_output=True, text=True, timeout=60)
    assert "--dtype" in r.stdout and "--bf16" not in r.stdout and "--backend" in r.stdout


def test_backend_ray_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cxrcore.ray_extract", None)  # as if neither Ray nor the backend were installed
    assert main(_tiny(tmp_path / "s", "--backend", "ray", "--address", "auto")) == 2
    err = capsys.readouterr().err
    assert "pip install 'cxrcore[ray]'" in err and "--backend local" in err
    assert main(_tiny(tmp_path / "s", "--address", "auto")) == 2
    assert "options of --backend ray" in capsys.readouterr().err


def test_backend_ray_hands_the_encoder_key_to_extract_ray(tmp_path, capsys, monkeypatch):
    """The Ray actors load the encoder: the driver passes the key and loading options, never a model."""
    import inspect
    import json
    import types

    from cxrcore.extract import ExtractResult
    from cxrcore.ray_extract import extract_ray as real

    seen = {}

    def extract_ray(encoder, cohort, out, **kw):
        unknown = set(kw) - set(inspect.signature(real).parameters)
        assert not unknown, f"the CLI passes options extract_ray does not take: {unknown}"
        seen.update(encoder=encoder, cohort=cohort.name, out=out, **kw)
        return ExtractResult(Path(out), (0, 1), 1, 0, 1, 2, 2, 0.5)

    monkeypatch.setitem(sys.modules, "cxrcore.ray_extract", types.SimpleNamespace(extract_ray=extract_ray))
    monkeypatch.setattr("cxrcore.load_encoder", lambda *a, **k: pytest.fail("the driver loaded the encoder"))
    def ray_args(out, *extra):  # --num-workers is the local backend's (DataLoader workers)
        a = _tiny(out, *extra)
        i = a.index("--num-workers")
        return a[:i] + a[i + 2:]

    assert main(ray_args(tmp_path / "s", "--backend", "ray", "--address", "auto", "--num-actors", "2", "--panel", "smoke",
                         "--resize-short", "32")) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "ray"
    assert seen["encoder"] == "dinov3-vit7b16" and isinstance(seen["encoder"], str)
    assert (seen["input_size"], seen["resize_short"]) == (32, 32)  # the actors' loading options, as given
    assert (seen["cohort"], seen["out"], seen["panel"], seen["address"], seen["num_actors"], seen["batch_size"]) == (
        "synthetic", str(tmp_path / "s"), "smoke", "auto", 2, 16)
    # options that only the local backend has are refused, not dropped
    table = tmp_path / "b.csv"
    table.write_text("image_id,x1,y1,x2,y2\nsynthetic_0000,1,1,9,9\n")
    assert main(ray_args(tmp_path / "t", "--backend", "ray", "--boxes", str(table))) == 2
    assert "options of --backend local" in capsys.readouterr().err
    assert main(_tiny(tmp_path / "t", "--backend", "ray")) == 2  # --num-workers too
    assert "options of --backend local" in capsys.readouterr().err
    assert main(ray_args(tmp_path / "u", "--backend", "ray", "--shard", "1/4")) == 2
    assert "does not apply" in capsys.readouterr().err


def test_import_cxrcore_does_not_import_ray():
    code = ("import sys, cxrcore, cxrcore.cli, cxrcore.extract, cxrcore.store; "
            "cxrcore.cli.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_audit_is_a_cxrcore_sub_command(tmp_path, capsys):
    assert main(["audit", "no-such-encoder", "--stand-in", "--quick", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrcore audit: error:") and "rad-dino" in err  # says what is accepted
    with pytest.raises(SystemExit):
        main(["audit", "rad-dino", "--dtype", "float64", "--out", str(tmp_path / "b")])


def test_resize_short_reaches_the_encoder_and_the_stores_provenance(tmp_path, capsys):
    """--resize-short 256 with DINO's ResNet-50 at 224: its eval transform (Resize(256), CenterCrop(224))."""
    from cxrcore.store import geometry_from_json

    def run(out, *extra):
        return main(["extract", "--encoder", "dino-resnet50", "--stand-in", *extra, "--cohort", "synthetic", "--n-images",
                     "2", "--cohort-option", "size=64", "--num-workers", "0", "--no-progress", "--out", str(out)])

    assert run(tmp_path / "a", "--resize-short", "256") == 0
    store = read_store(tmp_path / "a")
    assert (store.provenance["encoder"]["input_size"], store.provenance["encoder"]["resize_short"]) == (224, 256)
    g = geometry_from_json(store.meta["geometry"].iloc[0])
    assert (g.resized_hw, g.crop) == ((256, 256), (16, 16))
    assert run(tmp_path / "b") == 0  # without it: the encoder's crop ratio 1.0
    assert read_store(tmp_path / "b").provenance["encoder"]["resize_short"] == 224
    capsys.readouterr()
    assert run(tmp_path / "c", "--resize-short", "200") == 2  # checked before any weights or pixels are read
    assert "resize_short=200 must be an integer >= input_size 224" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    r = subprocess.run([sys.executable, "-m", "cxrcore.cli", "extract", "--help"], capture_output=True, text=True, timeout=60)
    assert "--resize-short" in r.stdout


def test_weights_that_are_not_here_give_the_message_not_a_traceback(tmp_path, capsys):
    """Offline without cached weights: exit 2 and the loader's advice (stand-in, weights=, gating), no traceback."""
    for argv in (["extract", "--encoder", "rad-dino", "--cohort", "synthetic", "--n-images", "1", "--out", str(tmp_path / "e")],
                 ["audit", "rad-dino", "--quick", "--out", str(tmp_path / "a")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "could not load weights" in err and "stand_in=True" in err, err
