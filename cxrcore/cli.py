"""The ``cxrcore`` command line. ``cxrcore extract --help`` for the extraction job, ``cxrcore status STORE`` for a store.

Each sub-command is a thin layer over one function (``extract`` -> :func:`cxrcore.extract.extract`, or
``cxrcore.ray_extract.extract_ray`` with ``--backend ray``; ``status`` -> :func:`cxrcore.store.store_status`),
so what a cluster job runs is what a notebook can call. Ray is imported only when ``--backend ray`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

EXAMPLES = """\
examples:
  # the default build, no download: synthetic phantoms, random-weight stand-in, default panel
  cxrcore extract --encoder rad-dino --stand-in --cohort synthetic --n-images 100 --panel default --out runs/rad-dino-panel
  # any folder of PNG/JPEG/DICOM images, local weights, patch grids kept for box jitter
  cxrcore extract --encoder rad-dino --weights /models/rad-dino --cohort folder --data-root /data/cxr --store-grid --out runs/x
  # one GPU: bf16 weights, the largest batch that fits, 15 decoding workers
  cxrcore extract --encoder dinov2-b14 --cohort nih --data-root /data/nih --device cuda --dtype bfloat16 \\
      --batch-size auto --num-workers 15 --out runs/nih-dinov2
  # inside a Slurm job array (sbatch --array=0-15): the shard comes from SLURM_ARRAY_TASK_ID / _COUNT
  cxrcore extract --encoder dinov2-b14 --cohort nih --data-root /data/nih --device cuda --dtype bfloat16 --out runs/nih-dinov2
  cxrcore status runs/nih-dinov2      # images done, missing (and which shard to rerun), duplicated
  # a Ray cluster (pip install 'cxrcore[ray]')
  cxrcore extract --backend ray --address auto --encoder dinov2-b14 --cohort nih --data-root /data/nih --out runs/nih-dinov2
