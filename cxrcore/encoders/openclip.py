"""Generic wrapper: the image tower of any open_clip model as ``open_clip:<id>``.

Ids (open_clip's own spellings after the prefix; ``open_clip.factory.parse_model_name``):

- ``open_clip:<model name>``: a config open_clip knows (``open_clip.list_models()``, or one
  registered with ``open_clip.add_model_config``), e.g. ``open_clip:ViT-B-16``. The
  architecture only: weights come from ``weights=`` (``--weights``): a local checkpoint
  file or directory, ``hf-hub:<org>/<repo>``, or a URL.
- ``open_clip:<model name>@<pretrained tag>``: the config with one of open_clip's
  pretrained tags (``open_clip.list_pretrained_tags_by_model(name)``), e.g.
  ``open_clip:ViT-B-16@laion2b_s34b_b88k``. The tag is part of the id because it changes
  the preprocessing (mean, std, interpolation, resize mode), as in
  ``create_model_and_transforms(name, pretrained=tag)``; its weights are the default.
- ``open_clip:hf-hub:<org>/<repo>``: the repository's ``open_clip_config.json`` (model and
  preprocessing) and weights, from the Hugging Face cache (``HF_HUB_OFFLINE`` honoured).
- ``open_clip:local-dir:<path>``: the same files in a local directory.

Preprocessing is open_clip's eval transform (``open_clip.transform.image_transform``) for
the id's preprocess config (defaults of ``PreprocessCfg``, overlaid with the tag's or the
file's ``preprocess_cfg``, as ``create_model`` merges them): ``resize_mode="shortest"``:
``Resize(size)`` of the shortest edge, then torchvision's ``CenterCrop(size)`` (geometry
``center_crop``, crop ratio 1.0, offset rounded as ``CenterCrop``); ``"squash"``:
``Resize((size, size))`` (geometry ``resize``); ``"longest"`` (resize the longest edge,
then pad with ``fill_color``) is refused: cxrcore's ``pad_square`` pads *before* it
resizes, which samples the border differently, and no built-in open_clip config uses
it. ``interpolation``: ``"bilinear"`` is bilinear, anything else (``"bicubic"``,
``"random"``) is bicubic at eval, as ``image_transform`` maps it. 8-bit images are resized
by Pillow (open_clip resizes PIL images).

Only the image tower (``model.visual``) is built, by open_clip's own
``open_clip.model._build_vision_tower`` (on the meta device for specs and loading, so the
checkpoint's tensors become the parameters in the requested dtype on the device); the
``visual.*`` tensors of the checkpoint are loaded. Towers and tokens:

- open_clip's ``VisionTransformer``: tokens are what ``output_tokens=True`` returns
  (``_pool``: the patch tokens after ``ln_post``, or before it for configs with
  ``final_ln_after_pool``, e.g. CLIPA); one class token, no registers. ``cls`` is the
  pooled embedding *before* ``proj`` (the class token after ``ln_post`` for
  ``pool_type="tok"``; for ``"avg"`` the mean of the patch tokens), the analogue of
  BiomedCLIP's 768-d CLS; ``cls @ visual.proj`` is ``encode_image``'s output.
- ``TimmModel`` with a timm ViT trunk (BiomedCLIP, the SigLIP and EVA configs): tokens are
  ``trunk.forward_features`` minus timm's prefix tokens (CLS, registers); ``cls`` is
  ``trunk.forward_head(pre_logits=True)``, the trunk's pooled embedding before open_clip's
  projection head (``visual.head(cls)`` is ``encode_image``'s output).

Refused with a message: open_clip's ``ModifiedResNet`` and timm CNN trunks (ConvNeXt,
FastViT: no token sequence; a CNN grid needs the receptive-field cell rule of
:mod:`cxrcore.encoders.resnet` established for each architecture, which is not trivial),
timm trunks with a convolutional stem (ViTamin: its tokens have no patch), and
attention-pool towers (CoCa: the tokens are pooler queries, not patches).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .base import (Encoder, EncoderSpec, WeightsUnavailableError, cast_state, explain_load_failure, load_into_meta,
                   read_descriptor, seeded, torch_load)
from .timm_vit import TIMM_STAND_IN, timm_set_input_size, timm_vit_tokens

OPEN_CLIP_PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"
#: the file :meth:`OpenClipEncoder.save` writes (open_clip's first choice in a directory and on the hub)
WEIGHTS_FILE = "open_clip_model.safetensors"

#: Stand-in of an open_clip ``VisionTransformer``: the ``vision_cfg`` fields narrowed (patch size, image size,
#: pooling, norms and the output dimension kept).
VIT_STAND_IN = {"width": 64, "layers": 1, "head_width": 32, "mlp_ratio": 2.0}

#: the forms an id may take, for messages
ID_FORMS = ("'open_clip:<model name>' (an open_clip config; weights=...), 'open_clip:<model name>@<pretrained tag>', "
            "'open_clip:hf-hub:<org>/<repo>', 'open_clip:local-dir:<directory>'")


# -- ids and configs ------------------------------------------------------------------------------------
def parse_open_clip_key(key: str) -> tuple[str | None, str, str | None]:
    """``(schema, identifier, tag)`` of an ``open_clip:`` id: schema ``hf-hub``, ``local-dir`` or None (a model name)."""
    from open_clip.factory import parse_model_name

    if not key.startswith(OPEN_CLIP_PREFIX) or not key[len(OPEN_CLIP_PREFIX):]:
        raise KeyError(f"{key!r} is not an open_clip id; accepted: {ID_FORMS}")
    schema, ident = parse_model_name(key[len(OPEN_CLIP_PREFIX):])
    if schema is not None:
        return schema, ident, None
    name, _, tag = ident.partition("@")
    # open_clip cleans the name the same way (create_model: model_name.replace('/', '-'))
    return None, name.replace("/", "-"), tag or None


def preprocess_config(overlay: dict[str, Any] | None) -> dict[str, Any]:
    """open_clip's preprocess config: ``PreprocessCfg`` defaults overlaid with ``overlay`` (as ``create_model`` merges)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    return merge_preprocess_dict(PreprocessCfg(), overlay or {})


