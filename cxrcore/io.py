"""Reading radiographs into 2-D float32 arrays in [0, 1], keeping the full bit depth.

PNG (8- and 16-bit), JPEG and anything else Pillow opens, and DICOM through pydicom
(Modality LUT, then VOI LUT or window, then MONOCHROME1 inverted). No model knowledge
lives here: resizing and the encoder's own normalisation happen downstream.

Scaling rule, one for every format: divide by the range the file *declares*, not by
the range the pixels happen to use, so a dark image stays dark and two images of one
cohort stay comparable. PNG/JPEG: 8-bit / 255, 16-bit / 65535. DICOM: the output range
of the last LUT applied (pydicom's own convention: ``BitsStored`` and
``PixelRepresentation`` through the rescale, or the VOI LUT's bit count), widened to the
pixels' own minimum and maximum if they fall outside it, so nothing is ever clipped.

Colour: a grey image saved as RGB (all channels equal) keeps one channel exactly; a
truly colour image is reduced to ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B, the
rule Pillow's ``convert("L")`` uses) in float, without rounding to 8 bits. Alpha is
ignored.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageReadError", "ImageMissingError", "ImageSize", "read_image", "read_image_size", "is_dicom"]

DICOM_SUFFIXES = (".dcm", ".dicom")
#: Suffixes a cohort may treat as images without opening them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg") + DICOM_SUFFIXES

# BT.601 luma weights, as in Pillow's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# What Pillow and pydicom raise for a broken file. Pillow reports a broken PNG chunk as
# SyntaxError and a bad zlib stream as zlib.error; pydicom reports missing or short
# pixel data as AttributeError / ValueError and an absent decoder as RuntimeError.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)
_DICOM_ERRORS = (OSError, ValueError, AttributeError, RuntimeError, EOFError, KeyError, TypeError, NotImplementedError)


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file and what to do."""


class ImageMissingError(ImageReadError, FileNotFoundError):
    """The image file does not exist."""


class ImageSize(NamedTuple):
    """Image size in pixels, read from the header only."""

    width: int
    height: int


def _fail(path: Path, what: str, fix: str, cause: BaseException | None = None) -> ImageReadError:
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ImageReadError(f"{path}: {what}{detail}. {fix}")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise ImageMissingError(
            f"{path}: image file not found. Check the cohort's data_root and that the download "
            "finished; or build the cohort with on_error='exclude' to count it as missing."
        )


