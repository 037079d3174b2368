"""Each encoder family against its own reference library (issue 12, items 1-6).

Pixels are compared with the library's own preprocessing (transformers' SiglipImageProcessor /
BitImageProcessor, open_clip's preprocess, torchvision's transforms, timm's eval transform) on
square and non-square, 8- and 16-bit images and on odd and even crop margins; box cells with
the receptive field of the real torchvision ResNet; dtypes with checkpoints saved in one dtype
and loaded in another. Random-weight real architectures, saved and reloaded; nothing downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcore import load_encoder
from cxrcore.encoders import REGISTRY, encoder_spec
from cxrcore.geometry import make_geometry

PAPER_KEYS = list(REGISTRY)


def _radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric 8-bit image with hard edges (collimation, a marker), like a radiograph."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (np.sin(xx / 23.0 + seed) * np.cos(yy / 17.0) + 1) * 110 + 20
    img[h // 5: h // 5 + h // 6, w // 7: w // 7 + w // 9] = 255  # a bright marker: bicubic overshoots here
    img[:, : w // 20] = 0  # a collimation edge
    return img.astype(np.uint8)


def _sixteen_bit(h: int, w: int) -> np.ndarray:
    return (_radiograph(h, w).astype(np.uint16) * 257 + np.arange(w, dtype=np.uint16)[None] % 200)


def _raw(enc, img) -> np.ndarray:
    """The package's model input, un-normalised back to [0, 1], first channel."""
    x, _ = enc.preprocess([img])
    return (x * enc._std + enc._mean)[0, 0].numpy()


def _unnorm(pixels: torch.Tensor, mean, std) -> np.ndarray:
    return (torch.as_tensor(pixels)[0, 0] * std[0] + mean[0]).numpy()


