"""cxrcore: cls, patch_mean and roi_local pooling of frozen chest-radiograph encoders from one forward pass."""

__version__ = "0.1.0"