def _read_config_file(path: Path, key: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} is not valid JSON ({e})") from None
    if "model_cfg" not in config:
        raise ValueError(f"{key}: {path} has no 'model_cfg'; an open_clip_config.json holds model_cfg and "
                         "preprocess_cfg (as open_clip's push_to_hf_hub writes it)")
    return config


def open_clip_config(key: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``({"model_cfg", "preprocess_cfg"}, default weights, source facts)`` of an ``open_clip:`` id (no weights read)."""
    import open_clip

    schema, ident, tag = parse_open_clip_key(key)
    if schema == "local-dir":
        path = Path(ident).expanduser()
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{key}: {path / CONFIG_FILE} does not exist; 'open_clip:local-dir:<directory>' "
                                    "needs a directory holding open_clip_config.json and the weights")
        config = _read_config_file(path / CONFIG_FILE, key)
        return ({"model_cfg": config["model_cfg"], "preprocess_cfg": preprocess_config(config.get("preprocess_cfg"))},
                ident, {"source": f"local directory {ident}"})
    if schema == "hf-hub":
        spec0 = EncoderSpec(key=key, family="open_clip", weights=f"hf-hub:{ident}", input_size=0, patch_size=0,
                            embed_dim=0, mean=(0.0,) * 3, std=(1.0,) * 3)
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(ident, CONFIG_FILE))
        except Exception as e:  # noqa: BLE001 - hub, offline-cache and validation errors all mean "not available"
            raise explain_load_failure(spec0, ident, e) from e
        config = _read_config_file(path, key)
        return ({"model_cfg": config["model_cfg"], "preprocess_cfg": preprocess_config(config.get("preprocess_cfg"))},
                f"hf-hub:{ident}", {"source": f"Hugging Face repository {ident}"})
    model_cfg = open_clip.get_model_config(ident)
    if model_cfg is None:
        raise KeyError(f"{key}: open_clip has no model config {ident!r} (open_clip.list_models() lists them; "
                       f"register your own with open_clip.add_model_config). Accepted: {ID_FORMS}")
    if tag is None:
        return ({"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(None)}, "",
                {"source": f"open_clip config {ident}", "model_name": ident})
    pretrained = open_clip.get_pretrained_cfg(ident, tag)
    if not pretrained:
        raise KeyError(f"{key}: open_clip has no pretrained tag {tag!r} for {ident}; its tags: "
                       f"{open_clip.list_pretrained_tags_by_model(ident) or 'none'}")
    if bool(pretrained.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        # open_clip only warns here and builds the model with the other activation; these weights need theirs
        other = f"{ident}-quickgelu" if pretrained.get("quick_gelu") else ident.removesuffix("-quickgelu")
        raise ValueError(f"{key}: the weights of tag {tag!r} were trained with quick_gelu="
                         f"{bool(pretrained.get('quick_gelu'))} but config {ident} has quick_gelu="
                         f"{bool(model_cfg.get('quick_gelu', False))}; use 'open_clip:{other}@{tag}'")
    # open_clip's download_pretrained prefers the hub copy; 'org/repo/' means the default file name
    hub = str(pretrained.get("hf_hub") or "").rstrip("/")
    weights = f"hf-hub:{hub}" if hub else str(pretrained.get("url") or "")
    return ({"model_cfg": model_cfg, "preprocess_cfg": preprocess_config(pretrained)}, weights,
            {"source": f"open_clip config {ident}, pretrained tag {tag}", "model_name": ident, "pretrained_tag": tag})


# -- the image tower ------------------------------------------------------------------------------------
def _vision_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    v = dict(model_cfg["vision_cfg"])
    v["timm_model_pretrained"] = False  # never download timm's own ImageNet weights
    return v


def build_visual(model_cfg: dict[str, Any], trunk_kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """open_clip's image tower (``model.visual``) from a ``model_cfg`` dict, by open_clip's own builder.

    ``trunk_kwargs`` (stand-ins of timm trunks): open_clip's ``TimmModel`` passes no width or
    depth to timm, so its skeleton is built on the meta device and a narrow trunk and
    projection head, made as ``TimmModel`` makes them, are put in place (same classes, same
    state-dict keys).
    """
    from open_clip.model import _build_vision_tower

    def build(v: dict[str, Any]) -> torch.nn.Module:
        return _build_vision_tower(model_cfg["embed_dim"], v, model_cfg.get("quick_gelu", False), None)

    v = _vision_cfg(model_cfg)
    if not trunk_kwargs:
        return build(v)
    import timm
    from timm.layers import Mlp

    with torch.device("meta"):
        visual = build(v)
    name, pool, proj = v["timm_model_name"], v.get("timm_pool", "avg"), v.get("timm_proj", "linear")
    proj_bias, embed_dim = bool(v.get("timm_proj_bias", False)), int(model_cfg["embed_dim"])
    if proj in ("linear", "mlp"):  # TimmModel: the trunk's classifier removed, pooling as configured
        visual.trunk = timm.create_model(name, pretrained=False, num_classes=0, **({"global_pool": pool} if pool else {}),
                                         **trunk_kwargs)
    else:  # the trunk's own head is the projection (proj '' / 'none')
        visual.trunk = timm.create_model(name, pretrained=False, num_classes=0 if proj == "none" else embed_dim,
                                         global_pool=pool, **trunk_kwargs)
    width = visual.trunk.num_features
    if proj == "linear":
        visual.head.proj = torch.nn.Linear(width, embed_dim, bias=proj_bias)
    elif proj == "mlp":
        visual.head.mlp = Mlp(width, 2 * embed_dim, embed_dim, drop=(v.get("timm_drop", 0.0), 0), bias=(True, proj_bias))
    return visual


def stand_in_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(model_cfg, trunk_kwargs)`` of the stand-in: a narrowed ``vision_cfg``, or narrowed timm trunk kwargs."""
    model_cfg = copy.deepcopy(dict(config["model_cfg"]))
    if model_cfg["vision_cfg"].get("timm_model_name"):
        return model_cfg, dict(TIMM_STAND_IN)
    model_cfg["vision_cfg"].update(VIT_STAND_IN)
    return model_cfg, None


def _square(size: Any, key: str, what: str) -> int:
    hw = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
    if len(hw) != 2 or hw[0] != hw[1]:
        raise ValueError(f"{key}: {what} is {size}, not square; cxrcore makes square model inputs")
    return hw[0]


def tower_facts(visual: torch.nn.Module, key: str) -> dict[str, Any]:
    """Token layout of an image tower built on the meta device; raises, saying why, for towers cxrcore cannot split."""
    kind = type(visual).__name__
    if hasattr(visual, "trunk"):  # open_clip.timm_model.TimmModel
        trunk = visual.trunk
        tname = type(trunk).__name__
        if not (hasattr(trunk, "patch_embed") and hasattr(trunk, "num_prefix_tokens")):
            raise ValueError(f"{key}: its image tower is a timm {tname} (a CNN or hierarchical trunk: no token "
                             "sequence), not a ViT; cxrcore wraps open_clip towers that are ViTs (open_clip's "
                             "VisionTransformer, or a timm ViT trunk). The paper's CNN control is 'dino-resnet50'")
        size = _square(visual.image_size, key, "the tower's image_size")
        if tuple(trunk.patch_embed.img_size) != (size, size):  # as the encoder will run it (timm_set_input_size)
            trunk.set_input_size(img_size=size)
        with torch.no_grad():
            tokens = trunk.forward_features(torch.empty(1, 3, size, size, device="meta"))
        if tokens.ndim != 3:
            raise ValueError(f"{key}: its timm trunk {tname} returns features of shape {tuple(tokens.shape)}, not a "
                             "token sequence [batch, tokens, width]; wrap ViT trunks only")
        n_prefix = int(trunk.num_prefix_tokens)
        n_patches = tokens.shape[1] - n_prefix
        side = math.isqrt(n_patches)
        patch = tuple(getattr(trunk.patch_embed, "patch_size", ()) or ())
        if len(patch) != 2 or patch[0] != patch[1] or side * side != n_patches or side != size // patch[0]:
            raise ValueError(f"{key}: its timm trunk {tname} makes {n_patches} patch tokens from a {size} px input "
                             f"with a {patch} patch embedding (a convolutional stem, as in ViTamin): its tokens have "
                             "no patch of their own, so a box has no exact set of cells; wrap a plain-patch ViT")
        stride = patch[0]
        if size % stride:
            raise ValueError(f"{key}: vision_cfg.image_size {size} is not a multiple of the patch size {stride}: open_clip "
                             f"feeds {size} px and the patch embedding drops the last {size % stride} rows and columns "
                             "unseen, a crop cxrcore's geometry does not model (it never lets a model cut a partial "
                             "patch); wrap a config whose image size is a multiple of its patch size")
        pool = str(getattr(trunk, "global_pool", ""))
        if not pool:
            raise ValueError(f"{key}: its timm trunk has no global pooling (global_pool=''), so open_clip's image "
                             "embedding is not one vector per image; wrap another model")
        has_cls = getattr(trunk, "cls_token", None) is not None
        norm_after_pool = not isinstance(getattr(trunk, "fc_norm", None), (torch.nn.Identity, type(None)))
        if pool == "token":
            global_pool, cls_text = "cls", "the class token after the trunk's final norm"
        elif pool == "avg" and not norm_after_pool:
            global_pool, cls_text = "gap", "the mean of the patch tokens (timm global_pool='avg')"
        elif pool == "map":
            global_pool, cls_text = "pooler", "the trunk's attention-pool head (a learned query over the patch tokens)"
        else:
            global_pool, cls_text = "pooler", (f"the trunk's pooled embedding (timm global_pool={pool!r}"
                                               + (", then fc_norm" if norm_after_pool else "") + ")")
        n_reg = n_prefix - (1 if has_cls else 0)
        layout = ("[" + ", ".join((["CLS"] if has_cls else []) + ([f"{n_reg} register tokens"] if n_reg else [])
                                  + [f"{side}x{side} patch tokens"]) + "] from the timm trunk's forward_features")
        return dict(tower=f"TimmModel({tname})", patch_size=stride, embed_dim=int(tokens.shape[-1]),
                    num_register_tokens=n_reg, has_cls_token=has_cls, global_pool=global_pool, token_layout=layout,
                    cls_embedding=f"{cls_text}, before open_clip's projection head ({int(trunk.num_features)}-d; "
                                  "trunk.forward_head(pre_logits=True))")
    if kind == "ModifiedResNet":
        raise ValueError(f"{key}: its image tower is open_clip's ModifiedResNet (a CNN with an attention-pool head), "
                         "not a ViT; cxrcore wraps open_clip towers that are ViTs (open_clip's VisionTransformer, or "
                         "a timm ViT trunk). The paper's CNN control is 'dino-resnet50'")
    if kind != "VisionTransformer":
        raise ValueError(f"{key}: image tower {kind} is not one cxrcore knows the token layout of; wrap open_clip's "
                         "VisionTransformer or a timm ViT trunk")
    if visual.attn_pool is not None:
        raise ValueError(f"{key}: its VisionTransformer ends in an attentional pooler (CoCa): the tokens it returns are "
                         "the pooler's queries, not patch tokens, so there is no patch grid to pool; wrap another model")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"{key}: its VisionTransformer has pool_type={visual.pool_type!r}: no pooled embedding and no "
                         "separate patch tokens; wrap another model")
    patch = _square(visual.patch_size, key, "the patch size")
    width = int(visual.conv1.out_channels)
    side = _square(visual.grid_size, key, "the patch grid")
    size = _square(visual.image_size, key, "vision_cfg.image_size")
    if size % patch:
        raise ValueError(f"{key}: vision_cfg.image_size {size} is not a multiple of the patch size {patch}: open_clip "
                         f"feeds {size} px and the patch convolution drops the last {size % patch} rows and columns "
                         "unseen, a crop cxrcore's geometry does not model; wrap a config whose image size is a "
                         "multiple of its patch size")
    after = bool(visual.final_ln_after_pool)
    if visual.pool_type == "tok":
        global_pool = "cls"
        cls_text = "the class token " + ("with ln_post applied after pooling" if after else "after ln_post")
    else:
        global_pool = "pooler" if after else "gap"
        cls_text = "ln_post of the mean of the patch tokens" if after else "the mean of the patch tokens after ln_post"
    return dict(tower="VisionTransformer", patch_size=patch, embed_dim=width, num_register_tokens=0, has_cls_token=True,
                global_pool=global_pool,
                token_layout=f"[CLS, {side}x{side} patch tokens] " + ("before ln_post (final_ln_after_pool)" if after
                                                                     else "after ln_post")
                             + ", as VisionTransformer(output_tokens=True) returns them",
                cls_embedding=f"{cls_text}, before the {width}->{int(visual.output_dim)} projection proj ({width}-d)")


