"""The architectural control: torchvision ResNet-50 with the self-supervised DINO weights.

There is no token sequence: the "patches" are the cells of the last stage (``layer4``)
feature map, output stride 32 (224 -> 7x7 cells of 2048 channels). The global
embedding is torchvision's global average pool, which is by construction the mean of
those cells, i.e. ``cls == patch_mean`` for this family (asserted by the tests and
explained in the book). The classifier ``fc`` is removed (DINO ships none).

Published: Caron et al. 2021, "Emerging properties in self-supervised vision
transformers", ICCV; checkpoint ``dino_resnet50_pretrain.pth`` from
https://github.com/facebookresearch/dino (a plain torchvision ``resnet50`` state dict
without ``fc``). Preprocessing: ImageNet mean/std, bicubic, shortest edge to 224 then
centre crop (crop ratio 1.0, not the 256 -> 224 evaluation crop, so that boxes near
the image edge are not cut away).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, EncoderSpec, explain_load_failure, read_descriptor, seeded

DINO_RESNET50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
CHECKPOINT_NAMES = ("model.safetensors", "dino_resnet50_pretrain.pth")

#: Stand-in: same torchvision ResNet class and Bottleneck block, one block per stage, thin
#: bottlenecks; stem, stride 32 and the 2048-channel layer4 output are kept.
STAND_IN_ARCH = {"layers": [1, 1, 1, 1], "width_per_group": 8}


def build_resnet(arch: dict[str, Any]) -> torch.nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    model = ResNet(Bottleneck, list(arch["layers"]), width_per_group=int(arch.get("width_per_group", 64)))
    model.fc = torch.nn.Identity()
    return model


def _load_checkpoint(weights: str) -> dict[str, torch.Tensor]:
    """State dict from a URL (torch hub cache), a .pth/.safetensors file, or a directory holding one."""
    if weights.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True, check_hash=False)
    p = Path(weights).expanduser()
    if p.is_dir():
        found = [p / n for n in CHECKPOINT_NAMES if (p / n).is_file()] or sorted(p.glob("*.pth"))
        if not found:
            raise FileNotFoundError(f"{p} holds none of {CHECKPOINT_NAMES} nor any *.pth file")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"{weights} is neither a URL, a checkpoint file nor a directory")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    return torch.load(str(p), map_location="cpu", weights_only=True)


def _clean(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Accept the plain DINO backbone dict, or a full DINO training checkpoint (teacher backbone)."""
    for wrapper in ("teacher", "state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            k = k.removeprefix(prefix)
        if k.startswith(("fc.", "head.")):  # classifier / DINO projection head: not part of the frozen encoder
            continue
        out[k] = v
    return out


class ResNetEncoder(Encoder):
    """torchvision ``ResNet``: layer4 cells are the grid, ``avgpool`` is the global embedding."""

    family = "torchvision_resnet"

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool) -> torch.nn.Module:
        if stand_in:
            return seeded(lambda: build_resnet(STAND_IN_ARCH))
        assert weights is not None
        desc = read_descriptor(weights) or {}
        try:
            state = _clean(_load_checkpoint(weights))
        except Exception as e:  # URL, file and unpickling errors: all mean "these weights are not available here"
            raise explain_load_failure(spec, weights, e) from e
        model = build_resnet(desc.get("arch") or dict(spec.arch))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # BatchNorm's step counter is unused in eval mode and absent from some exports
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{spec.key}: checkpoint {weights} does not fit torchvision resnet50 without fc: "
                f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}; "
                "expected the DINO backbone state dict (dino_resnet50_pretrain.pth)"
            )
        return model

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        with torch.device("meta"):
            return build_resnet(dict(spec.arch))

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(pixels))))
        fmap = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # [B, 2048, h, w]
        h, w = self._grid_hw(pixels)
        if tuple(fmap.shape[-2:]) != (h, w):
            raise RuntimeError(f"{self.spec.key}: layer4 map is {tuple(fmap.shape[-2:])}, expected {(h, w)}")
        return torch.flatten(m.avgpool(fmap), 1), fmap.permute(0, 2, 3, 1)

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: t.detach().contiguous().cpu() for k, t in self.model.state_dict().items()},
                  str(path / CHECKPOINT_NAMES[0]))
        self._write_descriptor(path, arch=STAND_IN_ARCH if self.stand_in else dict(self.spec.arch))
        return path
