"""The synthetic phantom: deterministic, radiograph-like statistics, findings that change what they should."""

import numpy as np
import pytest

from cxrcore.cohorts.synthetic import SYNTHETIC_FINDINGS, SyntheticCohort, make_phantom, power_law_noise


def test_phantom_is_deterministic_and_seed_dependent():
    a, b, c = make_phantom(3, 256).image, make_phantom(3, 256).image, make_phantom(4, 256).image
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [512, 1024])
def test_phantom_range_and_anatomy(size):
    ph = make_phantom(1, size)
    img = ph.image
    assert img.shape == (size, size) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    # lungs (air) are darker than the heart and the abdomen below the diaphragm
    lung = img[ph.lung_mask].mean()
    heart = img[ph.heart_mask].mean()
    abdomen = img[int(0.92 * size):, size // 3: 2 * size // 3].mean()
    assert lung + 0.2 < heart and lung + 0.2 < abdomen
    # two lung fields, each a sizeable part of the image
    from scipy import ndimage

    labels, n = ndimage.label(ph.lung_mask)
    sizes = sorted(np.bincount(labels.ravel())[1:], reverse=True)
    assert n >= 2 and sizes[1] > 0.04 * size * size


def test_texture_power_spectrum_falls_like_a_power_law():
    rng = np.random.default_rng(0)
    f = power_law_noise((256, 256), 3.0, rng)
    spec = np.abs(np.fft.rfft2(f)) ** 2
    fy = np.fft.fftfreq(256)[:, None]
    fx = np.fft.rfftfreq(256)[None, :]
    r = np.sqrt(fx ** 2 + fy ** 2)
    bins = np.geomspace(0.01, 0.4, 12)
    idx = np.digitize(r, bins)
    power = np.array([spec[idx == k].mean() for k in range(1, len(bins))])
    centre = np.sqrt(bins[1:] * bins[:-1])
    slope = np.polyfit(np.log(centre), np.log(power), 1)[0]
    assert -3.5 < slope < -2.5, slope  # white noise would give 0


def test_cardiomegaly_enlarges_the_heart_and_effusion_brightens_a_base():
    normal = make_phantom(7, 384, ctr=0.42)
    big = make_phantom(7, 384, ctr=0.58)
    assert big.heart_mask.sum() > 1.3 * normal.heart_mask.sum()
    eff = make_phantom(7, 384, ctr=0.42, effusion="left")
    base = slice(int(0.6 * 384), int(0.8 * 384))
    right_half = slice(384 // 2, 384)  # patient left is image right
    assert eff.image[base, right_half].mean() > normal.image[base, right_half].mean() + 0.01
    with pytest.raises(ValueError, match="effusion"):
        make_phantom(7, 128, effusion="both")


def test_synthetic_cohort_contract():
    c = SyntheticCohort(n_images=6, seed=1, size=(256, 320))
    md = c.metadata
    assert list(md.columns[:5]) == ["image_id", "patient_id", "study_id", "view", "path"]
    assert md["patient_id"].is_unique and len(c) == 6
    assert set(c.label_columns) == set(SYNTHETIC_FINDINGS)
    for f in SYNTHETIC_FINDINGS:
        assert set(md[f].unique()) <= {0.0, 1.0}
    img = c.read_image(2)
    assert img.shape == (md.loc[2, "height"], md.loc[2, "width"])
    assert np.array_equal(img, SyntheticCohort(n_images=6, seed=1, size=(256, 320)).read_image(2))
    with pytest.raises(ValueError, match="n_images"):
        SyntheticCohort(n_images=0)