def geometry_of(preprocess_cfg: dict[str, Any], key: str) -> dict[str, Any]:
    """Spec fields (geometry, interpolation, mean, std) of open_clip's eval transform for ``preprocess_cfg``."""
    mode = preprocess_cfg.get("resize_mode") or "shortest"
    if mode == "shortest":
        geometry = "center_crop"
    elif mode == "squash":
        geometry = "resize"
    elif mode == "longest":
        raise ValueError(f"{key}: its preprocess_cfg has resize_mode='longest' (open_clip resizes the longest edge, "
                         f"then pads with fill_color={preprocess_cfg.get('fill_color', 0)}); cxrcore's pad_square pads "
                         "before it resizes, which samples the image border differently, so these pixels cannot be "
                         "reproduced; wrap another model")
    else:
        raise ValueError(f"{key}: unknown open_clip resize_mode {mode!r} (open_clip knows shortest, longest, squash)")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    def per_channel(v: Any, default: tuple[float, ...]) -> tuple[float, float, float]:
        v = v or default  # image_transform: `mean or OPENAI_DATASET_MEAN`, a scalar meaning every channel
        return tuple(float(x) for x in np.broadcast_to(np.asarray(v, np.float64).ravel(), (3,)))

    return dict(geometry=geometry,
                # image_transform: 'bilinear' is BILINEAR, anything else (bicubic, random) BICUBIC at eval
                interpolation="bilinear" if preprocess_cfg.get("interpolation") == "bilinear" else "bicubic",
                mean=per_channel(preprocess_cfg.get("mean"), OPENAI_DATASET_MEAN),
                std=per_channel(preprocess_cfg.get("std"), OPENAI_DATASET_STD))


