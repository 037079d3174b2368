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
    #: side resized to before the centre crop of a crop geometry (center_crop: the short side; resize_crop:
    #: both), at `input_size`; None: `input_size` itself (nothing but the long ends cut)
    resize_short: int | None = None
    #: the transformers image processor class whose pipeline this is (HF families; "" = the family's own)
    processor_class: str = ""
    num_register_tokens: int = 0
    has_cls_token: bool = True
    global_pool: str = "cls"  # what the `cls` pooling mode is for this family: cls | pooler | gap
    gated: bool = False
    citation: str = ""
    notes: str = ""
    arch: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)
    # -- facts for the book's encoders table (issue 11); "unknown" where no public source says
    pretraining_data: str = "unknown"
    objective: str = "unknown"
    input_size_reason: str = ""  # why the model runs at `input_size`
    token_layout: str = ""  # what the model's final token sequence holds, in order
    cls_embedding: str = ""  # what the `cls` pooling mode is for this encoder
    licence: str = "unknown"
    #: other `geometry` modes load_encoder(..., geometry=) accepts, each with the source that motivates it
    geometry_options: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    #: geometry option -> how its reference pipeline resamples 8-bit images (cxrcore.geometry.RESAMPLERS),
    #: where that differs from the published processor's
    option_resamplers: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

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
    ...); ``roi_image[k]`` is the index of the image it came from; ``roi_visible[k]`` the
    fraction of the box inside the model input; ``roi_excluded[k]`` the reason the box
    was not pooled (``""`` if it was; its ``roi_local`` row is then NaN). Every box
    keeps its row, so rows stay aligned with the boxes given.
    """

    cls: np.ndarray
    patch_mean: np.ndarray
    roi_local: np.ndarray
    roi_image: np.ndarray
    geometry: list[Geometry]
    grid: np.ndarray | None = None
    roi_visible: np.ndarray = field(default_factory=lambda: np.zeros(0))
    roi_excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def __post_init__(self) -> None:
        n = len(self.roi_local)
        if len(self.roi_visible) != n or len(self.roi_excluded) != n:
            # built by hand without them (e.g. concatenated without `concat`): not known per box,
            # but a NaN row is still an exclusion, so it is never counted as pooled
            nan_rows = np.isnan(np.asarray(self.roi_local, np.float64)).all(axis=1) if n else np.zeros(0, bool)
            self.roi_visible = np.full(n, np.nan)
            self.roi_excluded = np.where(nan_rows, "excluded (reason not recorded)", "").astype(object)

    @classmethod
    def concat(cls, parts: "Sequence[Encoding]", image_offsets: "Sequence[int] | None" = None) -> "Encoding":
        """One Encoding from several (batches in order); ``image_offsets[i]`` is added to part i's ``roi_image``."""
        offs = list(image_offsets) if image_offsets is not None else [0] * len(parts)
        grids = [e.grid for e in parts]
        return cls(
            cls=np.concatenate([e.cls for e in parts]), patch_mean=np.concatenate([e.patch_mean for e in parts]),
            roi_local=np.concatenate([e.roi_local for e in parts]),
            roi_image=np.concatenate([e.roi_image + o for e, o in zip(parts, offs)]),
            geometry=[g for e in parts for g in e.geometry],
            grid=np.concatenate(grids) if all(g is not None for g in grids) else None,
            roi_visible=np.concatenate([e.roi_visible for e in parts]),
            roi_excluded=np.concatenate([np.asarray(e.roi_excluded, dtype=object) for e in parts]),
        )

    def __len__(self) -> int:
        return self.cls.shape[0]

    @property
    def excluded_boxes(self) -> "pd.DataFrame":
        """One row per box left out of ``roi_local``: ``roi_row``, ``image``, ``box`` (index within its image), ``visible``, ``reason``."""
        import pandas as pd

        owner = np.asarray(self.roi_image, np.int64)
        within = np.zeros(len(owner), np.int64)
        for i in np.unique(owner):
            within[owner == i] = np.arange(int((owner == i).sum()))
        bad = np.flatnonzero(np.asarray(self.roi_excluded, dtype=object) != "")
        return pd.DataFrame({"roi_row": bad, "image": owner[bad], "box": within[bad],
                             "visible": np.asarray(self.roi_visible, np.float64)[bad],
                             "reason": np.asarray(self.roi_excluded, dtype=object)[bad].astype(str)})

    @property
    def exclusions(self) -> "pd.DataFrame":
        """Boxes left out, counted by reason: columns ``reason``, ``count``, ``item`` (as ``Cohort.exclusions``)."""
        import pandas as pd

        ex = self.excluded_boxes
        counts = ex.groupby("reason", sort=True).size() if len(ex) else pd.Series(dtype=np.int64)
        return pd.DataFrame({"reason": list(counts.index), "count": [int(c) for c in counts.values],
                             "item": ["box"] * len(counts)}, columns=["reason", "count", "item"])


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


