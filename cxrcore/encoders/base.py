"""One contract for every frozen encoder: images in, one forward pass, all three poolings out.

A family subclass says how to build/load its model and how to split the model's
output into the global embedding and the patch-token grid (``forward_tokens``);
everything else (intensity scaling, the explicit geometry step, normalisation,
batching, pooling, loading errors) lives here once, so every family is preprocessed
and pooled the same way.

Published facts (``EncoderSpec.num_params``, ``EncoderSpec.gflops``) are computed from
the full-size architecture instantiated on PyTorch's ``meta`` device: shapes only, no
memory, no weights, no network.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from ..geometry import Geometry, make_geometry
from ..io import to_unit_float  # noqa: F401  (re-exported: encoders take arrays of any dtype)
from ..pooling import patch_mean, roi_local

#: File written beside the weights by :meth:`Encoder.save`, read back by ``load_encoder``.
CXRCORE_ENCODER_FILE = "cxrcore_encoder.json"

#: Seed of every stand-in: the same random weights on every machine.
STAND_IN_SEED = 0

#: family name -> Encoder subclass; filled by ``Encoder.__init_subclass__``.
FAMILIES: dict[str, type["Encoder"]] = {}


class WeightsUnavailableError(OSError):
    """The weights could not be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class EncoderSpec:
    """Published facts of one registered encoder (preprocessing, token layout, architecture).

    ``arch`` is the full-size architecture as published (the fields of the model's
    ``config.json``, or open_clip's / torchvision's equivalent); ``num_params`` and
    ``gflops`` are computed from it on the ``meta`` device, never hard-coded.
    """

    key: str
    family: str
    weights: str  # default hub id / checkpoint of the published model
    input_size: int
    patch_size: int  # stride of the token grid (the output stride for a CNN)
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    geometry: str = "center_crop"  # see cxrcore.geometry.make_geometry
    interpolation: str = "bicubic"
    num_register_tokens: int = 0
    has_cls_token: bool = True
    global_pool: str = "cls"  # what the `cls` pooling mode is for this family: cls | pooler | gap
    gated: bool = False
    citation: str = ""
    notes: str = ""
    arch: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_size // self.patch_size, self.input_size // self.patch_size)

    @property
    def num_params(self) -> int:
        """Parameters of the full-size model (the image tower only), counted on the meta device."""
        return _published_counts(self)[0]

    @property
    def gflops(self) -> float:
        """Forward GFLOPs per image at ``input_size`` (1 multiply-add = 2 FLOPs).

        Counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of
        the full-size model on the meta device; it counts matrix multiplies, convolutions
        and attention (softmax, norms and activations are not counted, < 1 % for these
        models). For a ViT this equals the closed form in :func:`vit_flops`.
        """
        return _published_counts(self)[1]


