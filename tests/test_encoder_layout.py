"""End-to-end token layout: a lit square lights exactly the cells ``Geometry.cells`` names.

With every residual branch zeroed (attention output projections, MLP outputs, layer
scales; ResNet's last BatchNorm of each bottleneck) a network is spatially local: a patch
token depends only on its own patch of the model input. A bright square on a black image
then changes exactly the tokens of the cells it covers, so comparing the grid with the
grid of a black image checks, in one go, the geometry step, the token slice (CLS and
registers out of the grid), the row-major reshape (a transposed grid lights the mirrored
cells) and ``Geometry.cells``. Adopted from the reviewer's /tmp/rev/layout.py, with the
square's edges placed mid-cell in model-input pixels so resampling blur (a few pixels)
never reaches a neighbouring cell and the test can ask for equality, not inclusion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrcore import load_encoder
from cxrcore.encoders import REGISTRY

# names of the residual-branch outputs in transformers (Dinov2, DINOv3, SigLIP, ViT) models
_HF_RESIDUAL = ("layer_scale", "lambda1", "out_proj", "o_proj", "fc2", "down_proj", "weights_out",
                "attention.output.dense", "layer.output.dense")


def _zero(params) -> None:
    with torch.no_grad():
        for p in params:
            p.zero_()


def make_local(enc) -> None:
    """Zero every residual branch of ``enc.model`` in place (the stem and final norm stay)."""
    m = enc.model
    if enc.spec.family == "torchvision_resnet":
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                _zero([block.bn3.weight, block.bn3.bias])
        return
    if hasattr(getattr(m, "transformer", None), "resblocks"):  # open_clip's VisionTransformer (open_clip: ids)
        for blk in m.transformer.resblocks:
            _zero([*blk.attn.out_proj.parameters(), *blk.mlp.c_proj.parameters()])
        return
    trunk = getattr(m, "trunk", None) or (m if hasattr(m, "blocks") else None)
    if trunk is not None:  # timm ViT (BiomedCLIP's trunk, open_clip timm trunks, timm: wrapper)
        for blk in trunk.blocks:
            _zero([*blk.attn.proj.parameters(), *blk.mlp.fc2.parameters()])
        return
    hits = [p for n, p in m.named_parameters() if "head" not in n and any(k in n for k in _HF_RESIDUAL)]
    assert hits, f"{enc.spec.key}: no residual-branch parameters found to zero"
    _zero(hits)


def lit_cells(enc, image: np.ndarray) -> np.ndarray:
    grid = enc.encode([image], return_grid=True).grid[0]
    black = enc.encode([np.zeros_like(image)], return_grid=True).grid[0]
    # Tokens untouched by the square are computed identically in both passes: exactly equal.
    return np.abs(grid - black).max(-1) > 0


def square_for(g, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[int, int, int, int]:
    """An integer box (original pixels) whose edges fall mid-cell in the model input."""
    p = g.stride
    r0, r1 = rows
    c0, c1 = cols
    x1, y1, x2, y2 = g.to_original([((c0 + 0.5) * p, (r0 + 0.5) * p, (c1 - 0.5) * p, (r1 - 0.5) * p)])[0]
    return int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2))


def _hf_wrapped(kind: str, tmp_path):
    """hf:<dir> stand-ins for the wrapper-only families (a saved small config, offline)."""
    import transformers

    if kind == "dinov2_with_registers":
        cfg = transformers.Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                      mlp_ratio=2, patch_size=14, image_size=224,
                                                      num_register_tokens=4)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, patch_size=16, image_size=224)
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    torch.manual_seed(0)
    model.save_pretrained(tmp_path / kind)
    return load_encoder(f"hf:{tmp_path / kind}")


VIT_KEYS = [k for k, s in REGISTRY.items() if s.family != "torchvision_resnet"] + [
    "timm:vit_base_patch14_reg4_dinov2", "hf:dinov2_with_registers", "hf:vit",
    # open_clip's own ViT (centre crop), a timm trunk without a class token (squash, attention-pool head)
    "open_clip:ViT-B-16", "open_clip:ViT-B-16-SigLIP@webli"]


@pytest.fixture
def encoder(request, tmp_path, monkeypatch):
    key = request.param
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = _hf_wrapped(key[3:], tmp_path) if key.startswith("hf:") else load_encoder(key, stand_in=True)
    make_local(enc)
    return enc


@pytest.mark.parametrize("encoder", VIT_KEYS, indirect=True)
@pytest.mark.parametrize("hw", [None, (700, 1000), (1000, 700)], ids=["native", "wide", "tall"])
def test_lit_square_lights_exactly_its_cells(encoder, hw):
    size = encoder.input_size
    hw = hw or (size, size)
    g = encoder.geometry_for(hw)
    gh, gw = g.grid
    # an off-centre, non-square block of cells: a transposed or shifted grid lights other cells
    rows, cols = (gh // 5, gh // 5 + 3), (gw // 2, gw // 2 + 5)
    box = square_for(g, rows, cols)
    assert g.cells(box) == (*rows, *cols)  # the fixture is what it claims
    img = np.zeros(hw, np.float32)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 1.0
    lit = lit_cells(encoder, img)
    want = g.cell_mask(box)
    assert lit.shape == want.shape == (gh, gw)
    assert (lit == want).all(), (
        f"{encoder.spec.key}: lit cells rows {np.flatnonzero(lit.any(1))} cols {np.flatnonzero(lit.any(0))}; "
        f"Geometry.cells says rows {list(range(*rows))} cols {list(range(*cols))}"
    )


def test_resnet_layer4_cells_follow_the_geometry():
    # With the bottleneck branches zeroed, a layer4 cell is the stem's output at one input
    # position: torchvision's stride-2 1x1 downsample convs keep every other position, so
    # cell c sees input pixels [32c - 5, 32c + 5] (conv1 7x7/2 + maxpool 3x3/2), centred on
    # pixel 32c: its receptive-field centre. A square from 32*c0 - 2 to 32*(c1 - 1) + 3
    # covers the centres of cells c0..c1-1 and lights exactly those, the cells
    # Geometry.cells gives by the receptive-field-centre rule; a transposed map lights
    # the mirrored block. (The old rule, cell c = pixels [32c, 32c + 32), named c0-1..c1-1.)
    enc = load_encoder("dino-resnet50", stand_in=True)
    make_local(enc)
    s = enc.input_size
    g = enc.geometry_for((s, s))
    rows, cols = (1, 3), (3, 6)
    box = (32 * cols[0] - 2, 32 * rows[0] - 2, 32 * (cols[1] - 1) + 3, 32 * (rows[1] - 1) + 3)
    assert g.cells(box) == (*rows, *cols)
    img = np.zeros((s, s), np.float32)
    img[box[1]:box[3], box[0]:box[2]] = 1.0
    assert (lit_cells(enc, img) == g.cell_mask(box)).all()


@pytest.mark.parametrize("cell", [(0, 0), (2, 5), (6, 6), (3, 1)])
def test_resnet_one_lit_pixel_lights_the_cell_whose_centre_it_is(cell):
    """A single lit input pixel at (32r, 32c) lights layer4 cell (r, c) only; a one-pixel box there maps to it."""
    enc = load_encoder("dino-resnet50", stand_in=True)
    make_local(enc)
    s = enc.input_size
    g = enc.geometry_for((s, s))
    r, c = cell
    img = np.zeros((s, s), np.float32)
    img[32 * r, 32 * c] = 1.0
    lit = lit_cells(enc, img)
    assert lit.sum() == 1 and lit[r, c]
    assert g.cells((32 * c, 32 * r, 32 * c + 1, 32 * r + 1)) == (r, r + 1, c, c + 1)
    np.testing.assert_allclose(g.cell_centres(1)[c], 32 * c + 0.5)


def test_biomedclip_cls_is_the_trunks_post_norm_cls_token():
    enc = load_encoder("biomedclip", stand_in=True)
    rng = np.random.default_rng(0)
    img = rng.random((300, 260)).astype(np.float32)
    out = enc.encode([img], return_grid=True)
    pixels, _ = enc.preprocess([img])
    trunk = enc.model.trunk  # timm VisionTransformer, step by step rather than forward_features
    with torch.inference_mode():
        x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)))
        for blk in trunk.blocks:
            x = blk(x)
        x = trunk.norm(x)
        projected = enc.model(pixels)  # open_clip's image embedding: after the projection head
    np.testing.assert_allclose(out.cls, x[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    h, w = out.grid.shape[1:3]
    np.testing.assert_allclose(out.grid, x[:, 1:].reshape(1, h, w, -1).numpy(), rtol=1e-5, atol=1e-6)
    assert out.cls.shape[1] == trunk.num_features != projected.shape[1]


def test_dinov3_grid_excludes_cls_and_the_four_registers():
    enc = load_encoder("dinov3-vit7b16", stand_in=True)
    assert enc.model.config.num_register_tokens == 4
    img = np.random.default_rng(1).random((224, 224)).astype(np.float32)
    out = enc.encode([img], return_grid=True)
    pixels, _ = enc.preprocess([img])
    with torch.inference_mode():
        tokens = enc.model(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 14 * 14
    np.testing.assert_allclose(out.grid[0], tokens[0, 5:].reshape(14, 14, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.cls[0], tokens[0, 0].numpy(), rtol=1e-5, atol=1e-6)
