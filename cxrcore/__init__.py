"""cxrcore: cls, patch_mean and roi_local pooling of frozen chest-radiograph encoders from one forward pass."""

__version__ = "0.1.0"

from .encoders import WeightsUnavailableError, encoder_spec, list_encoders, load_encoder  # noqa: E402

__all__ = ["WeightsUnavailableError", "__version__", "encoder_spec", "list_encoders", "load_encoder"]
