"""open_clip image towers as ``open_clip:<id>`` (issue 13): ids, specs, pixels and tokens against open_clip itself.

Real open_clip architectures with random weights: ViT-B-16's config narrowed (registered with
``open_clip.add_model_config``) and a timm ViT trunk (``vit_tiny_patch16_224``, as BiomedCLIP's
tower is built). Each whole CLIP model is saved as an open_clip repository holds it
(``open_clip_config.json`` + ``open_clip_model.safetensors``), in a directory and in a Hugging
Face cache laid out in a temp dir, and read back offline through ``open_clip:local-dir:`` and
``open_clip:hf-hub:``; open_clip's own ``create_model_and_transforms`` reads the same files and
is the reference. Nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcore import encoder_spec, load_encoder
from cxrcore.encoders import REGISTRY, WeightsUnavailableError, check_encoders
from cxrcore.encoders.openclip import CONFIG_FILE, parse_open_clip_key, spec_fields

open_clip = pytest.importorskip("open_clip")

NARROW_TEXT = {"width": 64, "heads": 2, "layers": 1}
#: preprocess_cfg variants of the repositories: open_clip's defaults (shortest edge + centre crop, bicubic) and
#: the SigLIP/CLIPA kind (squash, bilinear here, other statistics)
PREPROCESS = {
    "shortest": {},
    "squash": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
               "resize_mode": "squash"},
}
# crop margins 1..8 (odd and even) after the shortest edge is already 224, tall and wide, then resampled sizes
MARGINS = [(224, 224 + m) for m in range(1, 9)] + [(224 + m, 224) for m in (1, 2, 3)]
RESAMPLED = [(224, 224), (300, 411), (411, 300), (1024, 1283), (97, 131)]


def _model_cfgs() -> dict[str, dict]:
    vit = open_clip.get_model_config("ViT-B-16")
    vit["embed_dim"] = 32
    vit["vision_cfg"].update(width=64, layers=2, head_width=32)
    vit["text_cfg"].update(NARROW_TEXT)
    timm_tower = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                                  "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                  "text_cfg": {**open_clip.get_model_config("ViT-B-16")["text_cfg"], **NARROW_TEXT}}
    return {"cxrcore-test-vit": vit, "cxrcore-test-timm": timm_tower}


def _radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric 8-bit image with hard edges (a bright marker, a collimation edge)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (np.sin(xx / 23.0 + seed) * np.cos(yy / 17.0) + 1) * 110 + 20
    img[h // 5: h // 5 + h // 6, w // 7: w // 7 + w // 9] = 255
    img[:, : w // 20] = 0
    return img.astype(np.uint8)


def _hub_cache(cache, repo_id: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout of one repository (refs/main -> snapshot), as hf_hub_download leaves it."""
    commit = "0" * 40
    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """(model name, preprocess) -> open_clip repository directory; and the hub cache holding the same repositories."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    (root / "configs").mkdir()
    for name, cfg in _model_cfgs().items():
        (root / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    out = {}
    for name, cfg in _model_cfgs().items():
        torch.manual_seed(0)
        model = open_clip.create_model(name)
        for pp_name, pp in PREPROCESS.items():
            d = root / f"{name}-{pp_name}"
            d.mkdir()
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
            (d / CONFIG_FILE).write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
            _hub_cache(root / "hub", f"cxrcore-test/{name}-{pp_name}", {f.name: f.read_bytes() for f in d.iterdir()})
            out[name, pp_name] = d
    return out, root / "hub"


@pytest.fixture
def offline_hub(repos, monkeypatch):
    import huggingface_hub.constants as c

    _, cache = repos
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def _reference(source: str):
    """open_clip's own model and eval preprocess for ``source`` (a 'local-dir:' or 'hf-hub:' name)."""
    model, _, preprocess = open_clip.create_model_and_transforms(source)
    return model.eval(), preprocess


CASES = [(m, p) for m in _model_cfgs() for p in PREPROCESS]


@pytest.fixture(scope="module")
def loaded(repos):
    """(model, preprocess) -> (cxrcore encoder via open_clip:local-dir:, open_clip model, open_clip preprocess)."""
    dirs, _ = repos
    cache = {}

    def get(case):
        if case not in cache:
            d = dirs[case]
            model, pre = _reference(f"local-dir:{d}")
            cache[case] = (load_encoder(f"open_clip:local-dir:{d}"), model, pre)
        return cache[case]

    return get


