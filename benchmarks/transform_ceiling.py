"""How much quality a trained checkpoint's transforms can give at all, before quantization.

For each checkpoint: PSNR on the held-out tiles when g_s decodes the rounded latent (what
the codec does) and when it decodes the unquantized latent (no rate limit at all). If the
second is low, no lambda can buy quality: the transforms are the cap, not the rate.

``--latent-dims`` adds a linear reference for the latent's size alone: block PCA, fitted
on training-side crops, that keeps M of the 16x16x3 = 768 values of each held-out patch
(g_a has stride 16, so M latent channels are M numbers per patch). A trained model whose
unquantized PSNR is below it is not limited by its latent's size.

    python benchmarks/transform_ceiling.py runs/q4/checkpoint.pt runs/v2a/checkpoint.pt
    python benchmarks/transform_ceiling.py --latent-dims 96,192,320,384 --per-image 16
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior
from numcodecs_dlwsi.train.data import (
    CropSampler,
    default_data_root,
    load_training_images,
    validation_tiles,
)


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / ((x_hat.clamp(0, 1) - x) ** 2).mean().item())


@torch.no_grad()
def ceiling(checkpoint: Path, tiles: torch.Tensor) -> dict[str, float]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["model_config"]
    model = LiteMeanScaleHyperprior.from_config(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    y = model.g_a(tiles)
    medians = model.entropy_bottleneck._get_medians()
    z_hat = torch.round(model.h_a(y) - medians) + medians
    _, means = model.h_s(z_hat).chunk(2, 1)
    y_hat = torch.round(y - means) + means
    return {"step": state["step"], "rounded_psnr": _psnr(model.g_s(y_hat), tiles),
            "unquantized_psnr": _psnr(model.g_s(y), tiles)}


def _patches(tiles: np.ndarray, block: int) -> np.ndarray:
    n, c, h, w = tiles.shape
    hb, wb = h // block, w // block
    return (tiles[:, :, : hb * block, : wb * block].astype(np.float64)
            .reshape(n, c, hb, block, wb, block).transpose(0, 2, 4, 1, 3, 5)
            .reshape(-1, c * block * block))


def training_tiles(root: Path, count: int, size: int = 256) -> np.ndarray:
    """``count`` tissue crops (N, 3, size, size) drawn as training draws them."""
    try:
        sampler = CropSampler(load_training_images(root, with_slides=False), size)
    except ValueError as error:
        raise SystemExit(f"transform_ceiling: {error}") from None
    tiles: list[np.ndarray] = []
    for _ in range(100):  # bounded: a glass-only data folder must not hang
        # skip glass: it says nothing about the latent's size
        tiles.extend(t for t in sampler.batch(count) if t.mean() < 220)
        if len(tiles) >= count:
            return np.stack(tiles[:count])
    raise SystemExit(f"transform_ceiling: found only {len(tiles)} tissue crops in {root}")


def block_pca_psnr(train: np.ndarray, held_out: np.ndarray, dims: list[int],
                   block: int = 16) -> dict[int, float]:
    """PSNR on ``held_out`` of keeping ``dims`` principal components of each 16x16x3 patch,
    with the components fitted on ``train`` (as a model is fitted on the training side)."""
    fit = _patches(train, block)
    mean = fit.mean(0)
    fit -= mean
    held = _patches(held_out, block) - mean
    _, vectors = np.linalg.eigh(fit.T @ fit / len(fit))
    vectors = vectors[:, ::-1]
    out = {}
    for k in dims:
        basis = vectors[:, :k]
        mse = float(((held @ basis @ basis.T - held) ** 2).mean())
        out[k] = 10 * math.log10(255.0**2 / mse)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--latent-dims", default="",
                        help="comma-separated latent sizes M for the block-PCA reference")
    parser.add_argument("--per-image", type=int, default=2, help="256x256 tiles per image")
    args = parser.parse_args()
    if not args.checkpoints and not args.latent_dims:
        parser.error("give checkpoints, --latent-dims, or both")
    root = default_data_root()
    if not (root / "he").is_dir():
        parser.error(f"no H&E data at {root} (set DLWSI_DATA)")
    tiles = validation_tiles(root, 256, args.per_image)
    x = torch.from_numpy(tiles).float() / 255.0
    print(f"{len(tiles)} held-out 256x256 tiles")
    if args.latent_dims:
        dims = [int(d) for d in args.latent_dims.split(",")]
        train = training_tiles(root, 400)
        for k, psnr in block_pca_psnr(train, tiles, dims).items():
            print(f"block PCA, {k} of 768 values per 16x16 patch: {psnr:.2f} dB")
    for checkpoint in args.checkpoints:
        r = ceiling(checkpoint, x)
        print(f"{checkpoint}  step {r['step']}: rounded {r['rounded_psnr']:.2f} dB, "
              f"unquantized {r['unquantized_psnr']:.2f} dB")


if __name__ == "__main__":
    main()