"""


def _option(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--cohort-option {text!r}: expected KEY=VALUE, e.g. size=512")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _batch_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size {text!r}: expected a positive integer or 'auto'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--batch-size {v}: expected a positive integer or 'auto'")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrcore", description="cls, patch_mean and roi_local embeddings of frozen "
                                "chest-radiograph encoders, from one forward pass.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract", help="run an encoder over a cohort (optionally through a perturbation panel) into "
                       "a resumable Parquet embedding store", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--encoder", required=True, help="encoder key (cxrcore.list_encoders()), or timm:<name> / hf:<id> / "
                   "open_clip:<model name>[@<pretrained tag>] / open_clip:hf-hub:<org>/<repo> / open_clip:local-dir:<dir>")
    w = e.add_mutually_exclusive_group()
    w.add_argument("--stand-in", action="store_true", help="random-weight stand-in of the encoder's family (no download)")
    w.add_argument("--weights", help="hub id, local directory or checkpoint file of the weights (default: the published ones)")
    e.add_argument("--cohort", required=True, help="cohort name: synthetic, nih, mimic, manifest, chestxdet10, folder")
    e.add_argument("--data-root", help="folder of the cohort as the provider ships it (any image folder for 'folder')")
    e.add_argument("--cohort-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the cohort (repeatable), e.g. size=512 for synthetic")
    e.add_argument("--panel", help="perturbation panel: a packaged name (default, smoke) or a .yml file; "
                   "without it, plain extraction (with the cohort's boxes, if it has any)")
    e.add_argument("--boxes", metavar="FILE", help="plain extraction: pool roi_local under the boxes of this CSV or "
                   "Parquet table (image_id, x1, y1, x2, y2 in original pixels, optional class) instead of the cohort's")
    e.add_argument("--n-images", type=int, help="first N images of the cohort (the number generated for synthetic)")
    e.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort and the perturbation placements")
    e.add_argument("--shard", default=None, help="i/n: do only this job's share (0 <= i < n). Default: from the Slurm "
                   "array variables (task i of SLURM_ARRAY_TASK_COUNT, counted from SLURM_ARRAY_TASK_MIN), else 0/1")
    e.add_argument("--store-grid", action="store_true", help="also store the float16 patch grid of every forward pass "
                   "(so roi_local can be re-pooled for other boxes without a new forward pass)")
    e.add_argument("--batch-size", type=_batch_size, default="auto", help="forward passes per batch (images incl. "
                   "perturbed copies), or 'auto' (default): on a GPU the largest power of two whose probe batch runs "
                   f"without running out of memory (at most {512}); on the CPU 16")
    e.add_argument("--num-workers", type=int, help="DataLoader workers decoding (and perturbing, preprocessing) images "
                   "(default: CPU count - 1; at most 8 on the CPU, 32 with a GPU). benchmarks/bench_decode.py says how "
                   "many a GPU needs")
    e.add_argument("--chunk-size", type=int, help="base images per atomically written chunk (default: by panel size)")
    e.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and forward-pass dtype (default float32; bfloat16 on a GPU halves memory and runs on "
                   "the tensor cores)")
    e.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # deprecated: --dtype bfloat16
    e.add_argument("--input-size", type=int, help="override the encoder's input side (a multiple of its patch size)")
    e.add_argument("--resize-short", type=int, help="side resized to before the centre crop of a crop geometry "
                   "(default: the encoder's crop ratio at its input size), e.g. --input-size 224 --resize-short 256: "
                   "DINOv2's published processor")
    e.add_argument("--backend", choices=["local", "ray"], default="local", help="local (default): this process and its "
                   "DataLoader workers; ray: a Ray Data pipeline (pip install 'cxrcore[ray]'), CPU decoding and a GPU "
                   "actor pool writing the same store")
    e.add_argument("--address", help="Ray cluster address for --backend ray (e.g. auto, ray://head:10001); default: a "
                   "local Ray instance")
    e.add_argument("--num-actors", type=int, help="--backend ray: encoder actors (default: one per GPU)")
    e.add_argument("--num-gpus-per-actor", type=float, help="--backend ray: GPUs per encoder actor (default 1 when the "
                   "cluster has GPUs)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--out", required=True, help="store directory (created; an existing store is resumed)")

    from . import audit  # its sub-command lives beside the function it runs (cxrcore.audit.audit)

    audit.register(sub)
    st = sub.add_parser("status", help="images done, missing and duplicated in a store, and which shard to rerun; "
                        "exit status 0 only when complete with nothing stored twice")
    st.add_argument("store", help="store directory (written by cxrcore extract)")
    st.add_argument("--shards", type=int, help="shard count of the run (default: as recorded in the chunks)")
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _read_boxes(path: str):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--boxes {path}: no such file")
    table = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    missing = [c for c in ("image_id", "x1", "y1", "x2", "y2") if c not in table]
    if missing:
        raise ValueError(f"--boxes {path}: missing column(s) {missing}; expected image_id, x1, y1, x2, y2 "
                         "(original pixels, x2/y2 exclusive) and optionally class")
    return table


def _ray_extract():
    """``cxrcore.ray_extract.extract_ray``, imported only when --backend ray asks for it (import cxrcore stays Ray-free)."""
    try:
        from .ray_extract import extract_ray
    except ImportError as e:
        raise ValueError(f"--backend ray needs Ray Data and cxrcore's Ray backend ({e}); install them with "
                         "pip install 'cxrcore[ray]', or use --backend local") from None
    return extract_ray


def run_extract(args: argparse.Namespace) -> int:
    import torch

    from . import load_encoder
    from .cohorts import GENERATED, get_cohort
    from .extract import extract
    from .store import parse_shard, shard_from_environment

    if args.bf16:
        print("cxrcore extract: --bf16 is deprecated; use --dtype bfloat16", file=sys.stderr)
        if args.dtype not in (None, "bfloat16"):
            raise ValueError(f"--bf16 and --dtype {args.dtype} contradict each other; give --dtype only")
    dtype = torch.bfloat16 if (args.dtype or ("bfloat16" if args.bf16 else "float32")) == "bfloat16" else torch.float32
    if args.shard is not None:
        shard, slurm = args.shard, None
    else:
        shard, slurm = shard_from_environment()
    opts = dict(args.cohort_option)
    if args.cohort in GENERATED:
        opts.setdefault("n_images", args.n_images or 200)
        opts.setdefault("seed", args.seed)
    cohort = get_cohort(args.cohort, args.data_root, **opts)
    boxes = _read_boxes(args.boxes) if args.boxes else None
    common = dict(panel=args.panel, n_images=args.n_images, seed=args.seed, store_grid=args.store_grid,
                  chunk_size=args.chunk_size, progress=not args.no_progress, cohort_options=dict(opts))
    if args.backend == "ray":
        extract_ray = _ray_extract()  # first: without Ray installed, that is what to fix
        if tuple(parse_shard(shard)) != (0, 1):
            raise ValueError(f"--backend ray runs every chunk of the store itself; --shard {shard} (or a Slurm array "
                             "task) does not apply: drop it, or use --backend local for a job array")
        if boxes is not None or args.num_workers is not None:
            raise ValueError("--boxes and --num-workers are options of --backend local; the Ray backend decodes in "
                             "Ray tasks and pools the cohort's own boxes")
        # the actors load the encoder themselves: the driver never holds the weights (ViT-7B is 13 GB in bf16)
        res = extract_ray(args.encoder, cohort, args.out, weights=args.weights, stand_in=args.stand_in,
                             device=args.device, dtype=dtype, input_size=args.input_size,
                             resize_short=args.resize_short, address=args.address,
                             num_actors=args.num_actors, num_gpus_per_actor=args.num_gpus_per_actor,
                             batch_size=16 if args.batch_size == "auto" else int(args.batch_size), **common)
        device = args.device
    else:
        if args.address or args.num_actors or args.num_gpus_per_actor:
            raise ValueError("--address, --num-actors and --num-gpus-per-actor are options of --backend ray")
        encoder = load_encoder(args.encoder, weights=args.weights, stand_in=args.stand_in, device=args.device,
                               dtype=dtype, input_size=args.input_size, resize_short=args.resize_short)
        # data_root is not provenance: moving the data must not invalidate a store (image_hash guards content)
        res = extract(encoder, cohort, args.out, shard=shard, batch_size=args.batch_size, num_workers=args.num_workers,
                      boxes=boxes, chunk_info={"slurm": slurm} if slurm else None, **common)
        device = encoder.device
    print(json.dumps({"out": str(res.out), "shard": f"{res.shard[0]}/{res.shard[1]}", "backend": args.backend,
                      "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                      "batch_size": getattr(res, "batch_size", None) or None, "chunks": res.chunks_total,
                      "resumed_chunks": res.chunks_done_before, "written_chunks": res.chunks_written,
                      "images": res.images, "forward_passes": res.passes, "seconds": round(res.seconds, 2),
                      "startup_seconds": round(getattr(res, "startup_seconds", 0.0), 2),
                      "images_per_s": round(res.images_per_s, 2) if res.images else None}))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from .store import store_status

    st = store_status(args.store, shards=args.shards)
    if args.json:
        print(json.dumps(st.to_dict(), indent=2))
        return 0 if st.ok else 1
    print(f"store {st.directory}: {st.images_done} of {st.n_images} images done "
          f"({st.chunks_done} of {st.chunks_total} chunks of {st.chunk_size}); {st.images_missing} missing; "
          f"{len(st.duplicated)} position(s) and {len(st.duplicated_image_ids)} image id(s) stored twice")
    for m in st.missing:
        who = f"shard {m['shard']}/{st.shards}" if m["shard"] is not None else "shard unknown (pass --shards n)"
        task = f", Slurm array task {m['slurm_task_id']}" if m["slurm_task_id"] is not None else ""
        print(f"  missing: positions [{m['start']}, {m['end']}) ({m['images']} images): rerun {who}{task}")
    for dup in st.duplicated:
        print(f"  duplicated: position {dup['position']} ({dup['image_id']}): {dup['why']}: {', '.join(dup['files'])}")
    for dup in st.duplicated_image_ids:
        print(f"  duplicated image id {dup['image_id']!r} at positions {dup['positions']}")
    for f in st.foreign:
        print(f"  not of this run: {f['file']}: {f['why']}")
    for f in st.off_layout:
        print(f"  off the chunk layout: {f}")
    if st.missing:
        print(f"rerun shard(s) {st.rerun_shards()} of {st.shards} (shard count from {st.shards_source}) with the same "
              "command: finished chunks are skipped")
    if st.duplicated or st.duplicated_image_ids or st.foreign:
        print("the store holds rows twice or rows of another run: re-extract into a new --out directory, or move the "
              "listed files out")
    return 0 if st.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    from .encoders import WeightsUnavailableError
    from .store import StoreError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "extract":
            return run_extract(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "audit":
            return args.run(args)
    except (StoreError, WeightsUnavailableError, ValueError, KeyError, FileNotFoundError, ImportError) as e:
        # expected, user-fixable problems: the message says what to do; no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cxrcore {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