# -- ids and specs -----------------------------------------------------------------------------------------
def test_check_encoders_accepts_open_clip_ids_and_says_the_forms():
    # before: ValueError "unknown encoder(s) ['open_clip:ViT-B-16']; accepted: [...] or 'timm:<model name>' / 'hf:<model id>'"
    assert check_encoders(["open_clip:ViT-B-16"]) == ["open_clip:ViT-B-16"]
    assert check_encoders("open_clip:hf-hub:org/repo") == ["open_clip:hf-hub:org/repo"]
    with pytest.raises(ValueError, match=r"open_clip:<model name>@<pretrained tag>.*open_clip:local-dir"):
        check_encoders(["openclip:ViT-B-16"])


@pytest.mark.parametrize("key, want", [
    ("open_clip:ViT-B-16", (None, "ViT-B-16", None)),
    ("open_clip:ViT-B/16@laion2b_s34b_b88k", (None, "ViT-B-16", "laion2b_s34b_b88k")),  # open_clip's '/' -> '-'
    ("open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
     ("hf-hub", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", None)),
    ("open_clip:local-dir:/data/my model", ("local-dir", "/data/my model", None)),
])
def test_id_syntax(key, want):
    assert parse_open_clip_key(key) == want


def test_vit_b_16_spec_comes_from_open_clips_config():
    spec = encoder_spec("open_clip:ViT-B-16")
    assert (spec.family, spec.input_size, spec.patch_size, spec.embed_dim, spec.grid) == ("open_clip", 224, 16, 768, (14, 14))
    assert (spec.geometry, spec.resize_short, spec.interpolation) == ("center_crop", 224, "bicubic")
    assert spec.mean == open_clip.OPENAI_DATASET_MEAN and spec.std == open_clip.OPENAI_DATASET_STD
    assert spec.global_pool == "cls" and spec.has_cls_token and spec.num_register_tokens == 0
    assert abs(spec.num_params - 86.19e6) / 86.19e6 < 0.005  # open_clip ViT-B-16 image tower, counted on the meta device
    assert "after ln_post" in spec.token_layout and "before the 768->512 projection" in spec.cls_embedding
    assert spec.weights == ""  # an architecture: weights come with a tag or weights=


def test_a_pretrained_tag_brings_its_preprocessing_and_weights():
    spec = encoder_spec("open_clip:ViT-B-16-SigLIP@webli")
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    assert (spec.geometry, spec.resize_short) == ("resize", None)  # resize_mode 'squash'
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.weights == "hf-hub:" + cfg["hf_hub"].rstrip("/")
    assert spec.global_pool == "pooler" and not spec.has_cls_token  # timm 'map' head, no class token
    # without the tag, open_clip's defaults (what create_model_and_transforms gives without pretrained=)
    assert encoder_spec("open_clip:ViT-B-16-SigLIP").geometry == "center_crop"


@pytest.mark.parametrize("key, match", [
    ("open_clip:RN50", "ModifiedResNet"),
    ("open_clip:convnext_base", "ConvNeXt"),
    ("open_clip:coca_ViT-B-32", "attentional pooler"),
    ("open_clip:ViTamin-S", "convolutional stem"),
    ("open_clip:ViT-SO400M-14-SigLIP-384", "not a multiple of the patch size 14"),
    ("open_clip:ViT-B-16@openai", r"quick_gelu.*open_clip:ViT-B-16-quickgelu@openai"),
    ("open_clip:ViT-B-16@no-such-tag", "laion2b_s34b_b88k"),
    ("open_clip:no-such-model", "open_clip.list_models"),
    ("open_clip:", "open_clip:<model name>@<pretrained tag>"),
])
def test_what_cannot_be_wrapped_is_refused_saying_why(key, match):
    with pytest.raises((ValueError, KeyError), match=match):
        encoder_spec(key)


def test_longest_resize_mode_is_refused(repos, tmp_path):
    dirs, _ = repos
    d = tmp_path / "longest"
    d.mkdir()
    cfg = json.loads((dirs["cxrcore-test-vit", "shortest"] / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**cfg, "preprocess_cfg": {"resize_mode": "longest", "fill_color": 0}}))
    with pytest.raises(ValueError, match=r"resize_mode='longest'.*fill_color=0.*pads before it resizes"):
        encoder_spec(f"open_clip:local-dir:{d}")


def test_biomedclip_registry_spec_is_what_the_open_clip_family_derives():
    from cxrcore.encoders.biomedclip import BIOMEDCLIP_OPEN_CLIP_CONFIG
    from cxrcore.encoders.openclip import preprocess_config

    spec = REGISTRY["biomedclip"]
    f = spec_fields({"model_cfg": BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"],
                     "preprocess_cfg": preprocess_config(BIOMEDCLIP_OPEN_CLIP_CONFIG["preprocess_cfg"])}, "biomedclip")
    for k in ("input_size", "patch_size", "embed_dim", "geometry", "interpolation", "resize_short", "mean", "std",
              "num_register_tokens", "has_cls_token", "global_pool"):
        assert f[k] == getattr(spec, k), k


# -- pixels: open_clip's own preprocess ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids="-".join)
@pytest.mark.parametrize("hw", MARGINS + RESAMPLED, ids=str)
def test_pixels_are_open_clips_preprocess_to_the_grey_level(loaded, case, hw):
    enc, _, pre = loaded(case)
    img = _radiograph(*hw)
    ref = pre(Image.fromarray(img).convert("RGB"))[None]
    x, _ = enc.preprocess([img])
    assert x.shape == ref.shape
    std = torch.tensor(enc.spec.std).view(1, 3, 1, 1)
    # in grey levels of the 8-bit image: 0 (float rounding of the normalisation only)
    assert float(((x - ref) * std * 255).abs().max()) < 1e-3


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_sixteen_bit_pixels_are_open_clips_tensor_pipeline(loaded, case):
    enc, _, pre = loaded(case)
    img = (_radiograph(700, 1003).astype(np.uint16) * 257 + np.arange(1003, dtype=np.uint16)[None] % 200)
    t = torch.from_numpy(img.astype(np.float32) / 65535)[None].expand(3, -1, -1)
    x, _ = enc.preprocess([img])
    torch.testing.assert_close(x, pre(t)[None], rtol=0, atol=1e-5)


# -- tokens: open_clip's forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("pp", list(PREPROCESS))
def test_vit_grid_is_output_tokens_and_cls_is_the_pooled_embedding_before_proj(loaded, pp):
    enc, model, pre = loaded(("cxrcore-test-vit", pp))
    img = _radiograph(300, 411)
    pixels = pre(Image.fromarray(img).convert("RGB"))[None]
    v = model.visual
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        v.output_tokens = True
        try:
            projected, tokens = v(pixels)
        finally:
            v.output_tokens = False
        cls, grid = enc.forward_tokens(pixels)
        # what the cls mode is, by construction: the class token after ln_post
        class_token = v.ln_post(v.transformer(v._embeds(pixels)))[:, 0]
    assert grid.shape == (1, 14, 14, 64) and cls.shape == (1, 64)
    torch.testing.assert_close(grid.reshape(1, 196, 64), tokens, rtol=0, atol=0)
    torch.testing.assert_close(cls, class_token, rtol=0, atol=0)
    torch.testing.assert_close(cls @ v.proj, projected, rtol=0, atol=0)
    torch.testing.assert_close(projected, image_features, rtol=0, atol=0)
    # the whole pipeline (8-bit image in) against open_clip's (PIL image in)
    out = enc.encode([img], return_grid=True)
    np.testing.assert_allclose(out.cls @ v.proj.detach().numpy(), image_features.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.grid.reshape(1, 196, 64), tokens.numpy(), rtol=0, atol=1e-5)


def test_timm_trunk_grid_drops_the_cls_token_and_cls_is_the_trunks_pooled_embedding(loaded):
    enc, model, pre = loaded(("cxrcore-test-timm", "shortest"))
    img = _radiograph(411, 300)
    pixels = pre(Image.fromarray(img).convert("RGB"))[None]
    trunk = model.visual.trunk
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        tokens = trunk.forward_features(pixels)
        cls, grid = enc.forward_tokens(pixels)
        head = model.visual.head(cls)
    assert trunk.num_prefix_tokens == 1 and tokens.shape == (1, 1 + 196, 192)
    torch.testing.assert_close(grid.reshape(1, 196, 192), tokens[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(cls, tokens[:, 0], rtol=0, atol=0)  # timm 'token' pooling: the CLS token
    torch.testing.assert_close(head, image_features, rtol=0, atol=0)


def test_hub_id_offline_is_the_same_model_as_the_directory(repos, offline_hub, loaded):
    """open_clip:hf-hub:<id> from the Hugging Face cache (HF_HUB_OFFLINE): open_clip's own hub path reads the same files."""
    key = "open_clip:hf-hub:cxrcore-test/cxrcore-test-vit-squash"
    spec = encoder_spec(key)
    assert spec.weights == "hf-hub:cxrcore-test/cxrcore-test-vit-squash" and spec.geometry == "resize"
    enc = load_encoder(key)
    model, pre = _reference("hf-hub:cxrcore-test/cxrcore-test-vit-squash")
    img = _radiograph(300, 411)
    pixels = pre(Image.fromarray(img).convert("RGB"))[None]
    x, _ = enc.preprocess([img])
    torch.testing.assert_close(x, pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        want = model.encode_image(pixels)
    np.testing.assert_allclose(enc.encode([img]).cls @ model.visual.proj.detach().numpy(), want.numpy(), rtol=0, atol=1e-5)
    local, _, _ = loaded(("cxrcore-test-vit", "squash"))
    np.testing.assert_array_equal(enc.encode([img]).cls, local.encode([img]).cls)
    # and the same repository's weights under the architecture's id (preprocessing as that id says)
    by_arch = load_encoder("open_clip:cxrcore-test-vit", weights="hf-hub:cxrcore-test/cxrcore-test-vit-shortest")
    np.testing.assert_array_equal(by_arch.encode([img]).cls, loaded(("cxrcore-test-vit", "shortest"))[0].encode([img]).cls)


# -- loading: dtype, device, weights errors ------------------------------------------------------------------
def test_weights_load_in_the_requested_dtype_without_a_float32_copy(repos):
    dirs, _ = repos
    enc = load_encoder(f"open_clip:local-dir:{dirs['cxrcore-test-vit', 'shortest']}", dtype="bfloat16")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert enc.provenance()["weights_dtype"] == "bfloat16"
    out = enc.encode([_radiograph(300, 260)], [[(20, 20, 120, 120)]])
    assert out.cls.dtype == np.float32 and np.isfinite(out.cls).all()


def test_an_architecture_id_without_weights_says_what_to_give(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"weights=.*open_clip:ViT-B-16@<tag>.*laion2b_s34b_b88k"):
        load_encoder("open_clip:ViT-B-16")
    with pytest.raises(ValueError, match=r"is an open_clip pretrained tag; name it in the id, 'open_clip:ViT-B-16@laion2b"):
        load_encoder("open_clip:ViT-B-16", weights="laion2b_s34b_b88k")
    with pytest.raises(WeightsUnavailableError, match="weights="):
        load_encoder("open_clip:ViT-B-16", weights=str(tmp_path / "nowhere"))


def test_weights_of_another_tower_are_refused(repos):
    dirs, _ = repos
    with pytest.raises(ValueError, match=r"another image tower.*open_clip:local-dir:"):
        load_encoder("open_clip:ViT-B-16", weights=str(dirs["cxrcore-test-vit", "shortest"]))
    # same tower, other preprocessing: run it under its own id
    with pytest.raises(ValueError, match="preprocesses otherwise"):
        load_encoder("open_clip:cxrcore-test-vit", weights=str(dirs["cxrcore-test-vit", "squash"]))


# -- stand-ins, save/load, input size --------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["open_clip:ViT-B-16", "open_clip:ViT-B-16-SigLIP@webli", "open_clip:EVA02-B-16"])
def test_stand_in_saves_and_reloads_through_the_weights_path(key, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder(key, stand_in=True)
    full = type(enc).build_meta(encoder_spec(key))
    assert type(enc.model) is type(full) and sum(p.numel() for p in enc.model.parameters()) < 5e6
    enc.save(tmp_path / "w")
    back = load_encoder(key, weights=str(tmp_path / "w"))
    assert back.stand_in and type(back.model) is type(enc.model)
    img = [_radiograph(300, 260)]
    a, b = enc.encode(img, [[(5, 5, 50, 50)]]), back.encode(img, [[(5, 5, 50, 50)]])
    np.testing.assert_allclose(a.cls, b.cls, rtol=1e-5, atol=1e-6)  # the same tensors (kernels may pick other paths)
    np.testing.assert_allclose(a.roi_local, b.roi_local, rtol=1e-5, atol=1e-6)


def test_another_input_size_resamples_the_position_table_as_open_clip_does(tmp_path):
    from open_clip.model import resize_pos_embed

    enc = load_encoder("open_clip:ViT-B-16", stand_in=True)
    native = enc.model.positional_embedding.detach().clone()
    small = load_encoder("open_clip:ViT-B-16", stand_in=True, input_size=112)
    out = small.encode([_radiograph(300, 400)], [[(10, 10, 200, 200)]], return_grid=True)
    assert out.grid.shape[1:3] == (7, 7) == small.grid_shape and small.provenance()["input_size"] == 112
    # create_model(force_image_size=112) resizes a checkpoint's table with this function
    state = {"visual.positional_embedding": native}
    import types

    resize_pos_embed(state, types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(7, 7))))
    torch.testing.assert_close(small.model.positional_embedding.detach(), state["visual.positional_embedding"])
    small.save(tmp_path / "w")
    back = load_encoder("open_clip:ViT-B-16", weights=str(tmp_path / "w"))
    assert back.input_size == 112
    np.testing.assert_array_equal(back.encode([_radiograph(300, 400)]).cls, small.encode([_radiograph(300, 400)]).cls)


def test_biomedclip_weights_read_back_as_an_open_clip_local_dir(tmp_path, monkeypatch):
    """The registered key and the generic id are one family: a directory laid out as BiomedCLIP's repository
    (its published open_clip_config.json, a full-size random tower) gives the same pixels and tokens either way."""
    from safetensors.torch import save_file

    from cxrcore.encoders.biomedclip import BIOMEDCLIP_OPEN_CLIP_CONFIG
    from cxrcore.encoders.openclip import build_visual

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    visual = build_visual(BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"])
    d = tmp_path / "biomedclip"
    d.mkdir()
    save_file({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    (d / CONFIG_FILE).write_text(json.dumps(BIOMEDCLIP_OPEN_CLIP_CONFIG))
    a = load_encoder("biomedclip", weights=str(d))
    b = load_encoder(f"open_clip:local-dir:{d}")
    assert (a.spec.family, b.spec.family) == ("open_clip_timm", "open_clip")
    img = [_radiograph(300, 260)]
    torch.testing.assert_close(a.preprocess(img)[0], b.preprocess(img)[0], rtol=0, atol=0)
    np.testing.assert_array_equal(a.encode(img).cls, b.encode(img).cls)


# -- the audit runs on an open_clip id ----------------------------------------------------------------------------
TINY_PANEL = """name: tiny-audit
cells:
  - kind: nodule
    footprint_px: [12, 48]
    strength: 0.4
"""


@pytest.mark.filterwarnings("ignore::cxrcore.stats.FewClustersWarning")  # 8 images: too few clusters, as it says
def test_cxrcore_audit_runs_on_an_open_clip_id(tmp_path, capsys):
    """`cxrcore audit open_clip:ViT-B-16 --stand-in` (a reduced sweep; --quick is the same path with more images)."""
    from cxrcore import audit as A

    panel = tmp_path / "tiny.yml"
    panel.write_text(TINY_PANEL)
    out = tmp_path / "out"
    argv = ["open_clip:ViT-B-16", "--stand-in", "--panel", str(panel), "--n-images", "8", "--n-boot", "20",
            "--n-splits", "2", "--image-size", "128", "--input-size", "112", "--num-workers", "0", "--no-progress",
            "--out", str(out)]
    assert A.main(argv) == 0, capsys.readouterr().err
    rec = json.loads((out / "audit.json").read_text())
    A.validate_record(rec)
    assert rec["encoder"]["key"] == "open_clip:ViT-B-16" and rec["encoder"]["family"] == "open_clip"
    assert rec["encoder"]["grid"] == [7, 7] and rec["stand_in"]
    assert {r["pooling"] for r in rec["auc"]} == {"cls", "patch_mean", "roi_local"}