def spec_fields(config: dict[str, Any], key: str) -> dict[str, Any]:
    """EncoderSpec fields derived from an ``open_clip_config.json``-style dict (no weights)."""
    with torch.device("meta"):
        visual = build_visual(config["model_cfg"])
    facts = tower_facts(visual, key)
    size = _square(config["model_cfg"]["vision_cfg"].get("image_size", 224), key, "vision_cfg.image_size")
    pre = geometry_of(config["preprocess_cfg"], key)
    return dict(input_size=size, resize_short=size if pre["geometry"] == "center_crop" else None, **pre, **facts)


def open_clip_spec(key: str) -> EncoderSpec:
    """Spec of ``open_clip:<id>`` from open_clip's own config (model and preprocessing); no weights read."""
    config, weights, source = open_clip_config(key)
    f = spec_fields(config, key)
    pp = config["preprocess_cfg"]
    return EncoderSpec(
        key=key, family="open_clip", weights=weights, input_size=f["input_size"], patch_size=f["patch_size"],
        embed_dim=f["embed_dim"], mean=f["mean"], std=f["std"], geometry=f["geometry"],
        interpolation=f["interpolation"], resize_short=f["resize_short"],
        num_register_tokens=f["num_register_tokens"], has_cls_token=f["has_cls_token"], global_pool=f["global_pool"],
        arch={**config, **source},
        notes=f"generic wrapper of an open_clip image tower ({f['tower']}) from the {source['source']}; "
              f"preprocessing as open_clip's eval transform: resize_mode {pp.get('resize_mode')!r}, interpolation "
              f"{pp.get('interpolation')!r}",
        input_size_reason=f"vision_cfg.image_size of the open_clip config: {f['input_size']}",
        token_layout=f["token_layout"], cls_embedding=f["cls_embedding"],
    )


