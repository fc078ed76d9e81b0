"""The distortion the models are trained on, and that latent refinement minimizes.

``(1 - w) * 255² * MSE + w * SSIM_SCALE * (1 - SSIM)`` with ``w`` the model's
``ssim_weight``; a rung's loss is its lambda times this, plus bits per pixel.
"""

from __future__ import annotations

from torch import Tensor

#: (1 - SSIM) is scaled so that, near 30 dB on H&E, a dB of PSNR and the SSIM it brings
#: weigh about the same as the 255^2 * MSE term (CompressAI's MS-SSIM lambdas are ~10^3
#: times its MSE lambdas for the same reason).
SSIM_SCALE = 1000.0


def distortion(mse: Tensor, ssim: Tensor | float, ssim_weight: float) -> Tensor:
    """Per-image distortion from its mean squared error (on [0, 1] pixels) and SSIM."""
    return (1.0 - ssim_weight) * 255**2 * mse + ssim_weight * SSIM_SCALE * (1 - ssim)
