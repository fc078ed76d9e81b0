"""The quality a rate-controlled encoder aims at: SSIM over a chunk's non-glass pixels.

The SSIM is the one ``ngff-convert verify`` reports (scikit-image's
``structural_similarity`` with a 7-pixel uniform window, sample covariance, K1 0.01, K2
0.03, data range 255, its full map averaged over the three channels), computed here with
the original's local statistics kept between trials: rate control compares several
decodes of one chunk with the same original, and scikit-image would recompute them each
time (about 3x slower; ``tests/test_rate_control.py`` checks the two agree).

It is averaged over the pixels that are not pure white (255, 255, 255) in the original:
the converter sets glass to exactly that fill value, and flat white reconstructs with an
SSIM of about 1, which would let a chunk that is mostly glass pass with poorly coded
tissue.
"""

from __future__ import annotations

import numpy as np

#: The window ``ngff-convert verify`` uses.
WINDOW = 7
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def _uniform_filter() -> object:
    try:
        from scipy.ndimage import uniform_filter
    except ImportError:
        raise ImportError("dlwsi target_ssim measures quality with SciPy: "
                          "pip install scipy") from None
    return uniform_filter


class ReferenceSSIM:
    """SSIM of decoded versions of one original (uint8, (3, H, W)) against it."""

    def __init__(self, original: np.ndarray) -> None:
        self.original = original
        window = min(WINDOW, *original.shape[1:])
        self.window = window - (1 - window % 2)  # odd
        not_white = (original != 255).any(axis=0)
        self.weights = not_white if not_white.any() else np.ones_like(not_white)
        if self.window < 3:  # too small for a window: exact or not
            return
        self._filter = _uniform_filter()
        x = original.astype(np.float32)
        self.x = x
        self.ux = self._mean(x)
        self.vx = self._covariance(self._mean(x * x), self.ux, self.ux)

    def _mean(self, values: np.ndarray) -> np.ndarray:
        return self._filter(values, size=(1, self.window, self.window))

    def _covariance(self, mean_product: np.ndarray, mean_a: np.ndarray, mean_b: np.ndarray
                    ) -> np.ndarray:
        samples = self.window * self.window
        return samples / (samples - 1) * (mean_product - mean_a * mean_b)

    def __call__(self, decoded: np.ndarray) -> float:
        if self.window < 3:
            return 1.0 if np.array_equal(decoded, self.original) else 0.0
        y = decoded.astype(np.float32)
        uy = self._mean(y)
        vy = self._covariance(self._mean(y * y), uy, uy)
        vxy = self._covariance(self._mean(self.x * y), self.ux, uy)
        ssim = ((2 * self.ux * uy + _C1) * (2 * vxy + _C2)
                / ((self.ux**2 + uy**2 + _C1) * (self.vx + vy + _C2)))
        return float(ssim.mean(axis=0, dtype=np.float64)[self.weights].mean())


def tissue_ssim(decoded: np.ndarray, original: np.ndarray) -> float:
    """Mean SSIM of ``decoded`` vs ``original`` (uint8, (3, H, W)) over the non-white
    pixels of ``original`` (all pixels where every one is white)."""
    return ReferenceSSIM(original)(decoded)
