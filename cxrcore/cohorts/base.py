"""The cohort contract every data source fits.

Modelled on torchxrayvision's dataset base: a row-aligned metadata frame with
harmonised columns, labels as 1 / 0 / NaN (unknown), lazily read images, and a tidy
boxes frame where the source has boxes. Metadata and boxes never touch image files.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

#: Columns every cohort's ``metadata`` has, in this order, before its label columns.
METADATA_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "study_id", "view", "path")
#: Columns of every cohort's ``boxes`` frame (one row per box, original pixels).
BOX_COLUMNS: tuple[str, ...] = ("image_id", "class", "x1", "y1", "x2", "y2", "width", "height", "area", "stratum")


class Cohort:
    """Base class: a set of radiographs with harmonised metadata.

    Subclasses set ``name``, ``metadata`` (a DataFrame with :data:`METADATA_COLUMNS`
    then one float column per label in ``label_columns``), ``boxes`` (a DataFrame with
    :data:`BOX_COLUMNS` or ``None``) and implement :meth:`read_image`.
    ``exclusions`` is a tidy frame ``reason -> count`` of the items left out and why.
    ``synthetic`` is True for generated cohorts so every figure can say so.
    """

    name: str = "cohort"
    synthetic: bool = False
    #: Whether the book may show this cohort's pixels (False for credentialed data).
    pixels_public: bool = True
    label_columns: list[str]
    metadata: pd.DataFrame
    boxes: pd.DataFrame | None = None

    def __init__(self) -> None:
        self.label_columns = []
        self._exclusions: dict[str, int] = {}

    # -- images -------------------------------------------------------------------------
    def read_image(self, index: int) -> np.ndarray:
        """Return row ``index``'s image as a 2-D float32 array in [0, 1] (full bit depth kept)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.metadata)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.read_image(i)

    # -- exclusions ---------------------------------------------------------------------
    def exclude(self, reason: str, count: int = 1) -> None:
        """Count ``count`` items left out for ``reason``."""
        self._exclusions[reason] = self._exclusions.get(reason, 0) + int(count)

    @property
    def exclusions(self) -> pd.DataFrame:
        """Items left out, as a tidy frame with columns ``reason`` and ``count``."""
        return pd.DataFrame(
            {"reason": list(self._exclusions), "count": list(self._exclusions.values())},
            columns=["reason", "count"],
        )

    def __repr__(self) -> str:
        nb = 0 if self.boxes is None else len(self.boxes)
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, boxes={nb}, labels={self.label_columns})"
