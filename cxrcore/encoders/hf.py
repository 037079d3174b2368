"""Shared loading for transformers-based families, and the generic ``hf:<model id>`` wrapper.

Every transformers family builds its stand-in and its meta-device model from the
published ``config.json`` fields held in ``EncoderSpec.arch`` (the stand-in only
narrows width and depth), loads weights with ``from_pretrained`` (which honours the
Hugging Face cache and ``HF_HUB_OFFLINE``, reads safetensors, never runs remote code),
and saves with ``save_pretrained`` beside the transformers image processor that gives
the same pixels (its own ``save_pretrained``), so a saved stand-in reloads by the
hub-id path, and ``hf:<saved directory>`` and ``AutoImageProcessor`` read the same
preprocessing back.

Each family names the image processor class transformers publishes for its model type;
how that processor resamples an 8-bit image (as uint8, or rescaled to float first) is
read off the processor itself (:func:`processor_resampler`), not assumed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import CXRCORE_ENCODER_FILE, Encoder, EncoderSpec, explain_load_failure, read_descriptor, seeded

#: Narrow, shallow replacement fields of every transformers stand-in (patch size, input
#: size, register tokens, head and token layout are kept from the published config).
HF_STAND_IN = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}


def _resolve_hf_dir(weights: str) -> str:
    """A checkpoint file inside a saved model directory means that directory."""
    p = Path(weights).expanduser()
    if p.is_file() and (p.parent / "config.json").is_file():
        return str(p.parent)
    if p.is_file():
        raise ValueError(
            f"{weights}: a transformers model loads from a directory holding config.json and the weights "
            "(model.safetensors); pass that directory"
        )
    return str(p) if p.exists() else weights


class HFEncoder(Encoder):
    """A family whose model is one transformers class, preprocessed as one transformers image processor."""

    model_class: ClassVar[str] = ""
    config_class: ClassVar[str] = ""
    #: the image processor class transformers publishes for the model type (``spec.processor_class`` overrides)
    processor_class: ClassVar[str] = ""

    @classmethod
    def eight_bit_resampler(cls, spec: EncoderSpec, geometry: str) -> str:
        """As the image processor resamples 8-bit images (:func:`processor_resampler`), unless the geometry option says."""
        return spec.option_resamplers.get(geometry) or processor_resampler(spec.processor_class or cls.processor_class)

    def image_processor(self) -> Any | None:
        """The transformers image processor that gives this encoder's pixels, or None where none does.

        Its class is the family's (or the spec's) processor class; size, crop, resampling
        filter, mean and std are this encoder's. ``pad_square`` has no processor
        equivalent, nor does an 8-bit convention other than the class's own, nor a filter
        without a PIL code: None.
        """
        from torchvision.transforms import InterpolationMode
        from transformers.image_utils import torch_pil_interpolation_mapping
        from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

        name = self.spec.processor_class or self.processor_class
        resample = torch_pil_interpolation_mapping.get(InterpolationMode(self.spec.interpolation))
        if self.geometry == "pad_square" or self.resampler != processor_resampler(name) or resample is None:
            return None
        s, short = self.input_size, self.resize_short
        geometry = {
            "center_crop": dict(size={"shortest_edge": short}, do_center_crop=True, crop_size={"height": s, "width": s}),
            "resize": dict(size={"height": s, "width": s}, do_center_crop=False),
            "resize_crop": dict(size={"height": short, "width": short}, do_center_crop=True,
                                crop_size={"height": s, "width": s}),
        }[self.geometry]
        return get_image_processor_class_from_name(name)(
            do_resize=True, resample=int(resample), do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=list(self.spec.mean), image_std=list(self.spec.std), do_convert_rgb=True, **geometry)

    @classmethod
    def _classes(cls) -> tuple[type, type]:
        import transformers

        return getattr(transformers, cls.config_class), getattr(transformers, cls.model_class)

    @classmethod
    def config_for(cls, spec: EncoderSpec, stand_in: bool) -> Any:
        cfg_cls, _ = cls._classes()
        fields = dict(spec.arch)
        if stand_in:
            fields.update(HF_STAND_IN)
            if "mlp_ratio" in fields:  # Dinov2Config sizes the MLP by ratio, not intermediate_size
                fields["mlp_ratio"] = 2
        return cfg_cls(**fields)

    @classmethod
    def build(cls, spec: EncoderSpec, weights: str | None, stand_in: bool, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        _, model_cls = cls._classes()
        if stand_in:
            cfg = cls.config_for(spec, stand_in=True)
            return seeded(lambda: model_cls(cfg)).to(device=device, dtype=dtype)
        assert weights is not None
        src = _resolve_hf_dir(weights)
        try:
            # dtype explicitly: transformers >= 5 otherwise loads the dtype the checkpoint was saved in.
            # device_map: the weights are materialised on the device, shard by shard (needs accelerate),
            # so ViT-7B in bf16 never exists as an fp32 copy, nor in host RAM as a whole.
            model = model_cls.from_pretrained(src, trust_remote_code=False, dtype=dtype,
                                              device_map=str(torch.device(device)))
        except (OSError, ValueError) as e:  # hub, gated, offline-cache and missing-file errors all land here
            raise explain_load_failure(spec, weights, e) from e
        cls.check_config(spec, model.config, weights)
        return model

    @classmethod
    def check_config(cls, spec: EncoderSpec, config: Any, weights: str) -> None:
        """The loaded config must have the token layout the spec promises."""
        for name in ("patch_size", "num_register_tokens"):
            want = getattr(spec, name)
            got = getattr(config, name, 0 if name == "num_register_tokens" else None)
            if isinstance(got, (list, tuple)):
                got = got[0]
            if got != want:
                raise ValueError(
                    f"{spec.key}: {weights} has {name}={got} in its config, but {spec.key} is published with "
                    f"{name}={want}; these are not this model's weights (use the matching registry key, or "
                    "'hf:<id>' to wrap an arbitrary model)"
                )

    @classmethod
    def build_meta(cls, spec: EncoderSpec) -> torch.nn.Module:
        _, model_cls = cls._classes()
        cfg = cls.config_for(spec, stand_in=False)
        with torch.device("meta"):
            return model_cls(cfg)

    def save(self, directory: str | os.PathLike) -> Path:
        """Weights (``save_pretrained``), the equivalent ``preprocessor_config.json`` (the processor's own
        ``save_pretrained``; none for ``pad_square``, which no processor does) and the cxrcore descriptor."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        proc = self.image_processor()
        if proc is not None:
            proc.save_pretrained(path)
        self._write_descriptor(path)
        return path

    def _prefix_split(self, tokens: torch.Tensor, pixels: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """Patch grid ``[B, h, w, D]`` from tokens laid out as ``[prefix..., patches row-major]``."""
        b, n, d = tokens.shape
        h, w = self._grid_hw(pixels)
        if n - n_prefix != h * w:
            raise RuntimeError(
                f"{self.spec.key}: expected {n_prefix} leading tokens + {h}x{w} patch tokens, got {n} tokens in all"
            )
        return tokens[:, n_prefix:].reshape(b, h, w, d)


# -- generic wrapper: hf:<model id> --------------------------------------------------------------

#: model_type -> (family, whether the tokens start with CLS). Only types whose token layout we know.
HF_MODEL_TYPES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
    "dinov3_vit": "dinov3",
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "vit": "vit",
}


