"""BiomedCLIP's image tower through open_clip (a timm ViT-B/16 trunk): the open_clip family at its published config.

open_clip's ``create_model('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224')``
also builds the PubMedBERT text tower, which needs a second model's config from the
hub; only the image tower is frozen here, so it is built from the published
``open_clip_config.json`` (embedded below) as ``open_clip.timm_model.TimmModel`` and
only the ``visual.*`` weights of ``open_clip_model.safetensors`` /
``open_clip_pytorch_model.bin`` are loaded, by :class:`~cxrcore.encoders.openclip.OpenClipEncoder`
(the same code as ``open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).

Tokens: ``visual.trunk.forward_features`` = ``[CLS, patches]`` after the trunk's final
LayerNorm. The global embedding is the 768-d CLS token before the 768 -> 512
projection into the joint image-text space (``trunk.forward_head(pre_logits=True)``,
which for this trunk's token pooling is that CLS token).

Published: Zhang et al. 2025, "A multimodal biomedical foundation model trained from
fifteen million image-text pairs", NEJM AI 2(1), doi:10.1056/AIoa2400640.
"""

from __future__ import annotations

from typing import Any

from .base import EncoderSpec
from .openclip import OpenClipEncoder

#: ``open_clip_config.json`` of hf.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224,
#: as quoted in open_clip's ``factory.create_model`` docstring (open_clip_torch 3.x).
BIOMEDCLIP_OPEN_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


class BiomedClipEncoder(OpenClipEncoder):
    """BiomedCLIP: the open_clip family under its own family name (the stores' provenance says ``open_clip_timm``)."""

    family = "open_clip_timm"

    @classmethod
    def weights_model_cfg(cls, spec: EncoderSpec, config: dict[str, Any] | None, desc: dict[str, Any],
                          weights: str) -> dict[str, Any]:
        """The published tower only: another config's weights are another model (use ``open_clip:local-dir:``)."""
        v = ((config or {}).get("model_cfg") or {}).get("vision_cfg") or spec.arch["model_cfg"]["vision_cfg"]
        want = spec.arch["model_cfg"]["vision_cfg"]
        if v.get("timm_model_name") != want["timm_model_name"] or (
                not desc.get("input_size") and v.get("image_size") != want["image_size"]):
            raise ValueError(
                f"{spec.key}: {weights}/open_clip_config.json describes {v.get('timm_model_name')} at "
                f"{v.get('image_size')}, not the published {want['timm_model_name']} at {want['image_size']}; load it "
                f"as 'open_clip:local-dir:{weights}'"
            )
        return super().weights_model_cfg(spec, config, desc, weights)
