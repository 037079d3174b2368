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
the image edge are not cut away), the crop offset rounded as torchvision's ``CenterCrop``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, EncoderSpec, cast_state, torch_load, explain_load_failure, load_into_meta, read_descriptor, seeded

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
    """State dict from a URL (torch hub cache), a .pth/.safetensors file, or a directory holding one (memory-mapped)."""
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
    return torch_load(p)


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


#: Receptive-field centre of layer4 cell 0, input edge coordinates: cell c is centred on
#: input pixel 32c, i.e. at 32c + 0.5. Every stage keeps centres on even positions: conv1
#: (7x7, stride 2, pad 3) output i is centred on input pixel 2i; maxpool (3x3, stride 2,
#: pad 1) output j on conv1 output 2j, i.e. pixel 4j; in layer2-4 the stride-2 3x3 conv
#: (pad 1; torchvision puts the stride there) and the stride-2 1x1 downsample both centre
#: output k on input 2k, so pixel 8k, 16k, 32k; stride-1 3x3 and 1x1 convs are centred.
#: Checked by gradient and lit-pixel tests (tests/test_fidelity_encoders.py).
RESNET_CELL_CENTRE0 = 0.5


class ResNetEncoder(Encoder):
    """torchvision ``ResNet``: layer4 cells are the grid, ``avgpool`` is the global embedding.

    A box pools the layer4 cells whose receptive-field centre (``32c + 0.5``) it
    contains (:data:`RESNET_CELL_CENTRE0`), not the 32-pixel block ``[32c, 32c + 32)``,
    whose centre lies half a cell away from what the cell sees.
    """

    family = "torchvision_resnet"
    crop_rounding = "round"  # torchvision's CenterCrop
    library_resampler = "pil"  # its reference pipeline resizes PIL images
    cell_rule = "rf_centre"
    cell_centre0 = RESNET_CELL_CENTRE0

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if stand_in:
            return seeded(lambda: build_resnet(STAND_IN_ARCH)).to(device=device, dtype=dtype)
        assert weights is not None
        desc = read_descriptor(weights) or {}
        try:
            state = _clean(_load_checkpoint(weights))
        except Exception as e:  # URL, file and unpickling errors: all mean "these weights are not available here"
            raise explain_load_failure(spec, weights, e) from e
        with torch.device("meta"):  # skeleton only; the checkpoint's tensors become the parameters
            model = build_resnet(desc.get("arch") or dict(spec.arch))
        missing, unexpected = load_into_meta(model, cast_state(state, torch.device(device), dtype),
                                             what=f"{spec.key} ({weights})")
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