@functools.lru_cache(maxsize=None)
def _published_counts(spec: EncoderSpec) -> tuple[int, float]:
    from torch.utils.flop_counter import FlopCounterMode

    fam = FAMILIES[spec.family]
    model = fam.build_meta(spec)
    n = sum(p.numel() for p in model.parameters())
    enc = fam.__new__(fam)  # a bare instance: forward_tokens needs only spec, model, patch size
    enc.spec, enc.model, enc.patch_size, enc.input_size = spec, model.eval(), spec.patch_size, spec.input_size
    x = torch.empty(1, 3, spec.input_size, spec.input_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc.forward_tokens(x)
    return int(n), counter.get_total_flops() / 1e9


def vit_flops(*, input_size: int, patch_size: int, hidden: int, layers: int, mlp_hidden: int,
              gated_mlp: bool = False, prefix_tokens: int = 1, channels: int = 3) -> float:
    """Closed-form forward FLOPs of a plain ViT (2 FLOPs per multiply-add), heads excluded.

    With ``P = (input_size / patch_size)**2`` patches, ``N = P + prefix_tokens`` tokens,
    width ``D``, MLP width ``I``: patch embedding ``P * C * p**2 * D``; per layer the
    q/k/v/out projections ``4 N D**2``, the attention scores and weighted sum ``2 N**2 D``,
    the MLP ``2 N D I`` (``3 N D I`` for a gated SwiGLU MLP).
    """
    p = (input_size // patch_size) ** 2
    n = p + prefix_tokens
    macs = p * channels * patch_size**2 * hidden
    macs += layers * (4 * n * hidden**2 + 2 * n**2 * hidden + (3 if gated_mlp else 2) * n * hidden * mlp_hidden)
    return 2.0 * macs


@dataclass
class Encoding:
    """Everything one forward pass gives: the three poolings, and optionally the patch grid.

    ``roi_local[k]`` pools box ``k`` in input order (boxes of image 0, then image 1,
    ...); ``roi_image[k]`` is the index of the image it came from.
    """

    cls: np.ndarray
    patch_mean: np.ndarray
    roi_local: np.ndarray
    roi_image: np.ndarray
    geometry: list[Geometry]
    grid: np.ndarray | None = None

    def __len__(self) -> int:
        return self.cls.shape[0]


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a stand-in under a fixed seed without disturbing the caller's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(STAND_IN_SEED)
        return build()


def read_descriptor(weights: str | os.PathLike | None) -> dict[str, Any] | None:
    """The descriptor :meth:`Encoder.save` wrote in ``weights``, or None for anything else."""
    if weights is None:
        return None
    p = Path(weights)
    f = p / CXRCORE_ENCODER_FILE if p.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); re-save the encoder with Encoder.save") from None


def explain_load_failure(spec: EncoderSpec, weights: str, exc: BaseException) -> WeightsUnavailableError:
    """Turn a hub / file error into one that says what to do."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lines = [f"{spec.key}: could not load weights {weights!r} ({type(exc).__name__}: {text})."]
    is_local = os.path.exists(weights) or weights.startswith((".", "/", "~"))
    gated = spec.gated or "gated" in str(exc).lower() or type(exc).__name__ == "GatedRepoError"
    if not is_local and "/" in weights and not weights.startswith(("http://", "https://")):
        if gated:
            lines.append(
                f"This model is gated: sign in at https://huggingface.co/{weights}, accept its licence, then run "
                "`hf auth login` (or set HF_TOKEN) on this machine."
            )
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            lines.append(f"HF_HUB_OFFLINE is set and the files are not in the Hugging Face cache ({cache}).")
        else:
            lines.append("If this machine has no network, the files must already be in the Hugging Face cache.")
    lines.append(
        "Or download the weights where you have access and pass weights=<local directory or checkpoint file> "
        f"to load_encoder({spec.key!r}, ...); for offline runs and tests use stand_in=True."
    )
    return WeightsUnavailableError(" ".join(lines))


class Encoder:
    """A frozen encoder behind the common contract (see module docstring).

    Family subclasses set ``family`` and implement ``build``, ``build_meta``,
    ``forward_tokens`` and ``save``.
    """

    family: ClassVar[str] = ""
    spec: EncoderSpec

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, *, weights: str, stand_in: bool,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 input_size: int | None = None) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.weights = weights
        self.stand_in = stand_in
        self.device = torch.device(device)
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"{spec.key}: dtype {dtype} not supported; use torch.float32 (default) or torch.bfloat16 (autocast)")
        self.dtype = dtype
        self.patch_size = int(spec.patch_size)
        self.input_size = int(input_size or spec.input_size)
        if self.input_size % self.patch_size:
            raise ValueError(
                f"{spec.key}: input size {self.input_size} is not a multiple of the patch size {self.patch_size}; "
                f"use a multiple of {self.patch_size}"
            )
        self.model.to(self.device)  # weights stay fp32; bf16 is autocast, so norms and softmax stay fp32
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(3, 1, 1)

    # -- family hooks ----------------------------------------------------------------------
    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool) -> torch.nn.Module:
        """The model: a seeded stand-in, or the published weights from ``weights``."""
        raise NotImplementedError

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        """The full-size published architecture on the meta device (no weights)."""
        raise NotImplementedError

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: ``[B, 3, S, S]`` -> (global embedding ``[B, D]``, patch grid ``[B, h, w, D]``)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write weights and the cxrcore descriptor so ``load_encoder(key, weights=directory)`` reads them back."""
        raise NotImplementedError

    # -- shared pipeline -------------------------------------------------------------------
    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def grid_shape(self) -> tuple[int, int]:
        s = self.input_size // self.patch_size
        return (s, s)

    def _grid_hw(self, pixels: torch.Tensor) -> tuple[int, int]:
        return pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size

    def geometry_for(self, hw: tuple[int, int]) -> Geometry:
        return make_geometry(hw, self.input_size, self.patch_size, self.spec.geometry)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Geometry]]:
        """Scale to [0, 1], apply the geometry step, replicate grey to 3 channels, normalise."""
        if len(images) == 0:
            raise ValueError("encode() got no images")
        batch, geoms = [], []
        for i, img in enumerate(images):
            a = to_unit_float(img, i)
            g = self.geometry_for(a.shape)
            batch.append(g.apply(torch.from_numpy(a).to(self.device)[None], self.spec.interpolation))
            geoms.append(g)
        x = torch.stack(batch).expand(-1, 3, -1, -1)  # grey -> 3 identical channels, after scaling
        x = (x - self._mean) / self._std
        return x.contiguous(), geoms

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_tokens`` under inference mode and, for ``dtype=bfloat16``, autocast."""
        with torch.inference_mode():
            autocast = self.dtype == torch.bfloat16
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=autocast):
                glob, grid = self.forward_tokens(pixels)
        return glob.float(), grid.float()

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]] | None = None,
               return_grid: bool = False) -> Encoding:
        """One forward pass over ``images`` -> ``cls``, ``patch_mean``, ``roi_local`` (and the grid)."""
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists; give one (possibly empty) list per image")
        x, geoms = self.preprocess(images)
        glob, grid = self.forward(x)
        roi, owner = roi_local(grid, geoms, boxes)
        return Encoding(
            cls=glob.cpu().numpy(),
            patch_mean=patch_mean(grid).cpu().numpy(),
            roi_local=roi,
            roi_image=owner,
            geometry=geoms,
            grid=grid.cpu().numpy() if return_grid else None,
        )

    def provenance(self) -> dict[str, Any]:
        """What produced an embedding: key, weights, stand-in flag, preprocessing."""
        d = asdict(self.spec)
        d.pop("arch", None)
        d.update(weights=str(self.weights), stand_in=self.stand_in, input_size=self.input_size,
                 patch_size=self.patch_size, dtype=str(self.dtype))
        return d

    def _write_descriptor(self, directory: Path, **extra: Any) -> None:
        (directory / CXRCORE_ENCODER_FILE).write_text(
            json.dumps({"key": self.spec.key, "family": self.spec.family, "stand_in": self.stand_in,
                        "input_size": self.input_size, **extra}, indent=2)
        )

    def __repr__(self) -> str:
        tag = "random-weight stand-in" if self.stand_in else str(self.weights)
        return f"Encoder({self.spec.key!r}, {tag}, input {self.input_size}, grid {self.grid_shape})"
