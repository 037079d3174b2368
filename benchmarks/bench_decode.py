"""Decode throughput per CPU core by file format, and the DataLoader workers a GPU's rate needs.

    .venv/bin/python benchmarks/bench_decode.py [--quick] [--gpu-rate 1000] [--processes N]

Writes the same radiograph-like image (a synthetic phantom resampled to the size, with
quantum-like noise so the files compress like real radiographs, not like flat phantoms) as
PNG 8-bit, PNG 16-bit, JPEG (quality 95) and DICOM (16-bit, 12 bits stored, uncompressed
Explicit VR Little Endian) at 2048 x 2048, and as PNG 8-bit at NIH ChestX-ray14's
1024 x 1024. Each file is read with the project's reader, :func:`cxrcore.io.read_image`
(to float32 in [0, 1]), in one process with one thread: images/s **per core**. A DataLoader
worker does more than decode: it also preprocesses (here DINOv2-B/14's resize + centre
crop to 518 and normalisation, the encoder's own ``preprocess`` on the CPU), so the worker
count is computed from decode + preprocess:

    workers = ceil(gpu_rate / (images/s per core of decode + preprocess))

assuming workers scale linearly with cores (each is its own process; ``--processes N``
checks it by running N at once on one format). All formats are measured side by side in
one run. ``--quick``: fewer repetitions (a smoke run, not the reported figures).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # per-core figures: one thread, as in a DataLoader worker
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

FORMATS = [  # (label, side, writer key)
    ("PNG 8-bit", 2048, "png8"),
    ("PNG 16-bit", 2048, "png16"),
    ("JPEG q95", 2048, "jpeg"),
    ("DICOM 16-bit", 2048, "dicom"),
    ("PNG 8-bit (NIH size)", 1024, "png8"),
]


def radiograph(side: int, seed: int = 0) -> np.ndarray:
    """A phantom resampled to ``side`` with Poisson-like noise (~1 % of full scale), float in [0, 1]."""
    import torch
    import torch.nn.functional as F

    from cxrcore.cohorts.synthetic import make_phantom

    base = make_phantom(seed, 512).image
    x = F.interpolate(torch.from_numpy(base)[None, None], size=(side, side), mode="bicubic", align_corners=False)[0, 0]
    img = x.numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    img = img + rng.normal(0.0, 0.01, img.shape) * np.sqrt(np.clip(img, 0.05, 1.0))
    return np.clip(img, 0.0, 1.0)


def write(img: np.ndarray, kind: str, path: Path) -> Path:
    if kind == "png8":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if kind == "png16":
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    if kind == "jpeg":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path.with_suffix(".jpg"), quality=95)
        return path.with_suffix(".jpg")
    if kind == "dicom":
        return write_dicom(np.round(img * 4095).astype(np.uint16), path.with_suffix(".dcm"))
    raise ValueError(kind)


def write_dicom(pixels: np.ndarray, path: Path) -> Path:
    """A minimal valid Digital X-Ray image (12 bits stored in 16, MONOCHROME2, uncompressed)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "bench"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def per_image_seconds(fn, paths: list[Path], repeats: int) -> float:
    """Median over ``repeats`` passes of the mean CPU time per file (files cycled so no single one is cached hot).

    CPU time of this single-threaded process (``time.process_time``) is what one core
    spends per image, and is not inflated when other processes share the machine.
    """
    fn(paths[0])  # warm-up: imports, first-touch allocations
    times = []
    for _ in range(repeats):
        t = time.process_time()
        for p in paths:
            fn(p)
        times.append((time.process_time() - t) / len(paths))
    return float(np.median(times))


def _decode_loop(args) -> int:
    from cxrcore.io import read_image

    paths, seconds = args
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        read_image(paths[n % len(paths)])
        n += 1
    return n


def main() -> None:
    import torch

    from cxrcore import load_encoder
    from cxrcore.io import read_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--gpu-rate", type=float, default=1000.0, help="images/s the GPU's forward pass runs at "
                    "(default 1000: ViT-B/14 at 518 in bf16 on an H100-class GPU; benchmarks/gpu_extract.py measures it)")
    ap.add_argument("--processes", type=int, default=0, help="also decode PNG 16-bit 2048 in N processes at once and "
                    "report the aggregate rate against N x the single-core rate (0: skip)")
    ap.add_argument("--encoder", default="dinov2-b14", help="whose preprocessing the workers run (default dinov2-b14)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats, distinct = (2, 2) if args.quick else (5, 3)
    pre = load_encoder(args.encoder, stand_in=True)  # the stand-in preprocesses exactly like the published encoder

    def decode_and_preprocess(p: Path):
        pre.preprocess([read_image(p)])

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        tmp = Path(tmp)
        images = {}
        for label, side, kind in FORMATS:
            if side not in images:
                images[side] = [radiograph(side, seed) for seed in range(distinct)]
            paths = [write(img, kind, tmp / f"{kind}_{side}_{k}") for k, img in enumerate(images[side])]
            mb = np.mean([p.stat().st_size for p in paths]) / 2**20
            dec = per_image_seconds(read_image, paths, repeats)
            full = per_image_seconds(decode_and_preprocess, paths, repeats)
            rows.append({"format": label, "side": side, "mb": mb, "decode_ms": dec * 1e3, "decode_rate": 1 / dec,
                         "full_ms": full * 1e3, "full_rate": 1 / full, "workers": math.ceil(args.gpu_rate * full),
                         "paths": paths})
        ref = rows[0]["decode_rate"]
        print(f"decode with cxrcore.io.read_image, one process, one thread, CPU time per image (per core); worker = decode + "
              f"{args.encoder} preprocessing to {pre.input_size} px; GPU rate {args.gpu_rate:g} images/s")
        head = (f"{'format':<22}{'side':>6}{'file MB':>9}{'decode ms':>11}{'img/s/core':>12}{'vs PNG8':>9}"
                f"{'+prep ms':>10}{'img/s/core':>12}{'workers':>9}")
        print(head)
        print("-" * len(head))
        for r in rows:
            print(f"{r['format']:<22}{r['side']:>6}{r['mb']:>9.2f}{r['decode_ms']:>11.1f}{r['decode_rate']:>12.1f}"
                  f"{r['decode_rate'] / ref:>8.2f}x{r['full_ms']:>10.1f}{r['full_rate']:>12.1f}{r['workers']:>9d}")
        print(f"workers = ceil({args.gpu_rate:g} images/s / (img/s/core of decode + preprocess)): the DataLoader "
              f"processes (--num-workers) that keep the GPU fed, one core each, plus one core for the main process.")
        if args.processes:
            from multiprocessing import get_context

            r = rows[1]
            seconds = 3.0 if args.quick else 8.0
            with get_context("spawn").Pool(args.processes) as pool:
                pool.map(_decode_loop, [(r["paths"], 0.5)] * args.processes)  # start-up outside the timing
                t = time.perf_counter()
                done = sum(pool.map(_decode_loop, [(r["paths"], seconds)] * args.processes))
                rate = done / (time.perf_counter() - t)
            print(f"{args.processes} processes decoding {r['format']} {r['side']}: {rate:.1f} images/s = "
                  f"{rate / (args.processes * r['decode_rate']):.0%} of {args.processes} x the single-core rate "
                  f"(linear scaling assumed above; {os.cpu_count()} CPUs on this machine)")


if __name__ == "__main__":
    main()
