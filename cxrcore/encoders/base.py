"""One contract for every frozen encoder: images in, one forward pass, all three poolings out.

A family subclass says how to build/load its model and how to split the model's
output into the global embedding and the patch-token grid (``forward_tokens``);
everything else (intensity scaling, the explicit geometry step, normalisation,
batching, pooling) lives here once, so every family is preprocessed and pooled the
same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..geometry import Geometry, make_geometry
from ..pooling import patch_mean, roi_local

#: File written beside the weights by :meth:`Encoder.save`, read back by ``load_encoder``.
CXRCORE_ENCODER_FILE = "cxrcore_encoder.json"


@dataclass(frozen=True)
class EncoderSpec:
    """Published facts of one registered encoder (the preprocessing and token layout)."""

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

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_size // self.patch_size, self.input_size // self.patch_size)


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


def to_unit_float(image: np.ndarray, index: int = 0) -> np.ndarray:
    """Scale a 2-D grey image to float32 in [0, 1] by its dtype, keeping every bit.

    uint8 / 255, uint16 / 65535, bool as 0/1; floats must already be in [0, 1]
    (``cxrcore.io.read_image`` returns that). Done by hand because PIL's
    ``convert("RGB")`` clips 16-bit data to 8 bits.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4:
        raise ValueError(
            f"image {index} has shape {a.shape}: expected a 2-D grey array; convert colour-saved radiographs "
            "to one channel first (cxrcore.io.read_image does)"
        )
    if a.ndim != 2:
        raise ValueError(f"image {index} has shape {a.shape}: expected a 2-D grey array [H, W]")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ValueError(f"image {index} contains NaN or inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"image {index} is float with range [{lo:.4g}, {hi:.4g}]: expected [0, 1]; "
                "pass integer data as uint8/uint16, or rescale floats to [0, 1]"
            )
        return np.clip(a, 0.0, 1.0)
    raise ValueError(f"image {index} has dtype {a.dtype}: expected uint8, uint16 or float in [0, 1]")


class Encoder:
    """A frozen encoder behind the common contract (see module docstring)."""

    spec: EncoderSpec

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, *, weights: str, stand_in: bool,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 input_size: int | None = None) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.weights = weights
        self.stand_in = stand_in
        self.device = torch.device(device)
        self.dtype = dtype
        self.input_size = int(input_size or spec.input_size)
        if self.input_size % spec.patch_size:
            raise ValueError(
                f"{spec.key}: input size {self.input_size} is not a multiple of the patch size {spec.patch_size}"
            )
        self.model.to(self.device)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(3, 1, 1)

    # -- family hooks ----------------------------------------------------------------------
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
        s = self.input_size // self.spec.patch_size
        return (s, s)

    def geometry_for(self, hw: tuple[int, int]) -> Geometry:
        return make_geometry(hw, self.input_size, self.spec.patch_size, self.spec.geometry)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Geometry]]:
        """Scale, apply the geometry step, replicate grey to 3 channels, normalise."""
        if len(images) == 0:
            raise ValueError("encode() got no images")
        batch, geoms = [], []
        for i, img in enumerate(images):
            a = to_unit_float(img, i)
            g = self.geometry_for(a.shape)
            x = g.apply(torch.from_numpy(a).to(self.device)[None], self.spec.interpolation)
            batch.append(x.expand(3, -1, -1))
            geoms.append(g)
        x = torch.stack(batch)
        x = (x - self._mean) / self._std
        return x, geoms

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]] | None = None,
               return_grid: bool = False) -> Encoding:
        """One forward pass over ``images`` -> ``cls``, ``patch_mean``, ``roi_local`` (and the grid)."""
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box lists; give one (possibly empty) list per image")
        x, geoms = self.preprocess(images)
        autocast = self.dtype == torch.bfloat16 and self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=autocast):
            glob, grid = self.forward_tokens(x.to(self.dtype) if not autocast else x)
        grid = grid.float()
        roi, owner = roi_local(grid, geoms, boxes)
        return Encoding(
            cls=glob.float().cpu().numpy(),
            patch_mean=patch_mean(grid).cpu().numpy(),
            roi_local=roi,
            roi_image=owner,
            geometry=geoms,
            grid=grid.cpu().numpy() if return_grid else None,
        )

    def provenance(self) -> dict[str, Any]:
        """What produced an embedding: key, weights, stand-in flag, preprocessing."""
        d = asdict(self.spec)
        d.update(weights=str(self.weights), stand_in=self.stand_in, input_size=self.input_size, dtype=str(self.dtype))
        return d

    def _write_descriptor(self, directory: Path) -> None:
        (directory / CXRCORE_ENCODER_FILE).write_text(
            json.dumps({"key": self.spec.key, "family": self.spec.family, "stand_in": self.stand_in,
                        "input_size": self.input_size}, indent=2)
        )

    def __repr__(self) -> str:
        tag = "random-weight stand-in" if self.stand_in else str(self.weights)
        return f"Encoder({self.spec.key!r}, {tag}, input {self.input_size}, grid {self.grid_shape})"