def is_dicom(path: str | os.PathLike) -> bool:
    """True if ``path`` is DICOM: a ``.dcm``/``.dicom`` suffix or the ``DICM`` magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# -- Pillow formats -----------------------------------------------------------------------
def _to_grey(arr: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [H, W]: one channel when the channels agree, BT.601 luma otherwise."""
    rgb = arr[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    return rgb.astype(np.float64) @ _LUMA


def _pil_to_float(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode in ("L", "LA"):
        arr = np.asarray(im)
        arr = arr[..., 0] if arr.ndim == 3 else arr
        return (arr.astype(np.float32) / 255.0).astype(np.float32)
    if mode.startswith("I;16"):
        # 16-bit grey PNG: keep all 16 bits, divide by the container's maximum.
        return (np.asarray(im).astype(np.float64) / 65535.0).astype(np.float32)
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise _fail(path, f"32-bit integer pixels outside 0..65535 (min {arr.min():g}, max {arr.max():g})",
                        "Save the image as 8- or 16-bit PNG or as DICOM with its rescale tags.")
        return (arr / 65535.0).astype(np.float32)
    if mode == "F":
        arr = np.asarray(im).astype(np.float32)
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise _fail(path, "floating-point pixels outside [0, 1]",
                        "Save the image as 8- or 16-bit PNG or as DICOM with its rescale tags.")
        return arr
    if mode in ("RGB", "RGBA"):
        return (_to_grey(np.asarray(im)) / 255.0).astype(np.float32)
    # Palette, CMYK, YCbCr, LAB ...: Pillow's RGB conversion is exact for 8-bit sources.
    return (_to_grey(np.asarray(im.convert("RGB"))) / 255.0).astype(np.float32)


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            return _pil_to_float(im, path)
    except UnidentifiedImageError as e:
        raise _fail(path, "not a readable image format",
                    "Use PNG, JPEG or DICOM; check the file is not an HTML error page or a partial download.", e) from e
    except ImageReadError:
        raise
    except _PIL_ERRORS as e:
        raise _fail(path, "corrupt or truncated image",
                    "Download this file again (compare its checksum with the provider's list) "
                    "or exclude it with on_error='exclude'.", e) from e


# -- DICOM --------------------------------------------------------------------------------
def _dicom_stored_range(ds) -> tuple[float, float]:
    """Range of the stored values after the Modality LUT, as pydicom's windowing assumes."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "ModalityLUTSequence" in ds:
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**lut_bits - 1)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except InvalidDicomError as e:
        raise _fail(path, "not a DICOM file", "Check the file is DICOM (Part 10) and not a partial download.", e) from e
    except _DICOM_ERRORS as e:
        raise _fail(path, "corrupt or truncated DICOM header", "Download this file again or exclude it.", e) from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _fail(path, "DICOM file has no pixel data (a structured report or presentation state?)",
                    "Point the cohort at the image objects only.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise _fail(path, f"multi-frame DICOM ({frames} frames); a radiograph has one",
                    "Split the frames into separate files first.")
    try:
        raw = ds.pixel_array
    except _DICOM_ERRORS as e:
        raise _fail(path, "pixel data could not be decoded (truncated, or compressed with a codec not installed)",
                    "Download the file again; for JPEG 2000 / JPEG-LS install pylibjpeg with its plugins or "
                    "python-gdcm.", e) from e

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.ndim == 3:  # colour DICOM (rare for radiographs): luma, 8-bit per channel assumed
        bits = int(ds.get("BitsStored", 8))
        return (_to_grey(raw) / float(2**bits - 1)).astype(np.float32)

    mod = apply_modality_lut(raw, ds)
    arr = np.asarray(mod, dtype=np.float64)
    lo, hi = _dicom_stored_range(ds)
    if "VOILUTSequence" in ds:
        # A LUT is indexed by integers; give it integers when the rescale kept them whole.
        if mod.dtype.kind == "f" and np.array_equal(mod, np.round(mod)):
            mod = mod.astype(np.int64)
        arr = np.asarray(apply_voi_lut(mod, ds, prefer_lut=True), dtype=np.float64)
        lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # Windowing maps into the same range as the stored values (pydicom's convention).
        arr = np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
    if arr.size:
        # Never clip: a header that understates the range widens to the real data.
        lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 stores air bright; the contract has air dark.
    return out.astype(np.float32)


# -- public -------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` (PNG, JPEG, DICOM ...) as a 2-D float32 array in [0, 1], air dark.

    Raises :class:`ImageMissingError` for a missing file and :class:`ImageReadError`
    for an unsupported, corrupt or truncated one; both name the file.
    """
    path = Path(path)
    _check_exists(path)
    arr = _read_dicom(path) if is_dicom(path) else _read_pil(path)
    if arr.ndim != 2 or arr.size == 0:
        raise _fail(path, f"expected a 2-D image, got shape {arr.shape}", "Check the file is a single radiograph.")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_image_size(path: str | os.PathLike) -> ImageSize:
    """Width and height from the header only (no pixel decoding): cheap checks on many files."""
    path = Path(path)
    _check_exists(path)
    if is_dicom(path):
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() in DICOM_SUFFIXES)
            return ImageSize(int(ds.Columns), int(ds.Rows))
        except InvalidDicomError as e:
            raise _fail(path, "not a DICOM file", "Check the file is DICOM (Part 10).", e) from e
        except _DICOM_ERRORS as e:
            raise _fail(path, "DICOM header unreadable or without Rows/Columns", "Download this file again.", e) from e
    try:
        with Image.open(path) as im:  # lazy: reads the header, not the pixels
            w, h = im.size
            return ImageSize(int(w), int(h))
    except UnidentifiedImageError as e:
        raise _fail(path, "not a readable image format", "Use PNG, JPEG or DICOM.", e) from e
    except _PIL_ERRORS as e:
        raise _fail(path, "corrupt image header", "Download this file again or exclude it.", e) from e


def to_unit_float(image: np.ndarray, index: int = 0) -> np.ndarray:
    """Scale a 2-D grey image to float32 in [0, 1] by its dtype, keeping every bit.

    uint8 / 255, uint16 / 65535, bool as 0/1; floats must already be in [0, 1]
    (``cxrcore.io.read_image`` returns that). Done by hand because PIL's
    ``convert("RGB")`` clips 16-bit data to 8 bits.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4:
        raise ValueError(
            f"image {index} has shape {a.shape}: expected a 2-D grey array; convert colour-saved radiographs "
            "to one channel first (cxrcore.io.read_image does)"
        )
    if a.ndim != 2:
        raise ValueError(f"image {index} has shape {a.shape}: expected a 2-D grey array [H, W]")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ValueError(f"image {index} contains NaN or inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"image {index} is float with range [{lo:.4g}, {hi:.4g}]: expected [0, 1]; "
                "pass integer data as uint8/uint16, or rescale floats to [0, 1]"
            )
        return np.clip(a, 0.0, 1.0)
    raise ValueError(f"image {index} has dtype {a.dtype}: expected uint8, uint16 or float in [0, 1]")
