"""The quality a rate-controlled encoder aims at: SSIM over a chunk's non-glass pixels.

Measured as ``ngff-convert verify`` measures a slide (scikit-image's SSIM, 7-pixel window,
averaged over the three channels), but over the pixels that are not pure white (255, 255,
255) in the original: the converter sets glass to exactly that fill value, and a flat
white area reconstructs with an SSIM of about 1, which would let a chunk that is mostly
glass pass with poorly coded tissue.
"""

from __future__ import annotations

import numpy as np

#: The window ``ngff-convert verify`` uses.
WINDOW = 7


def tissue_ssim(decoded: np.ndarray, original: np.ndarray) -> float:
    """Mean SSIM of ``decoded`` vs ``original`` (uint8, (3, H, W)) over non-white pixels
    of ``original``; 1.0 for an all-white original decoded exactly white enough to match."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise ImportError("dlwsi target_ssim measures quality with scikit-image: "
                          "pip install scikit-image") from None
    window = min(WINDOW, *original.shape[1:])
    window -= 1 - window % 2  # odd
    if window < 3:  # too small for a window: exact or not
        return 1.0 if np.array_equal(decoded, original) else 0.0
    _, full = structural_similarity(decoded, original, channel_axis=0, data_range=255,
                                    full=True, win_size=window)
    ssim_map = full.mean(axis=0)
    not_white = (original != 255).any(axis=0)
    return float(ssim_map[not_white].mean() if not_white.any() else ssim_map.mean())
