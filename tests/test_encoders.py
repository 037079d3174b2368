"""Every registered encoder: stand-in forward, token layout, save/load, published specs, loading errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cxrcore import encoder_spec, list_encoders, load_encoder
from cxrcore.encoders import REGISTRY, WeightsUnavailableError, vit_flops
from cxrcore.encoders.base import to_unit_float

PAPER_KEYS = ["rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"]

# Published parameter counts of the image towers, and the grids of the table.
PUBLISHED = {
    "rad-dino": (86.6e6, (37, 37)),
    "dinov2-b14": (86.6e6, (37, 37)),
    "dinov3-vit7b16": (6.716e9, (14, 14)),
    "biomedclip": (86.2e6, (14, 14)),
    "medsiglip-448": (429e6, (32, 32)),
    "dino-resnet50": (23.5e6, (7, 7)),
}


@pytest.fixture(scope="module")
def stand_ins():
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = load_encoder(key, stand_in=True)
        return cache[key]

    return get


def _images(size):
    rng = np.random.default_rng(0)
    square = (rng.random((size, size)) * 65535).astype(np.uint16)  # exactly the model input: no pad, no crop
    other = (rng.random((size + 37, size - 21)) * 255).astype(np.uint8)
    return [square, other]


def test_registry_holds_the_six_paper_encoders():
    assert list_encoders() == PAPER_KEYS


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(KeyError, match="rad-dino.*dino-resnet50"):
        load_encoder("dinov9")


@pytest.mark.parametrize("key", PAPER_KEYS)
def test_stand_in_forward_shapes_and_poolings(key, stand_ins):
    enc = stand_ins(key)
    spec = encoder_spec(key)
    assert enc.stand_in and enc.input_size == spec.input_size and enc.grid_shape == spec.grid
    s = spec.input_size
    images = _images(s)
    boxes = [[(0, 0, s, s), (3, 5, 9, 11)], [(10, 20, 60, 90)]]
    out = enc.encode(images, boxes, return_grid=True)
    d = out.cls.shape[1]
    assert out.cls.shape == (2, d) and out.patch_mean.shape == (2, d)
    assert out.roi_local.shape == (3, d) and out.roi_image.tolist() == [0, 0, 1]
    assert out.grid.shape == (2, *spec.grid, d)
    assert all(np.isfinite(a).all() for a in (out.cls, out.patch_mean, out.roi_local, out.grid))
    # a square input at the model size is neither padded nor cropped: the full-image box is every patch
    np.testing.assert_allclose(out.roi_local[0], out.patch_mean[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.grid.mean(axis=(1, 2)), out.patch_mean, rtol=1e-5, atol=1e-6)
    # a box inside one cell is that cell's token
    r0, r1, c0, c1 = out.geometry[0].cells(boxes[0][1])
    assert (r1 - r0, c1 - c0) == (1, 1)
    np.testing.assert_allclose(out.roi_local[1], out.grid[0, r0, c0], rtol=1e-5, atol=1e-6)
    if key == "dino-resnet50":  # global average pool is the mean of the layer4 cells
        np.testing.assert_allclose(out.cls, out.patch_mean, rtol=1e-5, atol=1e-6)
    else:
        assert not np.allclose(out.cls, out.patch_mean)


@pytest.mark.parametrize("key", PAPER_KEYS)
def test_stand_in_is_the_published_class_and_layout(key, stand_ins):
    enc = stand_ins(key)
    full = type(enc).build_meta(REGISTRY[key])
    assert type(enc.model) is type(full)  # same class as the published model, only narrower and shallower
    assert sum(p.numel() for p in enc.model.parameters()) < 5e6


def test_dinov3_registers_are_neither_cls_nor_patches(stand_ins):
    enc = stand_ins("dinov3-vit7b16")
    assert enc.model.config.num_register_tokens == 4 == enc.spec.num_register_tokens
    assert enc.model.embeddings.register_tokens.shape[1] == 4
    # By construction: feed forward_tokens a sequence whose every token carries its position index.
    h, w = enc.grid_shape
    n = 1 + 4 + h * w
    seq = torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(1, n, 8)
    real = enc.model
    enc.model = lambda pixel_values: SimpleNamespace(last_hidden_state=seq)  # noqa: E731
    try:
        glob, grid = enc.forward_tokens(torch.zeros(1, 3, enc.input_size, enc.input_size))
    finally:
        enc.model = real
    assert glob[0, 0] == 0  # CLS
    assert grid.min() == 5 and grid.max() == n - 1  # registers 1..4 are not in the grid
    assert grid[0, 0, 1, 0] == 6 and grid[0, 1, 0, 0] == 5 + w  # row-major
    # and the real stand-in's sequence is exactly CLS + 4 registers + the grid
    x = torch.zeros(1, 3, enc.input_size, enc.input_size)
    with torch.inference_mode():
        assert enc.model(pixel_values=x).last_hidden_state.shape[1] == n


def test_medsiglip_has_no_cls_and_uses_the_attention_pool_head(stand_ins):
    enc = stand_ins("medsiglip-448")
    assert not enc.spec.has_cls_token and enc.spec.global_pool == "pooler"
    x = torch.randn(1, 3, 448, 448)
    with torch.inference_mode():
        out = enc.model(pixel_values=x)
        glob, grid = enc.forward_tokens(x)
    assert out.last_hidden_state.shape[1] == 32 * 32  # every token is a patch
    torch.testing.assert_close(glob, out.pooler_output)
    torch.testing.assert_close(grid.reshape(1, -1, grid.shape[-1]), out.last_hidden_state)


def test_stand_ins_are_deterministic():
    a = load_encoder("rad-dino", stand_in=True).encode(_images(518)[:1])
    b = load_encoder("rad-dino", stand_in=True).encode(_images(518)[:1])
    np.testing.assert_array_equal(a.cls, b.cls)


@pytest.mark.parametrize("key", PAPER_KEYS)
def test_save_then_load_through_the_hub_id_path_offline(key, stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = stand_ins(key)
    enc.save(tmp_path / key)
    back = load_encoder(key, weights=str(tmp_path / key))
    assert back.stand_in and back.weights == str(tmp_path / key)
    img = _images(enc.input_size)[1:]
    a, b = enc.encode(img, [[(5, 5, 50, 50)]]), back.encode(img, [[(5, 5, 50, 50)]])
    np.testing.assert_allclose(a.cls, b.cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.roi_local, b.roi_local, rtol=1e-5, atol=1e-6)


def test_saved_encoder_refuses_another_key(stand_ins, tmp_path):
    stand_ins("rad-dino").save(tmp_path)
    with pytest.raises(ValueError, match="holds encoder 'rad-dino'"):
        load_encoder("dinov2-b14", weights=str(tmp_path))


@pytest.mark.parametrize("key", PAPER_KEYS)
def test_published_parameter_counts_and_grids_on_the_meta_device(key):
    spec = encoder_spec(key)
    n_published, grid = PUBLISHED[key]
    assert abs(spec.num_params - n_published) / n_published < 0.01, spec.num_params
    assert spec.grid == grid
    assert spec.gflops > 0


def test_gflops_match_the_closed_form():
    spec = encoder_spec("dinov2-b14")
    closed = vit_flops(input_size=518, patch_size=14, hidden=768, layers=12, mlp_hidden=3072) / 1e9
    assert abs(spec.gflops - closed) / closed < 0.01
    spec = encoder_spec("dinov3-vit7b16")
    closed = vit_flops(input_size=224, patch_size=16, hidden=4096, layers=40, mlp_hidden=8192, gated_mlp=True,
                       prefix_tokens=5) / 1e9
    assert abs(spec.gflops - closed) / closed < 0.01


def test_published_token_layouts():
    assert encoder_spec("dinov3-vit7b16").num_register_tokens == 4 and encoder_spec("dinov3-vit7b16").embed_dim == 4096
    assert encoder_spec("medsiglip-448").patch_size == 14 and not encoder_spec("medsiglip-448").has_cls_token
    assert encoder_spec("dino-resnet50").patch_size == 32 and encoder_spec("dino-resnet50").global_pool == "gap"
    assert encoder_spec("rad-dino").mean == (0.5307,) * 3 and encoder_spec("rad-dino").std == (0.2583,) * 3


@pytest.mark.parametrize("key", ["medsiglip-448", "dinov3-vit7b16"])
def test_gated_model_offline_says_what_to_do(key, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as err:
        load_encoder(key)
    msg = str(err.value)
    assert "accept its licence" in msg and "hf auth login" in msg and "weights=" in msg and "HF_HUB_OFFLINE" in msg


@pytest.mark.parametrize("key", ["dino-resnet50", "biomedclip", "rad-dino"])
def test_missing_local_weights_say_what_to_do(key, tmp_path):
    with pytest.raises((WeightsUnavailableError, ValueError), match="weights="):
        load_encoder(key, weights=str(tmp_path / "nowhere"))


def test_resnet_checkpoint_must_cover_every_key_but_fc(tmp_path):
    from cxrcore.encoders.resnet import build_resnet

    good = build_resnet({"layers": [3, 4, 6, 3]}).state_dict()
    good["fc.weight"], good["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # a classifier is dropped
    torch.save(good, tmp_path / "ok.pth")
    enc = load_encoder("dino-resnet50", weights=str(tmp_path / "ok.pth"))
    assert not enc.stand_in and isinstance(enc.model.fc, torch.nn.Identity)
    del good["layer4.2.conv3.weight"]
    torch.save(good, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys.*layer4.2.conv3.weight"):
        load_encoder("dino-resnet50", weights=str(tmp_path / "bad.pth"))


def test_sixteen_bit_images_keep_their_bits_and_become_three_equal_channels(stand_ins):
    a = np.array([[0, 257, 65535, 300]], dtype=np.uint16)
    np.testing.assert_allclose(to_unit_float(a), [[0, 257 / 65535, 1.0, 300 / 65535]], rtol=1e-6)
    enc = stand_ins("dinov3-vit7b16")
    img = (np.arange(224 * 224).reshape(224, 224) % 65536).astype(np.uint16)
    x, _ = enc.preprocess([img])
    assert x.shape == (1, 3, 224, 224)
    raw = x * enc._std + enc._mean
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 1], raw[:, 2])
    assert len(torch.unique(raw[0, 0])) > 256  # more than 8 bits of grey survived


def test_input_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        load_encoder("rad-dino", stand_in=True, input_size=520)
    enc = load_encoder("dinov3-vit7b16", stand_in=True, input_size=512)
    assert enc.encode(_images(512)[:1]).cls.shape[0] == 1 and enc.grid_shape == (32, 32)


def test_timm_wrapper_drops_prefix_tokens():
    spec = encoder_spec("timm:vit_base_patch14_reg4_dinov2")
    assert spec.num_register_tokens == 4 and spec.patch_size == 14 and spec.grid == (37, 37)
    assert abs(spec.num_params - 86.6e6) / 86.6e6 < 0.01
    enc = load_encoder("timm:vit_base_patch14_reg4_dinov2", stand_in=True)
    out = enc.encode(_images(518), [[(0, 0, 518, 518)], []], return_grid=True)
    assert out.grid.shape[1:3] == (37, 37)
    np.testing.assert_allclose(out.roi_local[0], out.patch_mean[0], rtol=1e-5, atol=1e-6)


def test_timm_wrapper_counts_a_vit_with_an_attention_pool_head():
    """SigLIP ViTs pool with a learned latent query (timm global_pool='map'); counting them used to fail on the meta device."""
    spec = encoder_spec("timm:vit_base_patch16_siglip_224")
    assert spec.num_register_tokens == 0 and not spec.has_cls_token and spec.global_pool == "map"
    closed = vit_flops(input_size=224, patch_size=16, hidden=768, layers=12, mlp_hidden=3072, prefix_tokens=0) / 1e9
    assert closed < spec.gflops < 1.02 * closed  # the blocks, plus the small attention-pool head


def test_hf_wrapper_reads_a_local_model_directory(stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stand_ins("dinov3-vit7b16").model.save_pretrained(tmp_path)
    key = f"hf:{tmp_path}"
    spec = encoder_spec(key)
    assert spec.family == "dinov3" and spec.num_register_tokens == 4 and spec.patch_size == 16
    enc = load_encoder(key)
    assert enc.encode(_images(224)[:1], return_grid=True).grid.shape[1:3] == (14, 14)


@pytest.mark.parametrize("key", PAPER_KEYS)
def test_bfloat16_means_bfloat16_weights_and_float32_poolings(key):
    with pytest.raises(ValueError, match="bfloat16"):
        load_encoder(key, stand_in=True, dtype=torch.float64)
    enc = load_encoder(key, stand_in=True, dtype="bfloat16")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    s = enc.input_size
    out = enc.encode(_images(s), [[(0, 0, s, s)], [(10, 20, 60, 90)]], return_grid=True)
    assert out.cls.dtype == out.patch_mean.dtype == out.roi_local.dtype == np.float32
    assert all(np.isfinite(a).all() for a in (out.cls, out.patch_mean, out.roi_local))
    prov = enc.provenance()
    assert prov["dtype"] == "torch.bfloat16" and prov["weights_dtype"] == "bfloat16"
    assert "normalisation" in prov["fp32_parts"] and prov["fp32_modules"] == []
    # bf16 weights give close to, not exactly, the float32 embedding
    ref = load_encoder(key, stand_in=True).encode(_images(s)[:1])
    rel = np.linalg.norm(out.cls[0] - ref.cls[0]) / np.linalg.norm(ref.cls[0])
    assert 0 < rel < 0.1, rel


def test_timm_wrapper_honours_pretrained_cfg_crop_pct():
    import math

    import timm

    name = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    with torch.device("meta"):
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    assert cfg["crop_pct"] == 0.9
    spec = encoder_spec(f"timm:{name}")
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"]) and spec.interpolation == cfg["interpolation"]
    enc = load_encoder(f"timm:{name}", stand_in=True)
    g = enc.geometry_for((1024, 1280))
    scale = math.floor(224 / 0.9)  # timm's eval transform: Resize(248) then CenterCrop(224)
    assert g.resized_hw == (scale, int(scale * 1280 / 1024)) and g.input_hw == (224, 224)
    assert g.crop == ((scale - 224) // 2, (int(scale * 1280 / 1024) - 224) // 2)


def test_hf_wrapper_follows_the_models_processor(stand_ins, tmp_path, monkeypatch):
    from transformers import BitImageProcessor, DINOv3ViTImageProcessor

    from cxrcore.encoders.hf import processor_geometry

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # no preprocessor_config.json: DINOv3's own processor class stretches to the size, bilinear
    stand_ins("dinov3-vit7b16").model.save_pretrained(tmp_path / "v3")
    spec = encoder_spec(f"hf:{tmp_path / 'v3'}")
    assert (spec.geometry, spec.interpolation) == ("resize", "bilinear")
    # with the published processor saved beside the model, its config is read
    DINOv3ViTImageProcessor().save_pretrained(tmp_path / "v3b")
    stand_ins("dinov3-vit7b16").model.save_pretrained(tmp_path / "v3b")
    spec = encoder_spec(f"hf:{tmp_path / 'v3b'}")
    assert (spec.geometry, spec.interpolation) == ("resize", "bilinear")
    stand_ins("rad-dino").model.save_pretrained(tmp_path / "v2")
    BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518}, do_center_crop=True,
                      resample=3, image_mean=[0.5307] * 3, image_std=[0.2583] * 3).save_pretrained(tmp_path / "v2")
    spec = encoder_spec(f"hf:{tmp_path / 'v2'}")
    assert (spec.geometry, spec.interpolation, spec.mean) == ("center_crop", "bicubic", (0.5307,) * 3)
    from transformers import SiglipImageProcessor

    pre = processor_geometry(SiglipImageProcessor(size={"height": 448, "width": 448}, resample=3))
    assert (pre["geometry"], pre["interpolation"], pre["input_size"]) == ("resize", "bicubic", 448)
    with pytest.raises(ValueError, match="without a square crop"):
        processor_geometry(BitImageProcessor(size={"shortest_edge": 256}, do_center_crop=False), "hf:x")


@pytest.mark.parametrize("kw, match", [({"input_size": 500}, "not a multiple of the patch size 14"),
                                       ({"input_size": 0}, "positive integer"),
                                       ({"geometry": "pad_square"}, "not offered"),
                                       ({"resize_short": 500}, "must be an integer >= input_size 518"),
                                       ({"input_size": 224, "resize_short": 200}, ">= input_size 224")])
@pytest.mark.parametrize("source", ["stand_in", "saved"])
def test_bad_options_raise_before_any_weights_are_read(kw, match, source, stand_ins, tmp_path, monkeypatch):
    from cxrcore.encoders import Dinov2Encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stand_ins("rad-dino").save(tmp_path)

    def build(cls, *a, **k):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(Dinov2Encoder, "build", classmethod(build))
    load = dict(stand_in=True) if source == "stand_in" else dict(weights=str(tmp_path))
    with pytest.raises(ValueError, match=match):
        load_encoder("rad-dino", **load, **kw)