#: EncoderSpec fields that document the published model (the book's encoders table), not the run.
DESCRIPTIVE_FIELDS = ("citation", "notes", "pretraining_data", "objective", "input_size_reason", "token_layout",
                      "cls_embedding", "licence", "geometry_options")

#: dtype names load_encoder accepts, besides torch dtypes
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

#: What is not computed in a reduced dtype (bf16/fp16), recorded in provenance as ``fp32_parts``.
FP32_PARTS = ("input scaling, geometry and normalisation (rounded once to the model dtype at its input); "
              "the ops torch.autocast keeps in float32 on the device (on CUDA: layer_norm, softmax, ...); "
              "cls/patch_mean/roi_local means (float32 from the model-dtype tokens); "
              "parameters of modules the model class keeps in float32 (fp32_modules; none for the six published encoders)")


def resolve_dtype(dtype: "torch.dtype | str") -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16``, or their names (``"bfloat16"``, ``"bf16"``, ...)."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(set(DTYPES))} (or the torch dtypes)")
        return DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} not supported; use torch.float32 (default), torch.bfloat16 (GPUs) or torch.float16")
    return dtype


def cast_state(state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a state dict to ``device`` and its floating tensors to ``dtype``, one tensor at a time (in place).

    Replacing entries one by one frees each source tensor as soon as its copy exists,
    so a checkpoint never sits in memory twice; tensors already right are not copied.
    Integer buffers (BatchNorm's step counter) keep their dtype.
    """
    for k in list(state):
        t = state[k]
        state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return state


def torch_load(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` of a checkpoint, memory-mapped (tensors read when moved or cast), weights only.

    Checkpoints in torch's legacy (pre-zipfile) format cannot be mapped; those are read whole.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def load_into_meta(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str,
                   optional: tuple[str, ...] = ("num_batches_tracked",)) -> tuple[list[str], list[str]]:
    """Put ``state`` into a model built on the meta device (``assign=True``: the tensors become the parameters).

    No second copy of the weights is made. Returns (missing, unexpected) keys; a missing
    buffer whose name ends in one of ``optional`` is created as zeros (BatchNorm's step
    counter is unused in eval mode and absent from some exports). Raises if any other
    tensor is left on the meta device.
    """
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    device = next((t.device for t in state.values()), torch.device("cpu"))
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith(optional):
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            setattr(mod, attr, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    missing = [k for k in missing if not k.endswith(optional)]
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left and not missing:
        raise ValueError(f"{what}: no weights for {left[:5]} after loading")
    return missing, unexpected


def parameter_dtypes(model: torch.nn.Module) -> dict[str, int]:
    """Number of parameter elements per dtype name, read off the model (what actually runs)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        k = str(p.dtype).removeprefix("torch.")
        out[k] = out.get(k, 0) + p.numel()
    return out


class Encoder:
    """A frozen encoder behind the common contract (see module docstring).

    Family subclasses set ``family`` and implement ``build``, ``build_meta``,
    ``forward_tokens`` and ``save``. ``crop_rounding``, ``library_resampler`` (how the
    family's reference pipeline resamples 8-bit images; transformers families derive it
    from their image processor, :meth:`eight_bit_resampler`) and ``cell_rule`` /
    ``cell_centre0`` are the family's library conventions (see :mod:`cxrcore.geometry`).

    The geometry step runs on the CPU whatever ``device`` is (torchvision's uint8
    kernels exist only there); the normalised pixels are then copied to the device
    (page-locked and asynchronous on CUDA).

    ``dtype`` is the dtype of the weights and of the forward pass: float32 (default),
    or bfloat16 / float16 weights for GPUs (loaded in that dtype, not cast after an
    fp32 load), run under ``torch.autocast`` of the same dtype. What stays float32 is
    :data:`FP32_PARTS`; ``provenance()`` records the parameter dtypes that actually ran.
    """

    family: ClassVar[str] = ""
    crop_rounding: ClassVar[str] = "floor"
    cell_rule: ClassVar[str] = "patch"
    cell_centre0: ClassVar[float] = 0.0
    library_resampler: ClassVar[str] = "torchvision"
    spec: EncoderSpec

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, *, weights: str, stand_in: bool,
                 device: str | torch.device = "cpu", dtype: "torch.dtype | str" = torch.float32,
                 input_size: int | None = None, geometry: str | None = None,
                 resize_short: int | None = None) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.weights = weights
        self.stand_in = stand_in
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.patch_size = int(spec.patch_size)
        self.input_size, self.geometry, self.resize_short = self.resolve_options(spec, input_size, geometry,
                                                                                 resize_short)
        self.resampler = self.eight_bit_resampler(spec, self.geometry)
        # The loaders put the weights on the device in the dtype already; this only moves
        # what a caller built by hand (a no-op otherwise, so nothing is copied).
        if any(p.device != self.device or (p.is_floating_point() and p.dtype != self.dtype)
               for p in self.model.parameters()) and not self._keeps_fp32():
            self.model.to(device=self.device, dtype=self.dtype)
        # on the CPU, where the pixels are made (preprocess)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def _keeps_fp32(self) -> bool:
        return bool(getattr(self.model, "_keep_in_fp32_modules", None))

    # -- options, checked before any weights are read (load_encoder calls this first) -----------
    @classmethod
    def resolve_options(cls, spec: EncoderSpec, input_size: int | None = None, geometry: str | None = None,
                        resize_short: int | None = None) -> tuple[int, str, int | None]:
        """``(input_size, geometry, resize_short)`` to run with: the spec's, or the overrides, checked.

        ``resize_short`` is the side resized to before the centre crop (crop geometries
        only, :data:`cxrcore.geometry.CROP_MODES`); by default :meth:`default_resize_short`.
        """
        from ..geometry import CROP_MODES, GEOMETRY_MODES

        size = spec.input_size if input_size is None else input_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"{spec.key}: input_size must be a positive integer, got {input_size!r}")
        size = int(size)
        if size % spec.patch_size:
            raise ValueError(
                f"{spec.key}: input size {size} is not a multiple of the patch size {spec.patch_size}; "
                f"use a multiple of {spec.patch_size} (e.g. {size - size % spec.patch_size or spec.patch_size} "
                f"or {size - size % spec.patch_size + spec.patch_size})"
            )
        geom = geometry or spec.geometry
        allowed = (spec.geometry, *spec.geometry_options)
        if geom not in GEOMETRY_MODES or geom not in allowed:
            raise ValueError(f"{spec.key}: geometry {geom!r} not offered; use one of {list(allowed)} "
                             f"(default {spec.geometry!r})")
        if geom not in CROP_MODES:
            if resize_short is not None and int(resize_short) != size:
                raise ValueError(f"{spec.key}: resize_short={resize_short} applies to the crop geometries "
                                 f"{list(CROP_MODES)}, not to {geom!r}; leave it out")
            return size, geom, None
        short = cls.default_resize_short(spec, size) if resize_short is None else resize_short
        if isinstance(short, bool) or not isinstance(short, (int, np.integer)) or short < size:
            raise ValueError(f"{spec.key}: resize_short={short!r} must be an integer >= input_size {size} "
                             "(the side resized to before the centre crop)")
        return size, geom, int(short)

    @classmethod
    def default_resize_short(cls, spec: EncoderSpec, input_size: int) -> int:
        """The side before the centre crop at ``input_size``: the spec's crop ratio kept (exactly its value at its size)."""
        if spec.resize_short is None:
            return input_size
        return input_size * int(spec.resize_short) // int(spec.input_size)

    @classmethod
    def eight_bit_resampler(cls, spec: EncoderSpec, geometry: str) -> str:
        """How 8-bit images are resampled under ``geometry`` (:data:`cxrcore.geometry.RESAMPLERS`)."""
        return spec.option_resamplers.get(geometry) or cls.library_resampler

    # -- family hooks ----------------------------------------------------------------------
    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The model on ``device`` in ``dtype``: a seeded stand-in, or the published weights from ``weights``.

        Real weights are loaded straight into ``dtype`` on ``device`` (never a float32
        copy first): transformers' ``from_pretrained(dtype=, device_map=)``, or the model
        built on the meta device and the state dict assigned (:func:`load_into_meta`).
        """
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
        return make_geometry(hw, self.input_size, self.patch_size, self.geometry, resize_short=self.resize_short,
                             crop_rounding=self.crop_rounding, cell_rule=self.cell_rule,
                             cell_centre0=self.cell_centre0, resampler=self.resampler)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Geometry]]:
        """Apply the geometry step, scale to [0, 1], replicate grey to 3 channels, normalise (float32).

        8-bit images are resampled as the family's reference pipeline resamples them
        (``self.resampler``, see :mod:`cxrcore.geometry`); 16-bit and float images are
        scaled to [0, 1] first and resampled in float32. All of it runs on the CPU, so the
        pixels do not depend on the device; the result is then copied to ``self.device``
        (from page-locked memory, asynchronously, on CUDA).
        """
        if len(images) == 0:
            raise ValueError("encode() got no images")
        batch, geoms = [], []
        for i, img in enumerate(images):
            if np.ndim(img) != 2:
                to_unit_float(img, i)  # raises, naming the image and the shape expected
            g = self.geometry_for(np.shape(img))
            batch.append(g.pixels(img, self.spec.interpolation, index=i))
            geoms.append(g)
        x = torch.stack(batch).expand(-1, 3, -1, -1)  # grey -> 3 identical channels, after scaling
        x = ((x - self._mean) / self._std).contiguous()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), geoms
        return x.to(self.device), geoms

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_tokens`` under inference mode, in the model dtype (autocast for bf16/fp16); float32 out."""
        with torch.inference_mode():
            reduced = self.dtype != torch.float32
            with torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=reduced):
                glob, grid = self.forward_tokens(pixels.to(self.device, self.dtype))
        return glob.float(), grid.float()

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]] | None = None,
               return_grid: bool = False, min_visible: float | None = None) -> Encoding:
        """One forward pass over ``images`` -> ``cls``, ``patch_mean``, ``roi_local`` (and the grid).

        Boxes less than ``min_visible`` (default ``cxrcore.pooling.MIN_VISIBLE_FRACTION``)
        inside their image or inside the model input are excluded with a reason
        (``Encoding.roi_excluded``, see :mod:`cxrcore.pooling`).
        """
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists; give one (possibly empty) list per image")
        x, geoms = self.preprocess(images)
        glob, grid = self.forward(x)
        roi, owner, visible, reasons = roi_local(grid, geoms, boxes, min_visible=min_visible, return_visible=True,
                                                 return_reasons=True)
        return Encoding(
            cls=glob.cpu().numpy(),
            patch_mean=patch_mean(grid).cpu().numpy(),
            roi_local=roi,
            roi_image=owner,
            geometry=geoms,
            grid=grid.cpu().numpy() if return_grid else None,
            roi_visible=visible,
            roi_excluded=reasons,
        )

    def provenance(self) -> dict[str, Any]:
        """What produced an embedding: key, weights, stand-in flag, preprocessing, and the dtypes that ran.

        ``input_size``, ``geometry`` and ``resize_short`` are the ones used (which may differ
        from the published ones); ``resampler`` says how 8-bit images were resampled;
        ``weights_dtype`` is read off the parameters (``mixed`` with ``parameter_dtypes``
        when they differ); ``fp32_parts`` says what stays float32.
        """
        d = asdict(self.spec)
        # the table facts describe the published model, they do not change an embedding: kept out, so that a
        # provenance mismatch names what differs in the run (they are in encoder_spec(key))
        for k in ("arch", *DESCRIPTIVE_FIELDS):
            d.pop(k, None)
        counts = parameter_dtypes(self.model) if self.model is not None else {}
        kinds = sorted(counts)
        fp32_modules = sorted({n.rpartition(".")[0] for n, p in self.model.named_parameters()
                               if p.dtype == torch.float32}) if self.model is not None and self.dtype != torch.float32 else []
        d.update(weights=str(self.weights), stand_in=self.stand_in, input_size=self.input_size,
                 patch_size=self.patch_size, geometry=self.geometry, resize_short=self.resize_short,
                 crop_rounding=self.crop_rounding, resampler=self.resampler, cell_rule=self.cell_rule,
                 dtype=str(self.dtype),
                 weights_dtype=kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "unknown"),
                 parameter_dtypes=counts, fp32_modules=fp32_modules,
                 fp32_parts=FP32_PARTS if self.dtype != torch.float32 else "everything (float32 run)")
        return d

    def _write_descriptor(self, directory: Path, **extra: Any) -> None:
        (directory / CXRCORE_ENCODER_FILE).write_text(
            json.dumps({"key": self.spec.key, "family": self.spec.family, "stand_in": self.stand_in,
                        "input_size": self.input_size, "geometry": self.geometry,
                        "resize_short": self.resize_short, **extra}, indent=2)
        )

    def __repr__(self) -> str:
        tag = "random-weight stand-in" if self.stand_in else str(self.weights)
        return (f"Encoder({self.spec.key!r}, {tag}, input {self.input_size}, grid {self.grid_shape}, "
                f"{str(self.dtype).removeprefix('torch.')})")
