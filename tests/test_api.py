"""The public names the issues promise (notebooks, the book and users call these)."""

import inspect

import cxrcore
import cxrcore.cohorts as cohorts
import cxrcore.stats as stats


def test_encoder_registry_has_the_paper_encoders():
    assert {"rad-dino", "dinov2-b14", "dinov3-vit7b16", "biomedclip", "medsiglip-448", "dino-resnet50"} <= set(cxrcore.list_encoders())
    sig = inspect.signature(cxrcore.load_encoder)
    for p in ("weights", "stand_in", "device", "dtype"):
        assert p in sig.parameters
    spec = cxrcore.encoder_spec("rad-dino")
    for attr in ("input_size", "patch_size", "grid", "num_register_tokens", "embed_dim", "num_params", "gflops"):
        assert hasattr(spec, attr), attr


def test_cohort_classes_and_columns():
    for name in ("NIHChestXray14", "MIMICCXRJPG", "ManifestCohort", "ChestXDet10", "FolderCohort", "SyntheticCohort"):
        assert issubclass(getattr(cohorts, name), cohorts.Cohort), name
        assert getattr(cohorts, name).__doc__, f"{name} needs a docstring with citation and download location"
    assert cohorts.BOX_COLUMNS == ("image_id", "class", "x1", "y1", "x2", "y2", "width", "height", "area", "stratum")
    assert cohorts.METADATA_COLUMNS[:2] == ("image_id", "patient_id")


def test_stats_functions_exist():
    for name in ("auc", "delong", "delong_paired", "bootstrap_auc", "fdr_bh", "permutation_floor"):
        assert callable(getattr(stats, name)), name
    assert "method" in inspect.signature(stats.delong).parameters
