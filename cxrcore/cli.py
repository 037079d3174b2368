"""The ``cxrcore`` command line. ``cxrcore extract --help`` for the extraction job.

Each sub-command is a thin layer over one function (``extract`` -> :func:`cxrcore.extract.extract`),
so what a cluster job runs is what a notebook can call.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

EXAMPLES = """\
examples:
  # the default build, no download: synthetic phantoms, random-weight stand-in, default panel
  cxrcore extract --encoder rad-dino --stand-in --cohort synthetic --n-images 100 --panel default --out runs/rad-dino-panel
  # any folder of PNG/JPEG/DICOM images, local weights, patch grids kept for box jitter
  cxrcore extract --encoder rad-dino --weights /models/rad-dino --cohort folder --data-root /data/cxr --store-grid --out runs/x
  # a SLURM job array of 16 tasks writing one store (rerun any task to resume it)
  cxrcore extract --encoder dinov2-b14 --cohort nih --data-root /data/nih --shard $SLURM_ARRAY_TASK_ID/16 --out runs/nih-dinov2
"""


def _option(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--cohort-option {text!r}: expected KEY=VALUE, e.g. size=512")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrcore", description="cls, patch_mean and roi_local embeddings of frozen "
                                "chest-radiograph encoders, from one forward pass.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract", help="run an encoder over a cohort (optionally through a perturbation panel) into "
                       "a resumable Parquet embedding store", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--encoder", required=True, help="encoder key (cxrcore.list_encoders()), or timm:<name> / hf:<id>")
    w = e.add_mutually_exclusive_group()
    w.add_argument("--stand-in", action="store_true", help="random-weight stand-in of the encoder's family (no download)")
    w.add_argument("--weights", help="hub id, local directory or checkpoint file of the weights (default: the published ones)")
    e.add_argument("--cohort", required=True, help="cohort name: synthetic, nih, mimic, manifest, chestxdet10, folder")
    e.add_argument("--data-root", help="folder of the cohort as the provider ships it (any image folder for 'folder')")
    e.add_argument("--cohort-option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="extra keyword for the cohort (repeatable), e.g. size=512 for synthetic")
    e.add_argument("--panel", help="perturbation panel: a packaged name (default, smoke) or a .yml file; "
                   "without it, plain extraction (with the cohort's boxes, if it has any)")
    e.add_argument("--n-images", type=int, help="first N images of the cohort (the number generated for synthetic)")
    e.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort and the perturbation placements")
    e.add_argument("--shard", default="0/1", help="i/n: do only this job's share (0 <= i < n); default 0/1")
    e.add_argument("--store-grid", action="store_true", help="also store the float16 patch grid of every forward pass "
                   "(so roi_local can be re-pooled for other boxes without a new forward pass)")
    e.add_argument("--batch-size", type=int, default=16, help="forward-pass batch size (images incl. perturbed copies)")
    e.add_argument("--num-workers", type=int, help="DataLoader workers decoding images (default: CPU count - 1, max 8)")
    e.add_argument("--chunk-size", type=int, help="base images per atomically written chunk (default: by panel size)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    e.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (GPUs)")
    e.add_argument("--input-size", type=int, help="override the encoder's input side (a multiple of its patch size)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--out", required=True, help="store directory (created; an existing store is resumed)")
    return p


def run_extract(args: argparse.Namespace) -> int:
    import torch

    from . import load_encoder
    from .cohorts import GENERATED, get_cohort
    from .extract import extract

    opts = dict(args.cohort_option)
    if args.cohort in GENERATED:
        opts.setdefault("n_images", args.n_images or 200)
        opts.setdefault("seed", args.seed)
    cohort = get_cohort(args.cohort, args.data_root, **opts)
    encoder = load_encoder(args.encoder, weights=args.weights, stand_in=args.stand_in, device=args.device,
                           dtype=torch.bfloat16 if args.bf16 else torch.float32, input_size=args.input_size)
    # data_root is not provenance: moving the data must not invalidate a store (image_hash guards content)
    recorded = dict(opts)
    res = extract(encoder, cohort, args.out, panel=args.panel, n_images=args.n_images, seed=args.seed,
                  shard=args.shard, store_grid=args.store_grid, batch_size=args.batch_size,
                  num_workers=args.num_workers, chunk_size=args.chunk_size, progress=not args.no_progress,
                  cohort_options=recorded)
    print(json.dumps({"out": str(res.out), "shard": f"{res.shard[0]}/{res.shard[1]}", "chunks": res.chunks_total,
                      "resumed_chunks": res.chunks_done_before, "written_chunks": res.chunks_written,
                      "images": res.images, "forward_passes": res.passes, "seconds": round(res.seconds, 2),
                      "images_per_s": round(res.images_per_s, 2) if res.images else None}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .store import StoreError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "extract":
            return run_extract(args)
    except (StoreError, ValueError, KeyError, FileNotFoundError) as e:
        # expected, user-fixable problems: the message says what to do; no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cxrcore {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
