"""How faithful stored pixels are to the source: the measure ``verify`` reports and
``--target-ssim`` aims at.

SSIM is scikit-image's ``structural_similarity`` (7-pixel uniform window, data range
255) computed tile by tile on the chunk grid, its full map averaged over the three
channels; the tissue numbers average it over the pixels the tissue mask covers.
"""

from __future__ import annotations

import numpy as np

from .tissue import TissueMask


def ssim_map(stored: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (h, w), channels averaged, of two uint8 (3, h, w) tiles. A tile too
    small for a 3-pixel window scores 1 where it is identical and 0 where not."""
    from skimage.metrics import structural_similarity

    window = min(7, *stored.shape[1:])
    if window < 3:
        return np.full(stored.shape[1:], 1.0 if np.array_equal(stored, reference) else 0.0,
                       np.float32)
    window -= 1 - window % 2  # odd
    _, full = structural_similarity(stored, reference, channel_axis=0, data_range=255,
                                    full=True, win_size=window)
    return full.mean(axis=0)


def in_tissue(tissue: TissueMask, y: int, x: int, h: int, w: int, step: int = 1
              ) -> np.ndarray:
    """Which pixels of the (y, x, h, w) box of a level ``step`` x below level 0 the
    tissue mask covers, as a bool (h, w) array."""
    d = tissue.downsample
    rows = np.minimum((np.arange(y, y + h) * step) // d, tissue.mask.shape[0] - 1)
    cols = np.minimum((np.arange(x, x + w) * step) // d, tissue.mask.shape[1] - 1)
    return tissue.mask[np.ix_(rows, cols)]