#: model_type -> (geometry, interpolation) of the image processor class transformers
#: publishes for it (its class attributes, transformers 5), used when the model's own
#: preprocessor_config.json is not at hand offline: DINOv2's BitImageProcessor resizes the
#: shortest edge and centre-crops (bicubic); SiglipImageProcessor stretches to the size
#: (bicubic); DINOv3ViTImageProcessor and ViTImageProcessor stretch (bilinear).
HF_PROCESSOR_DEFAULTS = {
    "dinov2": ("center_crop", "bicubic"),
    "dinov2_with_registers": ("center_crop", "bicubic"),
    "dinov3_vit": ("resize", "bilinear"),
    "siglip_vision_model": ("resize", "bicubic"),
    "siglip": ("resize", "bicubic"),
    "vit": ("resize", "bilinear"),
}
#: torchvision interpolation modes (transformers' pil_torch_interpolation_mapping values) this package resamples with
_INTERPOLATIONS = ("nearest-exact", "bilinear", "bicubic")


@functools.lru_cache(maxsize=None)
def processor_resampler(class_name: str) -> str:
    """How transformers' image processor ``class_name`` resamples an 8-bit image (:data:`cxrcore.geometry.RESAMPLERS`).

    Read off the processor by running it: an 8-bit probe (noise with saturated blocks,
    where uint8 resampling clips the bicubic overshoot and float resampling does not, and
    torchvision's uint8 kernel and Pillow's round differently) is resized by the processor
    (bicubic, no crop, no normalisation) and by each candidate convention; the one whose
    pixels equal the processor's is its convention. So ``BitImageProcessor`` /
    ``SiglipImageProcessor`` (resize, then rescale) give ``"torchvision"``,
    ``DINOv3ViTImageProcessor`` (rescale, then resize) ``"float"``, the ``*Pil`` backends ``"pil"``.
    """
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    from ..geometry import RESAMPLERS, make_geometry

    proc_cls = get_image_processor_class_from_name(class_name)
    if proc_cls is None:
        raise ValueError(f"transformers has no image processor class {class_name!r}")
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (29, 41)).astype(np.uint8)
    probe[5:12, 7:20], probe[15:20, 25:33] = 255, 0
    side = 13  # a stretch of a non-square image: both axes resampled, by different factors
    proc = proc_cls(do_resize=True, size={"height": side, "width": side}, do_center_crop=False,
                    do_rescale=True, rescale_factor=1 / 255, do_normalize=False, do_pad=False, resample=3,
                    do_convert_rgb=True)
    ref = proc(images=np.repeat(probe[..., None], 3, axis=-1), return_tensors="pt")["pixel_values"][0, 0].numpy()
    errors = {}
    for r in RESAMPLERS:
        g = make_geometry(probe.shape, side, 1, "resize", resampler=r)
        errors[r] = float(np.abs(g.pixels(probe, "bicubic").numpy()[0] - ref).max())
        if errors[r] < 1e-4:  # float rounding of the rescale; the conventions differ by >= 1 grey level here
            return r
    raise ValueError(f"{class_name}: no resampling convention of cxrcore reproduces its 8-bit pixels "
                     f"(max differences {errors}, in [0, 1] units)")


