"""One GPU: ViT-B/14 at 518 in bf16, forward-only images/s against full extraction, and against the GPU's FLOP rate.

    python benchmarks/gpu_extract.py              # on a GPU node, one command, < 5 minutes
    python benchmarks/gpu_extract.py --cpu-smoke  # dry run on the CPU with tiny sizes: checks the script, not the figures

Never run by the test suite. The model is the full-size DINOv2-B/14 architecture (the
registry's published ``arch`` config of ``dinov2-b14``: 12 layers, width 768, patch 14) with
seeded random weights, saved and loaded back through ``load_encoder`` (the path real
weights take: no download). What it measures, side by side in one run:

1. the GPU's bf16 rate: an n x n x n bf16 matrix product (n = 8192), TFLOP/s;
2. forward only: ``Encoder.forward`` on a batch already on the GPU (``--batch-size auto``:
   :func:`cxrcore.extract.auto_batch_size`), images/s, and the model's TFLOP/s from the
   closed-form ViT FLOPs (= ``spec.gflops`` at 518) against (1) and the stated dense peak;
3. decode + preprocess per CPU core for each ``--formats`` entry (benchmarks/bench_decode.py),
   and the DataLoader workers the forward rate needs;
4. full extraction, :func:`cxrcore.extract.extract`, over a folder of real-format files
   (decode in DataLoader workers, pinned asynchronous copies, two batches in flight, all
   three poolings with one box per image, Parquet store written), with preprocessing in the
   workers and, for comparison, on the GPU. The rate is after start-up
   (``ExtractResult.steady_images_per_s``: from the first decoded image to the last chunk
   written); the whole run's rate is printed beside it.

Target: extraction >= 85 % of forward-only where the node has the decode workers it needs.
Files are hard links of a few distinct images (in the page cache): disk reads are not measured.

On the device machine (its python3 has torch and transformers; ``pydicom`` is not needed):
``PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_extract.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_decode beside this file

FORMAT_NAMES = {"png8": "PNG 8-bit", "png16": "PNG 16-bit", "jpeg": "JPEG q95", "dicom": "DICOM 16-bit"}


def parse_formats(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        kind, _, side = item.partition(":")
        if kind not in FORMAT_NAMES or not side.isdigit():
            raise SystemExit(f"--formats {text!r}: expected kind:side,... with kind in {list(FORMAT_NAMES)}, e.g. png8:1024")
        out.append((kind, int(side)))
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_size_encoder(device: str, dtype, input_size: int, workdir: Path):
    """DINOv2-B/14 at its published size, random weights, saved and loaded back through load_encoder."""
    from cxrcore import load_encoder
    from cxrcore.encoders import encoder_spec
    from cxrcore.encoders.base import FAMILIES, seeded

    spec = encoder_spec("dinov2-b14")
    fam = FAMILIES[spec.family]
    _, model_cls = fam._classes()
    cfg = fam.config_for(spec, stand_in=False)  # the published config.json fields (spec.arch), not a stand-in's
    model = seeded(lambda: model_cls(cfg))
    fam(spec, model, weights="random full-size", stand_in=True).save(workdir / "weights")
    del model
    t = time.perf_counter()
    enc = load_encoder("dinov2-b14", weights=str(workdir / "weights"), device=device, dtype=dtype, input_size=input_size)
    sync(enc.device)
    return enc, time.perf_counter() - t, sum(p.numel() for p in enc.model.parameters())


def matmul_tflops(device, n: int, iters: int) -> float:
    import torch

    dt = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def forward_rate(enc, batch: int, seconds: float) -> float:
    import torch

    from cxrcore.pooling import patch_mean

    x = torch.randn(batch, 3, enc.input_size, enc.input_size, device=enc.device)
    for _ in range(3):
        enc.forward(x)
    sync(enc.device)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n == 0:
        glob, grid = enc.forward(x)
        patch_mean(grid)
        n += batch
    sync(enc.device)
    return n / (time.perf_counter() - t)


def make_folder(root: Path, kind: str, side: int, n: int, distinct: int) -> Path:
    from bench_decode import radiograph, write

    root.mkdir(parents=True, exist_ok=True)
    srcs = [write(radiograph(side, k), kind, root / f"base_{k:03d}") for k in range(min(distinct, n))]
    for i in range(len(srcs), n):
        os.link(srcs[i % len(srcs)], root / f"img_{i:06d}{srcs[0].suffix}")
    return root


def extraction_rate(enc, folder: Path, n: int, workdir: Path, batch: int, workers: int, in_workers: bool) -> tuple[float, float]:
    """(images/s after start-up, images/s of the whole run) for cxrcore.extract.extract over the folder."""
    import pandas as pd

    from cxrcore.cohorts import FolderCohort
    from cxrcore.extract import extract
    from cxrcore.io import read_image_size

    cohort = FolderCohort(folder)
    md = cohort.metadata
    side = read_image_size(md["path"].iloc[0]).width
    q = side // 4  # one box per image, so roi_local is pooled too
    boxes = pd.DataFrame({"image_id": md["image_id"], "x1": float(q), "y1": float(q), "x2": float(3 * q), "y2": float(3 * q)})
    res = extract(enc, cohort, workdir / f"{folder.name}_{'w' if in_workers else 'g'}", n_images=n, boxes=boxes.iloc[:n],
                  batch_size=batch, num_workers=workers, progress=False, preprocess_in_workers=in_workers)
    assert res.images == n, (res.images, n)
    return res.steady_images_per_s, res.images_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: a dry run of this script")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--input-size", type=int, default=518)
    ap.add_argument("--batch-size", default="auto", help="forward batch, or auto (largest power of two that fits)")
    ap.add_argument("--images", type=int, default=4096, help="images per extraction run")
    ap.add_argument("--formats", default="png8:1024,png16:2048", help="kind:side,... (png8, png16, jpeg, dicom)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPU count - 1)")
    ap.add_argument("--seconds", type=float, default=8.0, help="forward-only timing window")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--stated-tflops", type=float, default=989.0, help="stated dense bf16 peak (H100/H200 SXM: 989)")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.device, args.input_size, args.images, args.seconds, args.matmul_n = "cpu", 56, 24, 1.0, 256
        args.formats = "png8:256,png16:256"
        args.workers = 1 if args.workers is None else args.workers
    import torch

    from cxrcore.encoders import vit_flops
    from cxrcore.extract import _cpu_preprocessor, resolve_batch_size
    from cxrcore.io import read_image

    from bench_decode import per_image_seconds, radiograph, write

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for a dry run on the CPU")
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    formats = parse_formats(args.formats)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_extract_") as tmp:
        tmp = Path(tmp)
        enc, load_s, n_params = full_size_encoder(args.device, torch.bfloat16, args.input_size, tmp)
        weights_dtype = next(enc.model.parameters()).dtype
        mem = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: not figures)"
        tflops_mm = matmul_tflops(device, args.matmul_n, 10 if device.type == "cuda" else 2)
        batch = resolve_batch_size(args.batch_size, enc, in_flight=2 if device.type == "cuda" else 1)
        gflops = vit_flops(input_size=args.input_size, patch_size=14, hidden=768, layers=12, mlp_hidden=3072) / 1e9
        fwd = forward_rate(enc, batch, args.seconds)
        print(f"{gpu} | torch {torch.__version__} | {os.cpu_count()} CPUs, {workers} DataLoader workers")
        print(f"dinov2-b14 architecture, {n_params / 1e6:.1f} M parameters, random weights loaded through load_encoder in "
              f"{load_s:.1f} s: weights {str(weights_dtype).removeprefix('torch.')}, {mem:.2f} GiB on the GPU; input "
              f"{args.input_size} px, {gflops:.1f} GFLOPs/image (spec.gflops at 518: "
              f"{enc.spec.gflops:.1f}); batch {batch} ({args.batch_size})")
        print(f"bf16 matmul {args.matmul_n}^3: {tflops_mm:.0f} TFLOP/s measured; stated dense peak {args.stated_tflops:g}")
        rows = [("forward only (batch on the device)", fwd, None)]
        decode = []
        pre = _cpu_preprocessor(enc)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per core, as in a DataLoader worker
        for kind, side in formats:
            paths = [write(radiograph(side, k), kind, tmp / f"d_{kind}_{side}_{k}") for k in range(2)]
            full = per_image_seconds(lambda p: pre.preprocess([read_image(p)]), paths, 3)
            decode.append((kind, side, full))
        torch.set_num_threads(torch_threads)
        for kind, side, full in decode:
            folder = make_folder(tmp / f"{kind}_{side}", kind, side, args.images, 8)
            for in_workers in (True, False):
                steady, whole = extraction_rate(enc, folder, args.images, tmp, batch, workers, in_workers)
                where = "workers" if in_workers else "GPU"
                rows.append((f"extract {FORMAT_NAMES[kind]} {side}, preprocess on {where}", steady, (kind, side, whole)))
        head = f"{'':<48}{'images/s':>10}{'vs forward':>12}{'model TFLOP/s':>15}{'of matmul':>11}{'of stated':>11}"
        print(head)
        print("-" * len(head))
        for label, rate, extra in rows:
            tf = rate * gflops / 1e3
            print(f"{label:<48}{rate:>10.1f}{rate / fwd:>11.1%}{tf:>15.1f}{tf / tflops_mm:>10.1%}{tf / args.stated_tflops:>10.1%}"
                  + (f"   (whole run incl. start-up: {extra[2]:.1f}/s)" if extra else ""))
        verdicts = []
        for kind, side, full in decode:
            need = math.ceil(fwd * full)
            best = max(r for label, r, e in rows[1:] if e and e[0] == kind and e[1] == side)
            enough = need <= workers
            verdicts.append((kind, side, best / fwd, enough))
            print(f"decode + preprocess {FORMAT_NAMES[kind]} {side}: {full * 1e3:.1f} ms per image per core = "
                  f"{1 / full:.1f} images/s; the forward rate needs {need} workers, {workers} ran"
                  + ("" if enough else f" (decode-bound: at most ~{workers / full:.0f} images/s here)"))
        fed = [v for v in verdicts if v[3]]
        if args.cpu_smoke:
            print("smoke run on the CPU: the script works end to end; the ratios above are not the GPU's")
        elif fed:
            ok = all(r >= 0.85 for *_, r, _ in [(k, s, r, e) for k, s, r, e in fed])
            print(f"target: extraction >= 85% of forward-only where the workers suffice "
                  f"({', '.join(f'{FORMAT_NAMES[k]} {s}: {r:.0%}' for k, s, r, _ in fed)}): {'PASS' if ok else 'FAIL'}")
        else:
            print("target not assessable: no format had the decode workers the forward rate needs on this node")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