# -- 1. MedSigLIP: the published SiglipImageProcessor -----------------------------------------------------
# google/medsiglip-448 preprocessor_config.json (read from its public mirror, fokan/MedSigLIP, uploaded by
# the model's authors): SiglipImageProcessor, size 448x448, resample 3 (bicubic), mean = std = 0.5, rescale 1/255.
MEDSIGLIP_PROCESSOR = dict(do_resize=True, size={"height": 448, "width": 448}, resample=3, do_rescale=True,
                           rescale_factor=0.00392156862, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _siglip_processor(**over):
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(**{**MEDSIGLIP_PROCESSOR, **over})


@pytest.fixture(scope="module")
def medsiglip():
    return load_encoder("medsiglip-448", stand_in=True)


@pytest.mark.parametrize("hw", [(448, 448), (700, 1000), (1000, 700), (451, 449)], ids=str)
def test_medsiglip_8bit_pixels_equal_the_published_processor(medsiglip, hw):
    img = _radiograph(*hw)
    ref = _siglip_processor()(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    ours = _raw(medsiglip, img)
    # Before: pad to a square then bilinear -> up to 232/255 apart on a non-square image.
    # Now the same uint8 resampling kernel as the processor: equal up to float rounding of the normalisation.
    np.testing.assert_allclose(ours, _unnorm(ref, [0.5] * 3, [0.5] * 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(700, 1000), (1000, 700)], ids=str)
def test_medsiglip_16bit_pixels_equal_the_processor_on_unit_floats(medsiglip, hw):
    # 16-bit data reach the processor as floats in [0, 1] with do_rescale=False, as Google's serving code
    # feeds it (8 and 16 bits alike); the float path resamples in float, no clipping, like torchvision.
    img = _sixteen_bit(*hw)
    unit = np.repeat((img.astype(np.float32) / 65535)[..., None], 3, axis=-1)
    ref = _siglip_processor(do_rescale=False)(images=unit, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(_raw(medsiglip, img), _unnorm(ref, [0.5] * 3, [0.5] * 3), rtol=0, atol=2e-6)
    assert len(np.unique(_raw(medsiglip, img))) > 256  # 16 bits were not squeezed into 8


def test_medsiglip_tokens_equal_the_model_on_processor_pixels(medsiglip):
    img = _radiograph(700, 1000)
    ref = _siglip_processor()(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    out = medsiglip.encode([img], return_grid=True)
    with torch.inference_mode():
        o = medsiglip.model(pixel_values=ref)
    np.testing.assert_allclose(out.cls, o.pooler_output.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.grid[0].reshape(-1, out.grid.shape[-1]), o.last_hidden_state[0].numpy(),
                               rtol=1e-4, atol=1e-5)


def test_medsiglip_registered_key_and_hf_dir_agree(medsiglip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    medsiglip.model.save_pretrained(tmp_path / "bare")  # no preprocessor_config.json: the class defaults
    _siglip_processor().save_pretrained(tmp_path / "published")
    medsiglip.model.save_pretrained(tmp_path / "published")
    img = _radiograph(700, 1000)
    for d in ("bare", "published"):
        spec = encoder_spec(f"hf:{tmp_path / d}")
        assert (spec.geometry, spec.interpolation, spec.mean) == ("resize", "bicubic", (0.5,) * 3), d
        wrapped = load_encoder(f"hf:{tmp_path / d}")
        np.testing.assert_array_equal(_raw(wrapped, img), _raw(medsiglip, img))


def test_medsiglip_padding_is_a_named_cited_option_not_the_default(medsiglip):
    spec = encoder_spec("medsiglip-448")
    assert spec.geometry == "resize" and spec.interpolation == "bicubic"
    assert "Google-Health/medsiglip" in spec.geometry_options["pad_square"]
    padded = load_encoder("medsiglip-448", stand_in=True, geometry="pad_square")
    assert padded.provenance()["geometry"] == "pad_square" and medsiglip.provenance()["geometry"] == "resize"
    img = _radiograph(700, 1000)
    raw = _raw(padded, img)
    g = padded.geometry_for(img.shape)
    assert g.pad[2] + g.pad[3] == 300 and raw[0].max() < 1e-6  # the top band is black padding
    with pytest.raises(ValueError, match="not offered"):
        load_encoder("rad-dino", stand_in=True, geometry="pad_square")


# -- 2. centre-crop rounding: each family its own library ---------------------------------------------------
# Widths that, after the shortest edge is resized to 224, leave crop margins 1..8 (odd and even).
MARGINS = [(224, 224 + m) for m in range(1, 9)] + [(224 + m, 224) for m in (1, 2, 3)]


def _open_clip_preprocess(spec):
    from open_clip.transform import image_transform

    return image_transform(spec.input_size, is_train=False, mean=spec.mean, std=spec.std)


def _torchvision_preprocess(spec):
    from torchvision import transforms as T

    return T.Compose([T.Resize(spec.input_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(spec.input_size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


REFERENCES = {"biomedclip": _open_clip_preprocess, "dino-resnet50": _torchvision_preprocess}


@pytest.mark.parametrize("key", sorted(REFERENCES))
@pytest.mark.parametrize("hw", MARGINS, ids=str)
def test_crop_window_is_the_librarys_on_odd_and_even_margins(key, hw):
    """No resampling (the short side already is 224): the pixels are the crop window alone, so equality is exact."""
    enc = load_encoder(key, stand_in=True)
    spec = encoder_spec(key)
    img = _radiograph(*hw)
    ref = REFERENCES[key](spec)(Image.fromarray(img).convert("RGB"))
    ref_raw = _unnorm(ref[None], spec.mean, spec.std)
    # before: offset (resized - size) // 2 -> one pixel off for margins 3, 7 (round half to even: 2, not 1)
    np.testing.assert_allclose(_raw(enc, img), ref_raw, rtol=0, atol=2e-6)


@pytest.mark.parametrize("key", sorted(REFERENCES))
@pytest.mark.parametrize("hw", [(300, 411), (411, 300), (1024, 1283), (3000, 2022)], ids=str)
def test_resampled_pixels_match_the_librarys_pil_pipeline(key, hw):
    """With resampling: open_clip and torchvision resize PIL images with Pillow, and so do these families
    for 8-bit images (resampler="pil"): the same pixels, up to float rounding of the normalisation.
    (torchvision's uint8 kernel instead would differ by up to 2 grey levels in ~0.3 % of pixels.)"""
    enc = load_encoder(key, stand_in=True)
    spec = encoder_spec(key)
    img = _radiograph(*hw)
    ref = _unnorm(REFERENCES[key](spec)(Image.fromarray(img).convert("RGB"))[None], spec.mean, spec.std)
    np.testing.assert_allclose(_raw(enc, img), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("key", sorted(REFERENCES))
def test_sixteen_bit_pixels_match_the_librarys_tensor_pipeline(key):
    """16-bit images reach open_clip / torchvision as float tensors in [0, 1]: the same float resampling."""
    enc = load_encoder(key, stand_in=True)
    spec = encoder_spec(key)
    img = _sixteen_bit(700, 1003)
    t = torch.from_numpy(img.astype(np.float32) / 65535)[None].expand(3, -1, -1)
    if key == "biomedclip":
        ref = _open_clip_preprocess(spec)(t)
    else:
        from torchvision import transforms as T

        ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                         T.Normalize(spec.mean, spec.std)])(t)
    np.testing.assert_allclose(_raw(enc, img), _unnorm(ref[None], spec.mean, spec.std), rtol=0, atol=2e-6)


@pytest.mark.parametrize("key", ["rad-dino", "dinov2-b14"])
@pytest.mark.parametrize("hw", [(518, 519), (518, 521), (518, 522), (523, 518), (700, 1003), (1003, 700)], ids=str)
def test_hf_families_keep_the_processors_floor(key, hw):
    from transformers import BitImageProcessor

    spec = encoder_spec(key)
    enc = load_encoder(key, stand_in=True)
    proc = BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518},
                             do_center_crop=True, resample=3, image_mean=list(spec.mean), image_std=list(spec.std))
    img = _radiograph(*hw)
    ref = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(_raw(enc, img), _unnorm(ref, spec.mean, spec.std), rtol=0, atol=2e-6)


def test_timm_wrapper_matches_timms_eval_transform():
    import timm
    from timm.data import create_transform, resolve_data_config

    name = "vit_base_patch16_224.augreg_in21k_ft_in1k"  # crop_pct 0.9: Resize(248) + CenterCrop(224)
    enc = load_encoder(f"timm:{name}", stand_in=True)
    with torch.device("meta"):
        cfg = resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    tf = create_transform(**cfg)
    for hw in [(248, 251), (248, 253), (300, 411)]:
        img = _radiograph(*hw)
        ref = _unnorm(tf(Image.fromarray(img).convert("RGB"))[None], cfg["mean"], cfg["std"])
        np.testing.assert_allclose(_raw(enc, img), ref, rtol=0, atol=2e-6, err_msg=str(hw))


def test_fraction_of_widths_whose_crop_moved():
    """What the rounding fix changes: the crop offset of ~a quarter of widths (odd margins of 3 mod 4)."""
    widths = range(225, 2049)
    moved = [w for w in widths if make_geometry((224, w), 224, 16, "center_crop", crop_rounding="round").crop
             != make_geometry((224, w), 224, 16, "center_crop", crop_rounding="floor").crop]
    assert 0.2 < len(moved) / len(widths) < 0.3
    assert all((w - 224) % 4 == 3 for w in moved)


# -- 3. boxes in a cropped-away margin ------------------------------------------------------------------------
def test_boxes_mostly_cropped_away_are_excluded_with_a_reason_and_the_batch_goes_on():
    from cxrcore.pooling import MIN_VISIBLE_FRACTION, exclusion_reason

    enc = load_encoder("biomedclip", stand_in=True)
    img = _radiograph(224, 600)  # crop keeps x in [188, 412)
    boxes = [[(0, 10, 50, 60),  # wholly cropped away: the old code raised and lost the batch
              (170, 10, 200, 60),  # 12/30 visible
              (180, 10, 200, 60),  # 12/20 visible
              (250, 10, 300, 60)],  # wholly visible
             []]
    out = enc.encode([img, _radiograph(224, 224)], boxes)
    assert out.roi_local.shape[0] == 4 and out.roi_image.tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(out.roi_visible, [0, 12 / 30, 12 / 20, 1])
    assert MIN_VISIBLE_FRACTION == 0.5
    reason = exclusion_reason()
    assert out.roi_excluded.tolist() == [reason, reason, "", ""]
    assert np.isnan(out.roi_local[:2]).all() and np.isfinite(out.roi_local[2:]).all()
    assert out.exclusions.to_dict("records") == [{"reason": reason, "count": 2, "item": "box"}]
    assert out.excluded_boxes[["roi_row", "image", "box"]].values.tolist() == [[0, 0, 0], [1, 0, 1]]
    # the threshold is a parameter; a box partly visible is pooled over its visible cells only
    loose = enc.encode([img], boxes[:1], min_visible=0.3)
    assert loose.roi_excluded.tolist() == [exclusion_reason(0.3), "", "", ""]
    g = loose.geometry[0]
    assert g.cells((170, 10, 200, 60))[2:] == (0, 1)  # clipped to the visible part: the first column only


def test_encode_batch_records_visibility_and_the_reason_in_every_box_row():
    from cxrcore.extract import Pass, encode_batch, rows_to_table

    enc = load_encoder("dino-resnet50", stand_in=True)
    img = _radiograph(224, 600)
    boxes = [(0, 10, 50, 60), (250, 10, 300, 60)]
    rows0 = [{"image_index": 0, "image_id": "a", "box_index": k, "pass_id": 0} for k in range(2)]
    p = [Pass(0, img, boxes, rows0), Pass(1, img, [], [{"image_index": 1, "image_id": "b", "pass_id": 1}])]
    rows, feats, _ = encode_batch(enc, p)
    assert [r["roi_visible"] for r in rows[:2]] == [0.0, 1.0] and np.isnan(rows[2]["roi_visible"])
    assert rows[0]["roi_excluded"].startswith("box cropped away") and rows[1]["roi_excluded"] is None
    assert np.isnan(feats["roi_local"][0]).all() and np.isfinite(feats["roi_local"][1]).all()
    prov = {"encoder": enc.provenance(), "weights_id": "x", "cxrcore_version": "0"}
    t = rows_to_table(rows, feats, prov, [])
    assert t["roi_excluded"].null_count == 2 and t["roi_local"].null_count == 2


# -- 4. ResNet cells by receptive-field centre ------------------------------------------------------------------
def _symmetric_resnet(arch):
    """The real torchvision ResNet with every conv weight a positive constant and BatchNorm the identity:
    on a positive input every ReLU passes, the network is linear, and each cell's input gradient is
    symmetric about its receptive-field centre wherever the receptive field stays inside the image.
    The 3x3/2 max-pool becomes the 3x3/2 mean of the same window: a max sends the gradient to one
    data-dependent position of the window (the first on ties, which would shift the centre by 2 px),
    while the receptive field's geometry is the window's."""
    from cxrcore.encoders.resnet import build_resnet

    m = build_resnet(arch).eval()
    mp = m.maxpool
    m.maxpool = torch.nn.AvgPool2d(mp.kernel_size, mp.stride, mp.padding)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.fill_(1.0), mod.bias.zero_(), mod.running_mean.zero_(), mod.running_var.fill_(1.0 - mod.eps)
    return m


def _gradient_centre(model, size: int, cell: tuple[int, int]) -> tuple[float, float]:
    x = torch.ones(1, 3, size, size, requires_grad=True)
    m = model
    fmap = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
    fmap[0, :, cell[0], cell[1]].sum().backward()
    g = x.grad[0].abs().sum(0).double()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # pixel centres
    return float((g * ys).sum() / g.sum()), float((g * xs).sum() / g.sum())


@pytest.mark.parametrize("cell", [(6, 6), (7, 8), (8, 7)])
def test_resnet_cell_receptive_field_centre_is_32c_plus_half(cell):
    from cxrcore.encoders.resnet import STAND_IN_ARCH

    # the stand-in is torchvision's ResNet with the published stem and strides (one block per stage):
    # the centre depends only on kernel sizes, strides and paddings, which it shares with resnet50
    size = 512  # 16x16 cells; the receptive fields of these interior cells stay inside the image
    cy, cx = _gradient_centre(_symmetric_resnet(STAND_IN_ARCH), size, cell)
    assert abs(cy - (32 * cell[0] + 0.5)) < 1e-6 and abs(cx - (32 * cell[1] + 0.5)) < 1e-6, (cy, cx)
    g = make_geometry((size, size), size, 32, "resize", cell_rule="rf_centre", cell_centre0=0.5)
    enc_geom = load_encoder("dino-resnet50", stand_in=True, input_size=size).geometry_for((size, size))
    assert (enc_geom.cell_rule, enc_geom.cell_centre0) == ("rf_centre", 0.5)
    assert abs(g.cell_centres(0)[cell[0]] - cy) < 1e-6 and abs(enc_geom.cell_centres(1)[cell[1]] - cx) < 1e-6
    # a small box around the centre pools that cell alone; the old block rule [32c, 32c + 32) named
    # cells c - 1 and c for it
    box = (cx - 3, cy - 3, cx + 3, cy + 3)
    assert enc_geom.cells(box) == (cell[0], cell[0] + 1, cell[1], cell[1] + 1)


def test_resnet_gradient_centre_with_random_weights_is_near_32c():
    """Random (seeded) weights: the gradient's centre of mass stays within a few pixels of 32c + 0.5,
    far from the old block centre 32c + 16."""
    enc = load_encoder("dino-resnet50", stand_in=True, input_size=512)
    for cell in [(7, 7), (8, 6)]:
        cy, cx = _gradient_centre(enc.model, 512, cell)
        assert abs(cy - (32 * cell[0] + 0.5)) < 4 and abs(cx - (32 * cell[1] + 0.5)) < 4, (cell, cy, cx)


def test_resnet_every_visible_box_pools_a_cell():
    g = load_encoder("dino-resnet50", stand_in=True).geometry_for((224, 224))
    for x in np.arange(0, 223, 0.75):  # one-pixel boxes everywhere, including between centres and the edge
        r0, r1, c0, c1 = g.cells((x, x, x + 1, x + 1))
        assert r1 - r0 == 1 and c1 - c0 == 1
        dist = np.abs(g.cell_centres(1) - (x + 0.5))
        assert dist[c0] == dist.min()  # the cell centred nearest to the box


# -- 5. dtype: the requested one, whatever the checkpoint stores --------------------------------------------
@pytest.mark.parametrize("key", PAPER_KEYS)
@pytest.mark.parametrize("saved, wanted", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-saved-fp32-run", "fp32-saved-bf16-run"])
def test_checkpoint_dtype_never_decides_the_run_dtype(key, saved, wanted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder(key, stand_in=True, dtype=saved)
    enc.save(tmp_path / "w")
    back = load_encoder(key, weights=str(tmp_path / "w"), dtype=wanted)
    assert {p.dtype for p in back.model.parameters()} == {wanted}
    prov = back.provenance()
    assert prov["weights_dtype"] == str(wanted).removeprefix("torch.") and prov["dtype"] == str(wanted)
    out = back.encode([_radiograph(300, 260)], [[(20, 20, 120, 120)]])
    assert out.cls.dtype == np.float32 and np.isfinite(out.cls).all()


class _Float32Created(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every new (non-view, non-meta) float32 tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and not t.is_meta \
                    and t.untyped_storage().data_ptr() not in ins:
                self.bytes += t.numel() * 4
        return out


def _mid_size_dinov3(tmp_path):
    """The DINOv3 ViT-7B config, narrowed to ~25M parameters, saved in bf16 (as the hub copy is)."""
    import transformers

    from cxrcore.encoders import REGISTRY as R

    cfg = transformers.DINOv3ViTConfig(**{**R["dinov3-vit7b16"].arch, "hidden_size": 512, "intermediate_size": 1024,
                                          "num_hidden_layers": 6, "num_attention_heads": 8})
    with torch.device("meta"):
        model = transformers.DINOv3ViTModel(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "v3")
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key", ["dinov3-vit7b16", "biomedclip", "dino-resnet50", "open_clip:ViT-B-16"])
def test_bf16_checkpoint_loads_without_a_float32_copy(key, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # load in this thread, where the dispatch mode sees it
    if key == "dinov3-vit7b16":
        n = _mid_size_dinov3(tmp_path)
        weights = str(tmp_path / "v3")
        key = f"hf:{weights}"
    else:
        enc = load_encoder(key, stand_in=True, dtype=torch.bfloat16)
        enc.save(tmp_path / "w")
        n, weights = sum(p.numel() for p in enc.model.parameters()), str(tmp_path / "w")
    with _Float32Created() as seen:
        back = load_encoder(key, weights=None if key.startswith("hf:") else weights, dtype="bfloat16")
    assert {p.dtype for p in back.model.parameters()} == {torch.bfloat16}
    # `from_pretrained(...)` in float32 then `.to(bf16)` creates >= 4 n bytes of float32 here
    assert seen.bytes < 0.05 * 4 * n, (seen.bytes, 4 * n)


def test_the_float32_counter_sees_an_fp32_load_then_cast(tmp_path, monkeypatch):
    """The guard above can fail: the way the issue forbids is caught."""
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    n = _mid_size_dinov3(tmp_path)
    with _Float32Created() as seen:
        transformers.DINOv3ViTModel.from_pretrained(tmp_path / "v3", dtype=torch.float32).to(torch.bfloat16)
    assert seen.bytes >= 4 * n * 0.9


# -- 6. input sizes and the spec facts for the encoders table ------------------------------------------------------
@pytest.mark.parametrize("key", PAPER_KEYS)
def test_every_family_runs_at_another_input_size_and_says_so(key, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = encoder_spec(key)
    size = spec.input_size - 2 * spec.patch_size if spec.input_size > 300 else spec.input_size + 2 * spec.patch_size
    enc = load_encoder(key, stand_in=True, input_size=size)
    out = enc.encode([_radiograph(300, 400)], [[(10, 10, 200, 200)]], return_grid=True)
    assert out.grid.shape[1:3] == (size // spec.patch_size,) * 2 == enc.grid_shape
    assert enc.provenance()["input_size"] == size and spec.input_size != size
    enc.save(tmp_path / "w")
    assert load_encoder(key, weights=str(tmp_path / "w")).provenance()["input_size"] == size


@pytest.mark.parametrize("key", PAPER_KEYS)
def test_spec_states_the_facts_the_encoders_table_shows(key):
    spec = encoder_spec(key)
    for name in ("pretraining_data", "objective", "input_size_reason", "token_layout", "cls_embedding", "licence",
                 "citation"):
        assert getattr(spec, name).strip(), (key, name)
    assert isinstance(spec.gated, bool)
    assert spec.gated == (key in ("dinov3-vit7b16", "medsiglip-448"))
    assert str(spec.input_size) in spec.input_size_reason


# == second review: each reference pipeline followed to the pixel (defects 1-8 of the review of the enc merge) ==
# -- 1. how 8-bit images are resampled is read off each transformers processor ------------------------------------
DINOV3_PROCESSOR = dict(size={"height": 224, "width": 224}, resample=2, do_rescale=True, rescale_factor=1 / 255,
                        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize("hw", [(700, 1000), (1000, 700), (150, 180), (100, 3000)], ids=str)
def test_dinov3_8bit_pixels_equal_DINOv3ViTImageProcessor(hw):
    """DINOv3ViTImageProcessor._preprocess rescales to float, then resizes: 8-bit images are resampled as
    floats (before: as uint8, 0.7-0.98 grey levels apart on non-square images)."""
    from transformers import DINOv3ViTImageProcessor

    enc = load_encoder("dinov3-vit7b16", stand_in=True)
    img = _radiograph(*hw)
    ref = DINOv3ViTImageProcessor(**DINOV3_PROCESSOR)(images=Image.fromarray(img).convert("RGB"),
                                                      return_tensors="pt")["pixel_values"]
    m, s = DINOV3_PROCESSOR["image_mean"], DINOV3_PROCESSOR["image_std"]
    np.testing.assert_allclose(_raw(enc, img), _unnorm(ref, m, s), rtol=0, atol=1e-6)
    out = enc.encode([img])
    with torch.inference_mode():
        t = enc.model(pixel_values=ref).last_hidden_state
    np.testing.assert_allclose(out.cls, t[:, 0].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, want", [("BitImageProcessor", "torchvision"), ("SiglipImageProcessor", "torchvision"),
                                        ("ViTImageProcessor", "torchvision"), ("DINOv3ViTImageProcessor", "float"),
                                        ("BitImageProcessorPil", "pil"), ("SiglipImageProcessorPil", "pil")])
def test_eight_bit_resampling_is_read_off_each_transformers_processor(name, want):
    from cxrcore.encoders.hf import processor_resampler

    assert processor_resampler(name) == want


@pytest.mark.parametrize("model_type, family", [("dinov2", "dinov2"), ("dinov3_vit", "dinov3"), ("siglip", "siglip"),
                                                ("vit", "vit")])
def test_each_transformers_family_names_the_processor_transformers_publishes(model_type, family):
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    from cxrcore.encoders.base import FAMILIES
    from cxrcore.encoders.hf import processor_resampler

    fam = FAMILIES[family]
    assert fam.processor_class == IMAGE_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"]
    for key, spec in REGISTRY.items():
        if spec.family == family:
            assert load_encoder(key, stand_in=True).resampler == processor_resampler(fam.processor_class)


# -- 2. hf: follows its processor exactly; dinov2-b14 offers the published processor's pixels ---------------------
def _processor_cases():
    from transformers import BitImageProcessor, SiglipImageProcessor, ViTImageProcessor

    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return {
        # facebook/dinov2-base preprocessor_config.json
        "dinov2-base": (BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                          do_center_crop=True, resample=3, **imagenet),
                        ("center_crop", 224, 256)),
        "siglip-448": (SiglipImageProcessor(size={"height": 448, "width": 448}, resample=3), ("resize", 448, None)),
        "vit-resize-then-crop": (ViTImageProcessor(size={"height": 256, "width": 256}, do_center_crop=True,
                                                   crop_size={"height": 224, "width": 224}, resample=2),
                                 ("resize_crop", 224, 256)),
    }


@pytest.mark.parametrize("case", ["dinov2-base", "siglip-448", "vit-resize-then-crop"])
@pytest.mark.parametrize("hw", [(700, 1000), (1001, 700), (150, 180)], ids=str)
def test_processor_geometry_gives_the_processors_pixels(case, hw):
    from cxrcore.encoders.hf import processor_geometry, processor_resampler

    proc, (geometry, size, short) = _processor_cases()[case]
    pre = processor_geometry(proc)
    assert (pre["geometry"], pre["input_size"], pre["resize_short"]) == (geometry, size, short)
    g = make_geometry(hw, size, 16 if size % 14 else 14, geometry, resize_short=short,
                      resampler=processor_resampler(pre["processor_class"]))
    img = _radiograph(*hw)
    ref = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    ours = g.pixels(img, pre["interpolation"]).numpy()[0]
    np.testing.assert_allclose(ours, _unnorm(ref, pre["mean"], pre["std"]), rtol=0, atol=1e-6)


def test_hf_dir_with_dinov2_bases_processor_gives_AutoImageProcessors_pixels_and_tokens(tmp_path, monkeypatch):
    """hf:<dir> with facebook/dinov2-base's processor: 224 crop of a 256 shortest edge (before: 518 at crop ratio 1)."""
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_encoder("dinov2-b14", stand_in=True).model.save_pretrained(tmp_path)
    _processor_cases()["dinov2-base"][0].save_pretrained(tmp_path)
    spec = encoder_spec(f"hf:{tmp_path}")
    assert (spec.input_size, spec.geometry, spec.resize_short, spec.processor_class) == \
        (224, "center_crop", 256, "BitImageProcessor")
    enc = load_encoder(f"hf:{tmp_path}")
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    img = _radiograph(700, 1000)
    px = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(_raw(enc, img), _unnorm(px, proc.image_mean, proc.image_std), rtol=0, atol=1e-6)
    out = enc.encode([img], return_grid=True)
    with torch.inference_mode():
        t = enc.model(pixel_values=px).last_hidden_state
    np.testing.assert_allclose(out.cls, t[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.grid.reshape(1, -1, out.grid.shape[-1]), t[:, 1:].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(700, 1000), (1000, 701), (300, 411)], ids=str)
def test_dinov2_b14_at_224_with_resize_short_256_is_BitImageProcessor(hw):
    from transformers import BitImageProcessor

    spec = encoder_spec("dinov2-b14")
    assert "resize_short=256" in spec.notes and "resize_short=256" in spec.input_size_reason
    enc = load_encoder("dinov2-b14", stand_in=True, input_size=224, resize_short=256)
    proc = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                             resample=3, image_mean=list(spec.mean), image_std=list(spec.std))
    img = _radiograph(*hw)
    ref = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(_raw(enc, img), _unnorm(ref, spec.mean, spec.std), rtol=0, atol=1e-6)
    assert enc.provenance()["resize_short"] == 256
    # the registered default is unchanged: 518 at crop ratio 1.0, and input_size alone keeps that ratio
    assert (load_encoder("dinov2-b14", stand_in=True).resize_short, enc.grid_shape) == (518, (16, 16))
    assert load_encoder("dinov2-b14", stand_in=True, input_size=224).resize_short == 224


# -- 3. timm squash: Resize((floor(S / crop_pct),) * 2) then CenterCrop(S) --------------------------------------------
@pytest.mark.parametrize("hw", [(700, 1000), (384, 384), (150, 180), (1000, 701)], ids=str)
def test_timm_squash_with_crop_pct_matches_timms_eval_transform(hw):
    import timm
    from timm.data import create_transform, resolve_data_config

    name = "vit_base_patch16_clip_384.openai_ft_in12k_in1k"  # crop_mode squash, crop_pct 0.95
    enc = load_encoder(f"timm:{name}", stand_in=True)
    with torch.device("meta"):
        cfg = resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    assert (cfg["crop_mode"], cfg["crop_pct"]) == ("squash", 0.95)
    assert (enc.geometry, enc.resize_short) == ("resize_crop", 404)  # floor(384 / 0.95)
    img = _radiograph(*hw)
    ref = _unnorm(create_transform(**cfg)(Image.fromarray(img).convert("RGB"))[None], cfg["mean"], cfg["std"])
    np.testing.assert_allclose(_raw(enc, img), ref, rtol=0, atol=2e-6)  # before: 237-245 grey levels apart


def test_timm_border_crop_mode_is_refused_and_a_missing_crop_pct_is_timms_default(monkeypatch):
    import math

    from timm.data.constants import DEFAULT_CROP_PCT

    from cxrcore.encoders import timm_vit

    real = timm_vit._create

    def with_cfg(**over):
        def create(name, **kw):
            m = real(name, **kw)
            m.pretrained_cfg = {**m.pretrained_cfg, **over}
            return m
        return create

    monkeypatch.setattr(timm_vit, "_create", with_cfg(crop_mode="border", crop_pct=1.0))
    with pytest.raises(ValueError, match="crop_mode='border'"):
        timm_vit.timm_spec("timm:vit_base_patch16_224.augreg_in21k_ft_in1k")
    monkeypatch.setattr(timm_vit, "_create", with_cfg(crop_pct=None))
    spec = timm_vit.timm_spec("timm:vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert spec.resize_short == math.floor(224 / DEFAULT_CROP_PCT) == 256


# -- 4. the geometry step runs on the CPU whatever the device ----------------------------------------------------------
@pytest.mark.parametrize("key", ["rad-dino", "medsiglip-448"])
def test_uint8_resampling_never_takes_torchvisions_off_cpu_branch(key, monkeypatch):
    """torchvision consults _do_native_uint8_resize_on_cpu only for a uint8 image on the CPU; off the CPU (CUDA)
    it casts to float, interpolates, clamps and rounds (the reviewer forced that branch: 1-13 grey levels off).
    With the encoder on another device (meta here, CUDA on a GPU) the package must still resample on the CPU."""
    import torchvision.transforms.v2.functional._geometry as G

    calls = []
    real = G._do_native_uint8_resize_on_cpu
    monkeypatch.setattr(G, "_do_native_uint8_resize_on_cpu", lambda interp: calls.append(interp) or real(interp))
    enc = load_encoder(key, stand_in=True, device="meta")
    img = _radiograph(150, 180)
    x, _ = enc.preprocess([img])
    assert x.device.type == "meta"  # copied to the device after the geometry step
    assert len(calls) == 1  # the uint8 image was resampled on the CPU (before: 0, it was moved to the device first)
    cpu = load_encoder(key, stand_in=True)
    calls.clear()
    cpu.preprocess([img])
    assert len(calls) == 1


# -- 5. MedSigLIP pad_square: Google's serving recipe --------------------------------------------------------------------
def _google_serving_pixels(img: np.ndarray) -> torch.Tensor:
    """python/serving/predictor.py (Google-Health/medsiglip): /dtype max to float32, _zero_pad_image_to_square,
    SiglipImageProcessor(do_rescale=False, size 448x448) (its default resample is bicubic, mean = std = 0.5)."""
    from transformers import SiglipImageProcessor

    f = img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    h, w = f.shape
    if h < w:
        f = np.pad(f, (((w - h) // 2, w - h - (w - h) // 2), (0, 0)))
    elif w < h:
        f = np.pad(f, ((0, 0), ((h - w) // 2, h - w - (h - w) // 2)))
    proc = SiglipImageProcessor(do_rescale=False, size={"height": 448, "width": 448})
    return proc(images=np.repeat(f[..., None], 3, axis=-1), return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("hw", [(700, 1000), (1000, 700), (100, 3000), (451, 449)], ids=str)
def test_medsiglip_pad_square_equals_googles_serving_recipe(hw):
    enc = load_encoder("medsiglip-448", stand_in=True, geometry="pad_square")
    assert enc.resampler == "float"
    img = _radiograph(*hw)
    ref = _google_serving_pixels(img)
    # before: resampled as uint8 (clipped bicubic overshoot), 9.6-13.5 grey levels apart
    np.testing.assert_allclose(_raw(enc, img), _unnorm(ref, [0.5] * 3, [0.5] * 3), rtol=0, atol=2e-6)
    with torch.inference_mode():
        o = enc.model(pixel_values=ref)
    np.testing.assert_allclose(enc.encode([img]).cls, o.pooler_output.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(_raw(enc, img), _raw(enc, img.astype(np.uint16) * 257))  # 8 and 16 bits alike, as there


# -- 6. Encoder.save writes the equivalent preprocessor_config.json ----------------------------------------------------
@pytest.mark.parametrize("key, kw", [("rad-dino", {}), ("dinov2-b14", {}),
                                     ("dinov2-b14", {"input_size": 224, "resize_short": 256}),
                                     ("dinov3-vit7b16", {}), ("medsiglip-448", {})], ids=str)
def test_saved_encoder_reads_back_as_hf_dir_and_AutoImageProcessor_with_the_same_pixels(key, kw, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder(key, stand_in=True, **kw)
    enc.save(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    hf = load_encoder(f"hf:{tmp_path}")
    assert (hf.spec.mean, hf.spec.std, hf.geometry, hf.input_size, hf.resize_short, hf.resampler) == \
        (enc.spec.mean, enc.spec.std, enc.geometry, enc.input_size, enc.resize_short, enc.resampler)
    img = _radiograph(700, 1000)
    np.testing.assert_array_equal(hf.preprocess([img])[0].numpy(), enc.preprocess([img])[0].numpy())
    a, b = hf.encode([img], return_grid=True), enc.encode([img], return_grid=True)
    # (from_pretrained may pick another attention kernel than the class built directly: float round-off)
    np.testing.assert_allclose(a.cls, b.cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.grid, b.grid, rtol=1e-5, atol=1e-6)
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    px = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(_unnorm(px, enc.spec.mean, enc.spec.std), _raw(enc, img), rtol=0, atol=1e-6)


def test_hf_refuses_a_cxrcore_dir_whose_preprocessing_no_processor_states(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_encoder("medsiglip-448", stand_in=True, geometry="pad_square").save(tmp_path / "pad")
    assert not (tmp_path / "pad" / "preprocessor_config.json").exists()  # no transformers processor pads
    load_encoder("rad-dino", stand_in=True).save(tmp_path / "old")
    (tmp_path / "old" / "preprocessor_config.json").unlink()  # as an older cxrcore saved it
    for d, key in [("pad", "medsiglip-448"), ("old", "rad-dino")]:
        with pytest.raises(ValueError, match=f"load_encoder\\('{key}', weights="):
            encoder_spec(f"hf:{tmp_path / d}")
    assert load_encoder("rad-dino", weights=str(tmp_path / "old")).spec.mean == (0.5307,) * 3


# -- 8. boxes outside the image: their own reason ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["medsiglip-448", "rad-dino"])
def test_boxes_outside_the_image_and_boxes_cropped_away_are_counted_apart(key):
    from cxrcore.extract import Pass, encode_batch
    from cxrcore.pooling import exclusion_reason, outside_image_reason

    enc = load_encoder(key, stand_in=True)
    img = _radiograph(700, 1000)  # RAD-DINO's crop keeps x in [150, 850); MedSigLIP stretches, nothing cut
    boxes = [(0, 0, 100, 100), (950, 10, 1150, 60), (1200, 10, 1300, 60), (140, 10, 160, 60), (400, 300, 500, 400)]
    out = enc.encode([img], [boxes])
    out_r, crop_r = outside_image_reason(), exclusion_reason()
    want = {"medsiglip-448": ["", out_r, out_r, "", ""], "rad-dino": [crop_r, out_r, out_r, "", ""]}[key]
    assert out.roi_excluded.tolist() == want  # before: every exclusion read "box cropped away"
    counts = dict(zip(out.exclusions["reason"], out.exclusions["count"]))
    assert counts == ({out_r: 2} if key == "medsiglip-448" else {out_r: 2, crop_r: 1})
    # the extraction path (pixels made in a worker) records the same reasons
    x, geoms = enc.preprocess([img])
    rows0 = [{"image_index": 0, "image_id": "a", "box_index": k, "pass_id": 0} for k in range(len(boxes))]
    rows, _, _ = encode_batch(enc, [Pass(0, None, boxes, rows0, pixels=x[0], geometry=geoms[0])])
    assert [r["roi_excluded"] or "" for r in rows] == want
