"""cxrcore.io: every format to 2-D float32 in [0, 1], full bit depth kept, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrcore.io import ImageMissingError, ImageReadError, ImageSize, is_dicom, read_image, read_image_size
from fixtures_cohorts import ramp, write_dicom, write_jpeg, write_png


def _check(arr, shape):
    assert arr.dtype == np.float32 and arr.shape == shape
    assert 0.0 <= arr.min() and arr.max() <= 1.0


def test_png_8bit(tmp_path):
    a = ramp(8, 10)
    out = read_image(write_png(tmp_path / "a.png", a))
    _check(out, (8, 10))
    np.testing.assert_allclose(out, a / 255.0, atol=1e-7)


def test_png_16bit_keeps_all_bits(tmp_path):
    a = ramp(8, 10, 65535, np.uint16)
    a[0, 1] = 1  # a one-count step must survive: no reduction to 8 bits
    out = read_image(write_png(tmp_path / "a.png", a))
    _check(out, (8, 10))
    np.testing.assert_allclose(out, a / 65535.0, rtol=0, atol=1e-7)
    assert out[0, 1] > 0.0


def test_png_16bit_more_than_256_levels(tmp_path):
    a = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 7
    out = read_image(write_png(tmp_path / "a.png", a))
    assert len(np.unique(out)) == 1600


def test_jpeg(tmp_path):
    a = ramp(16, 16)
    out = read_image(write_jpeg(tmp_path / "a.jpg", a))
    _check(out, (16, 16))
    assert np.abs(out - a / 255.0).max() < 0.05  # lossy


def test_rgb_saved_grey_is_one_channel_exactly(tmp_path):
    a = ramp(8, 10)
    out = read_image(write_png(tmp_path / "a.png", np.stack([a, a, a], -1)))
    np.testing.assert_array_equal(out, (a / 255.0).astype(np.float32))


def test_true_colour_is_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    out = read_image(write_png(tmp_path / "red.png", rgb))
    np.testing.assert_allclose(out, 0.299, atol=1e-6)


def test_rgba_and_palette(tmp_path):
    a = ramp(6, 6)
    rgba = np.stack([a, a, a, np.full_like(a, 255)], -1)
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "a.png", rgba)), (a / 255.0).astype(np.float32))
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (6, 6)


def test_dicom_monochrome2_12bit_scaled_by_bits_stored(tmp_path):
    a = np.array([[0, 1024], [2048, 4095]], np.uint16)
    out = read_image(write_dicom(tmp_path / "a.dcm", a, bits_stored=12))
    np.testing.assert_allclose(out, a / 4095.0, atol=1e-6)


def test_dicom_monochrome1_inverted(tmp_path):
    a = np.array([[0, 1024], [2048, 4095]], np.uint16)
    out = read_image(write_dicom(tmp_path / "a.dcm", a, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(out, 1.0 - a / 4095.0, atol=1e-6)


def test_dicom_16bit_full_depth(tmp_path):
    a = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    out = read_image(write_dicom(tmp_path / "a.dcm", a, bits_stored=16))
    np.testing.assert_allclose(out, a / 65535.0, atol=1e-6)
    assert len(np.unique(out)) == 64 * 64


def test_dicom_without_suffix_is_sniffed(tmp_path):
    a = np.array([[0, 4095]], np.uint16)
    p = write_dicom(tmp_path / "a.dcm", a)
    q = tmp_path / "IM0001"
    q.write_bytes(p.read_bytes())
    assert is_dicom(q)
    np.testing.assert_allclose(read_image(q), [[0.0, 1.0]], atol=1e-6)


def test_dicom_window_applied(tmp_path):
    # Window centre 2048 width 1024 (linear, PS3.3 C.11.2.1.2): <=1536 -> 0, >=2560 -> max.
    a = np.array([[0, 1536, 2048, 2560, 4095]], np.uint16)
    out = read_image(write_dicom(tmp_path / "w.dcm", a, bits_stored=12, window=(2048, 1024)))
    assert out[0, 0] == pytest.approx(0.0) and out[0, 1] == pytest.approx(0.0, abs=2e-3)
    assert out[0, 2] == pytest.approx(0.5, abs=2e-3)
    assert out[0, 3] == pytest.approx(1.0, abs=2e-3) and out[0, 4] == pytest.approx(1.0)


def test_dicom_voi_lut_table(tmp_path):
    # An 8-bit-output VOI LUT that maps stored value v (0..3) to 255 - 85 v: output range 0..255.
    table = np.array([255, 170, 85, 0])
    a = np.array([[0, 1, 2, 3]], np.uint16)
    out = read_image(write_dicom(tmp_path / "l.dcm", a, bits_stored=12, voi_lut=(0, 8, table)))
    np.testing.assert_allclose(out, [[1.0, 170 / 255, 85 / 255, 0.0]], atol=1e-6)


def test_dicom_modality_rescale_range_not_clipped(tmp_path):
    # CT-style rescale: stored 0..4095 -> -1024..3071; scaled by that declared range.
    a = np.array([[0, 1024, 4095]], np.uint16)
    out = read_image(write_dicom(tmp_path / "r.dcm", a, bits_stored=12, rescale=(1.0, -1024.0)))
    np.testing.assert_allclose(out, [[0.0, 1024 / 4095, 1.0]], atol=1e-6)


def test_read_image_size_header_only(tmp_path):
    assert read_image_size(write_png(tmp_path / "a.png", ramp(8, 10))) == ImageSize(width=10, height=8)
    assert read_image_size(write_dicom(tmp_path / "a.dcm", np.zeros((7, 5), np.uint16))) == (5, 7)


# -- errors: one per bad-input kind --------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ImageMissingError, match="nope.png.*not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):
        read_image_size(tmp_path / "nope.png")


def test_truncated_png(tmp_path):
    p = write_png(tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match=r"t\.png: corrupt or truncated"):
        read_image(p)


def test_truncated_jpeg(tmp_path):
    p = write_jpeg(tmp_path / "t.jpg", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=r"t\.jpg"):
        read_image(p)


def test_unsupported_format(tmp_path):
    p = tmp_path / "page.png"
    p.write_text("<html>403 Forbidden</html>")
    with pytest.raises(ImageReadError, match="not a readable image format"):
        read_image(p)
    with pytest.raises(ImageReadError, match="page.png"):
        read_image_size(p)


def test_truncated_dicom_pixels(tmp_path):
    p = write_dicom(tmp_path / "t.dcm", np.zeros((32, 32), np.uint16))
    p.write_bytes(p.read_bytes()[:-500])
    with pytest.raises(ImageReadError, match=r"t\.dcm"):
        read_image(p)


def test_not_dicom_with_dcm_suffix(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"\x00" * 10)
    with pytest.raises(ImageReadError, match=r"x\.dcm"):
        read_image(p)


def test_dicom_without_pixels(tmp_path):
    import pydicom

    p = write_dicom(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(tmp_path / "b.dcm")
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "b.dcm")


def test_image_read_error_is_value_error():
    assert issubclass(ImageReadError, ValueError)