def processor_geometry(proc: Any, key: str = "") -> dict[str, Any]:
    """What a transformers image processor does, as spec fields.

    ``geometry``, ``interpolation``, ``input_size`` (the crop, or the resized square),
    ``resize_short`` (``size.shortest_edge`` before a crop; the resized square side of
    ``resize_crop``), ``mean``, ``std`` and ``processor_class``. Raises, naming the field,
    for what the package cannot reproduce (non-square outputs, padding, another rescale).
    """
    from transformers.image_utils import pil_torch_interpolation_mapping

    name = type(proc).__name__

    def refuse(what: str) -> ValueError:
        return ValueError(f"{key or name}: its image processor ({name}) {what}; cxrcore makes square inputs from "
                          "images scaled by 1/255 (8-bit) or their dtype's maximum: wrap another model, or use a "
                          "registered key")

    if not getattr(proc, "do_resize", True):
        raise refuse("does not resize (do_resize=False), so the input size varies per image")
    if getattr(proc, "do_pad", False):
        raise refuse("pads (do_pad=True)")
    if not getattr(proc, "do_rescale", True) or abs(float(getattr(proc, "rescale_factor", 1 / 255)) * 255 - 1) > 1e-6:
        raise refuse(f"rescales by {getattr(proc, 'rescale_factor', None)} (do_rescale={getattr(proc, 'do_rescale', None)}), "
                     "not 1/255")
    size = dict(proc.size or {})
    crop = dict(getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
    if crop and crop.get("height") != crop.get("width"):
        raise refuse(f"crops to a non-square {crop}")
    if size.get("shortest_edge") and not size.get("longest_edge"):
        if not crop:
            raise refuse(f"resizes the shortest edge ({size}) without a square crop: a non-square input")
        if size["shortest_edge"] < crop["height"]:
            raise refuse(f"crops {crop} out of a shortest edge of {size['shortest_edge']} (it pads)")
        geometry, input_size, resize_short = "center_crop", int(crop["height"]), int(size["shortest_edge"])
    elif size.get("height") and size.get("width") and set(size) <= {"height", "width"}:
        if size["height"] != size["width"]:
            raise refuse(f"resizes to a non-square {size}")
        side = int(size["height"])
        if crop and crop["height"] > side:
            raise refuse(f"crops {crop} out of {size} (it pads)")
        if crop and crop["height"] < side:
            geometry, input_size, resize_short = "resize_crop", int(crop["height"]), side
        else:
            geometry, input_size, resize_short = "resize", side, None
    else:
        raise refuse(f"resizes with size={size}")
    mode = pil_torch_interpolation_mapping.get(proc.resample, proc.resample)
    interpolation = getattr(mode, "value", mode)
    if interpolation not in _INTERPOLATIONS:
        raise refuse(f"resamples with {proc.resample!r} ({interpolation}); supported: {list(_INTERPOLATIONS)}")
    normalise = getattr(proc, "do_normalize", True)

    def per_channel(v: Any) -> tuple[float, float, float]:  # a scalar or one value means every channel
        return tuple(float(x) for x in np.broadcast_to(np.asarray(v, np.float64).ravel(), (3,)))

    mean = per_channel(proc.image_mean if normalise else 0.0)
    std = per_channel(proc.image_std if normalise else 1.0)
    return dict(geometry=geometry, interpolation=interpolation, input_size=input_size, resize_short=resize_short,
                mean=mean, std=std, processor_class=name)


def _image_processor(model_id: str) -> Any | None:
    """The model's own image processor (``AutoImageProcessor``, as its users get it), or None where it has none."""
    from transformers import AutoImageProcessor

    src = _resolve_hf_dir(model_id)
    if Path(src).is_dir():
        if not any((Path(src) / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            return None
        return AutoImageProcessor.from_pretrained(src, trust_remote_code=False)  # errors in the file: raised
    try:
        return AutoImageProcessor.from_pretrained(src, trust_remote_code=False)
    except OSError:  # not on the hub, or not cached and offline: the family default applies
        return None


def hf_spec(key: str) -> EncoderSpec:
    """Spec of ``hf:<model id>``, read from its config and its image processor (from the Hugging Face cache or the hub).

    The preprocessing is exactly the model's own processor's (``AutoImageProcessor``):
    input size from its crop or its square size, the shortest edge before the crop,
    filter, mean and std (:func:`processor_geometry`). Without one at hand (offline, not
    cached, or none published): the geometry and filter of the processor class
    transformers publishes for the model type, at the config's ``image_size``
    (:data:`HF_PROCESSOR_DEFAULTS`). A directory written by :meth:`Encoder.save` without
    a processor file is refused rather than guessed.
    """
    from transformers import AutoConfig

    model_id = key[3:]
    spec0 = EncoderSpec(key=key, family="hf", weights=model_id, input_size=0, patch_size=0, embed_dim=0,
                        mean=(0.0,) * 3, std=(1.0,) * 3)
    try:
        cfg = AutoConfig.from_pretrained(_resolve_hf_dir(model_id), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise explain_load_failure(spec0, model_id, e) from e
    mtype = cfg.model_type
    if mtype not in HF_MODEL_TYPES:
        raise ValueError(
            f"{key}: model_type {mtype!r} has no known token layout; supported: {', '.join(HF_MODEL_TYPES)} "
            "(or wrap a timm ViT with 'timm:<name>')"
        )
    if mtype == "siglip":
        cfg = cfg.vision_config
    family = HF_MODEL_TYPES[mtype]
    arch = {k: v for k, v in cfg.to_dict().items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    patch = cfg.patch_size[0] if isinstance(cfg.patch_size, (list, tuple)) else int(cfg.patch_size)
    siglip = family == "siglip"
    proc = _image_processor(model_id)
    if proc is not None:
        pre = processor_geometry(proc, key)
    else:
        desc = read_descriptor(_resolve_hf_dir(model_id))
        if desc is not None:
            raise ValueError(
                f"{key}: this directory was written by cxrcore's Encoder.save ({desc.get('key')!r}, geometry "
                f"{desc.get('geometry')!r}) without a preprocessor_config.json (an older cxrcore, or a geometry no "
                f"transformers processor does), so 'hf:' cannot know its preprocessing. Load it with "
                f"load_encoder({desc.get('key')!r}, weights={model_id!r}) (its {CXRCORE_ENCODER_FILE} is read), or "
                "save it again with this version of cxrcore"
            )
        # ViTImageProcessor's defaults are 0.5 too; DINOv2/v3 checkpoints publish the ImageNet statistics
        half = siglip or mtype == "vit"
        geometry, interpolation = HF_PROCESSOR_DEFAULTS[mtype]
        pre = dict(geometry=geometry, interpolation=interpolation,
                   input_size=int(cfg.image_size[0] if isinstance(cfg.image_size, (list, tuple)) else cfg.image_size),
                   resize_short=None, mean=(0.5,) * 3 if half else (0.485, 0.456, 0.406),
                   std=(0.5,) * 3 if half else (0.229, 0.224, 0.225), processor_class="")
    return EncoderSpec(
        key=key, family=family, weights=model_id, patch_size=patch, embed_dim=int(cfg.hidden_size),
        num_register_tokens=int(getattr(cfg, "num_register_tokens", 0) or 0), has_cls_token=not siglip,
        global_pool="pooler" if siglip else "cls", arch=arch, **pre,
        notes=f"generic wrapper of transformers model_type {mtype!r}; preprocessing "
              + (f"of its {pre['processor_class']}" if proc is not None else "of its model type's processor class "
                 "(no processor configuration at hand)"),
    )