# -- weights ------------------------------------------------------------------------------------------
def _hub_id(weights: str) -> str | None:
    """The hub reference of ``weights`` (``org/repo`` or ``org/repo/filename``), or None for anything else."""
    if weights.startswith("hf-hub:"):
        return weights[len("hf-hub:"):]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", weights) and not weights.startswith("."):
        return weights
    return None


def resolve_checkpoint(weights: str) -> tuple[str, dict[str, Any] | None]:
    """``(checkpoint path, open_clip_config.json beside it or None)`` from a file, directory, hub id or URL.

    As open_clip finds them: a directory's checkpoint by ``factory._find_checkpoint_in_dir``
    (``open_clip_model.safetensors`` first), a hub repository's by
    ``pretrained.download_pretrained_from_hf`` (the safetensors copy first; Hugging Face cache
    and ``HF_HUB_OFFLINE`` honoured), a URL by ``download_pretrained_from_url`` (its cache).
    """
    from open_clip.factory import _find_checkpoint_in_dir
    from open_clip.pretrained import download_pretrained_from_hf, download_pretrained_from_url

    p = Path(weights).expanduser()
    if p.is_dir():
        ckpt = _find_checkpoint_in_dir(p)
        if ckpt is None:
            raise FileNotFoundError(f"{p} holds no checkpoint (*.safetensors, *.bin, *.pth)")
        cfg = p / CONFIG_FILE
        return ckpt, (json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None)
    if p.is_file():
        return str(p), None
    if weights.startswith(("http://", "https://")):
        return download_pretrained_from_url(weights), None
    hub = _hub_id(weights)
    if hub is None:
        raise FileNotFoundError(f"{weights!r} is neither a checkpoint file, a directory, 'hf-hub:<org>/<repo>' nor a URL")
    parts = hub.split("/")
    repo, filename = "/".join(parts[:2]), ("/".join(parts[2:]) or None)
    ckpt = download_pretrained_from_hf(repo, filename=filename)
    config = None
    try:
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(repo, CONFIG_FILE)).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - the config is optional beside a pretrained tag's weights
        pass
    return ckpt, config


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Memory-mapped where the format allows (tensors are read when moved or cast); unwrapped as open_clip does."""
    if str(path).endswith((".npz", ".npy")):
        raise ValueError(f"{path}: big_vision numpy weights are converted by open_clip.create_model only; load them "
                         "there and save an open_clip checkpoint")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch_load(path)
    # open_clip.factory.load_state_dict: training checkpoints wrap it in 'state_dict', DDP prefixes 'module.'
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _tower_diff(a: dict[str, Any], b: dict[str, Any], ignore: set[str]) -> list[str]:
    keys = (set(a) | set(b)) - ignore - {"timm_model_pretrained"}
    return sorted(k for k in keys if a.get(k) != b.get(k))


# -- the family ---------------------------------------------------------------------------------------
class OpenClipEncoder(Encoder):
    """An open_clip image tower: open_clip ``VisionTransformer`` or ``TimmModel`` with a timm ViT trunk."""

    family = "open_clip"
    crop_rounding = "round"  # open_clip's preprocess is torchvision's Resize + CenterCrop
    library_resampler = "pil"  # its reference pipeline resizes PIL images

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._set_input_size()

    def _set_input_size(self) -> None:
        """Run at ``input_size``: timm's ``set_input_size``, or open_clip's ``resize_pos_embed`` of the position table."""
        v = self.model
        if hasattr(v, "trunk"):
            timm_set_input_size(self, v.trunk)
            return
        g = self.input_size // self.patch_size
        if tuple(v.grid_size) == (g, g):
            return
        from open_clip.model import resize_pos_embed

        # as create_model(force_image_size=...) does at checkpoint load: bicubic, antialiased, in float32
        old = v.positional_embedding
        v.grid_size, v.image_size = (g, g), (self.input_size, self.input_size)
        state = {"visual.positional_embedding": old.detach().float()}
        resize_pos_embed(state, SimpleNamespace(visual=v))
        v.positional_embedding = torch.nn.Parameter(state["visual.positional_embedding"].to(old.dtype),
                                                    requires_grad=False)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def no_weights(cls, spec: EncoderSpec) -> Exception:
        import open_clip

        name = spec.arch.get("model_name", "")
        tags = open_clip.list_pretrained_tags_by_model(name) if name else []
        return WeightsUnavailableError(
            f"{spec.key} names an architecture without weights: pass weights=<checkpoint file or directory, "
            f"'hf-hub:<org>/<repo>' or a URL> (--weights), or name a pretrained tag in the id: "
            f"'{spec.key}@<tag>' (tags of {name}: {tags or 'none'}); for offline runs and tests use stand_in=True")

    @classmethod
    def weights_model_cfg(cls, spec: EncoderSpec, config: dict[str, Any] | None, desc: dict[str, Any],
                          weights: str) -> dict[str, Any]:
        """The ``model_cfg`` to build for these weights, checked against the id's (raises naming what differs)."""
        want = copy.deepcopy(dict(spec.arch["model_cfg"]))
        if config is None or "model_cfg" not in config:
            return want
        got = copy.deepcopy(config["model_cfg"])
        # a directory cxrcore saved at another input size says so; the stand-in's narrowing is its own
        ignore = ({"image_size"} if desc.get("input_size") else set()) | (set(VIT_STAND_IN) if desc.get("stand_in") else set())
        diff = _tower_diff(want["vision_cfg"], got["vision_cfg"], ignore)
        if diff or want.get("embed_dim") != got.get("embed_dim"):
            raise ValueError(
                f"{spec.key}: {weights}/{CONFIG_FILE} describes another image tower (vision_cfg fields "
                f"{diff or ['embed_dim']} differ: {[(k, got['vision_cfg'].get(k)) for k in diff]} there, "
                f"{[(k, want['vision_cfg'].get(k)) for k in diff]} in {spec.key}); load it as "
                f"'open_clip:local-dir:{weights}'")
        pp = preprocess_config(config.get("preprocess_cfg"))
        if "preprocess_cfg" in config and geometry_of(pp, spec.key) != geometry_of(spec.arch["preprocess_cfg"], spec.key):
            raise ValueError(f"{spec.key}: {weights}/{CONFIG_FILE} preprocesses otherwise ({pp}) than {spec.key} "
                             f"({spec.arch['preprocess_cfg']}); load it as 'open_clip:local-dir:{weights}' to run it "
                             "with its own preprocessing")
        return got

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if stand_in:
            model_cfg, trunk_kwargs = stand_in_config(dict(spec.arch))
            return seeded(lambda: build_visual(model_cfg, trunk_kwargs)).to(device=device, dtype=dtype)
        if not weights:
            raise cls.no_weights(spec)
        import open_clip

        name = spec.arch.get("model_name")
        if name and not Path(weights).expanduser().exists() and weights in open_clip.list_pretrained_tags_by_model(name):
            raise ValueError(f"{spec.key}: weights={weights!r} is an open_clip pretrained tag; name it in the id, "
                             f"'{spec.key.partition('@')[0]}@{weights}', which also takes the tag's preprocessing")
        desc = read_descriptor(weights) or {}
        try:
            ckpt, config = resolve_checkpoint(weights)
            state = _load_state_dict(ckpt)
        except (OSError, ValueError, RuntimeError) as e:
            raise explain_load_failure(spec, weights, e) from e
        except Exception as e:  # huggingface_hub errors that are not OSErrors
            if type(e).__module__.startswith("huggingface_hub"):
                raise explain_load_failure(spec, weights, e) from e
            raise
        model_cfg = cls.weights_model_cfg(spec, config, desc, weights)
        size = desc.get("input_size")
        timm_trunk = bool(model_cfg["vision_cfg"].get("timm_model_name"))
        if size and not timm_trunk:
            model_cfg["vision_cfg"]["image_size"] = size  # saved at another size: its position table has that shape
        # the skeleton on the meta device, then the checkpoint's own tensors (cast to dtype on the device,
        # one at a time) become its parameters: no float32 copy, no second copy at all
        with torch.device("meta"):
            visual = build_visual(model_cfg, desc.get("trunk_kwargs"))
            if size and timm_trunk and tuple(visual.trunk.patch_embed.img_size) != (size, size):
                visual.trunk.set_input_size(img_size=size)
        visual_state = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
        del state
        if not visual_state:
            raise ValueError(f"{spec.key}: no 'visual.*' weights in {weights}; is this an open_clip checkpoint?")
        dev = torch.device(device)
        computed = _materialise_computed_buffers(visual, dev)
        missing, unexpected = load_into_meta(visual, cast_state(visual_state, dev, dtype), what=f"{spec.key} ({weights})")
        if missing or unexpected:
            raise ValueError(f"{spec.key}: weights in {weights} do not fit the image tower: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if computed:  # RoPE frequencies and the like are in no checkpoint: computed as timm does after a load
            from timm.models._manipulate import reinit_non_persistent_buffers

            reinit_non_persistent_buffers(visual)
        return visual

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        with torch.device("meta"):
            # frozen, as it runs: torch's FLOP counter otherwise trips on timm's attention-pool latent under no_grad
            return build_visual(dict(spec.arch["model_cfg"])).requires_grad_(False)

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.model
        h, w = self._grid_hw(pixels)
        if hasattr(v, "trunk"):
            return timm_vit_tokens(v.trunk, pixels, (h, w), self.spec.key)
        # VisionTransformer.forward up to the projection: _embeds, transformer, _pool (pooled, tokens)
        pooled, tokens = v._pool(v.transformer(v._embeds(pixels)))
        b, n, d = tokens.shape
        if n != h * w:
            raise RuntimeError(f"{self.spec.key}: expected {h}x{w} patch tokens after the class token, got {n}")
        return pooled, tokens.reshape(b, h, w, d)

    def save(self, directory: str | os.PathLike) -> Path:
        """``open_clip_config.json`` (the tower as built) and the ``visual.*`` weights, as an open_clip repository holds them."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        model_cfg, trunk_kwargs = (stand_in_config(dict(self.spec.arch)) if self.stand_in
                                   else (copy.deepcopy(dict(self.spec.arch["model_cfg"])), None))
        model_cfg["vision_cfg"]["image_size"] = self.input_size  # the position table is saved at this size
        config = {"model_cfg": model_cfg, "preprocess_cfg": dict(self.spec.arch["preprocess_cfg"])}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list))
        state = {f"visual.{k}": t.detach().contiguous().cpu() for k, t in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        self._write_descriptor(path, trunk_kwargs=trunk_kwargs)
        return path


def _materialise_computed_buffers(model: torch.nn.Module, device: torch.device) -> bool:
    """Allocate the non-persistent buffers left on the meta device (no checkpoint holds them); True if there were any."""
    found = False
    for mod in model.modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(name)
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
                found = True
    return found
