"""How much quality a trained checkpoint's transforms can give at all, before quantization.

For each checkpoint: PSNR on the held-out tiles when g_s decodes the rounded latent (what
the codec does) and when it decodes the unquantized latent (no rate limit at all). If the
second is low, no lambda can buy quality: the transforms are the cap, not the rate.

    python benchmarks/transform_ceiling.py runs/q4/checkpoint.pt runs/v2a/checkpoint.pt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from numcodecs_dlwsi.train.data import default_data_root, validation_tiles
from numcodecs_dlwsi.train.model import LiteMeanScaleHyperprior


def _psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / ((x_hat.clamp(0, 1) - x) ** 2).mean().item())


@torch.no_grad()
def ceiling(checkpoint: Path, tiles: torch.Tensor) -> dict[str, float]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["model_config"]
    model = LiteMeanScaleHyperprior(cfg["N"], cfg["M"], cfg["last"], cfg.get("hyper", 0),
                                    cfg.get("first", 0), cfg.get("analysis", 0))
    model.load_state_dict(state["model"])
    model.eval()
    y = model.g_a(tiles)
    medians = model.entropy_bottleneck._get_medians()
    z_hat = torch.round(model.h_a(y) - medians) + medians
    _, means = model.h_s(z_hat).chunk(2, 1)
    y_hat = torch.round(y - means) + means
    return {"step": state["step"], "rounded_psnr": _psnr(model.g_s(y_hat), tiles),
            "unquantized_psnr": _psnr(model.g_s(y), tiles)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--per-image", type=int, default=2, help="256x256 tiles per image")
    args = parser.parse_args()
    tiles = validation_tiles(default_data_root(), 256, args.per_image)
    x = torch.from_numpy(tiles).float() / 255.0
    print(f"{len(tiles)} held-out 256x256 tiles")
    for checkpoint in args.checkpoints:
        r = ceiling(checkpoint, x)
        print(f"{checkpoint}  step {r['step']}: rounded {r['rounded_psnr']:.2f} dB, "
              f"unquantized {r['unquantized_psnr']:.2f} dB")


if __name__ == "__main__":
    main()
