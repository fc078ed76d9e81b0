"""What a lighter hyper-synthesis would cost in rate, measured on one trained network.

On the CPU the largest stage of decoding is the exact integer hyper-synthesis (h_s). This
freezes a checkpoint's analysis, hyper-analysis and hyper-latent prior, encodes training
crops and the held-out tiles once, then trains h_s variants from scratch on those latents
alone (the rate of y given z is all that h_s decides) with the same budget. It reports
each variant's held-out rate of y and what its integer form costs per 512² chunk, beside
the checkpoint's own, jointly trained h_s. Training from scratch for a few minutes
understates every variant; compare the variants with each other, and the same-shape
variant with the original to see how much is the short training.

    python benchmarks/hyper_synthesis_width.py runs/gpu-l0.15/checkpoint.pt \\
        --variants 96,144,3 96,144,1 96,96,3 64,96,3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from compressai.models.utils import conv, deconv
from torch import nn

from numcodecs_dlwsi.hyper_synthesis import FRACTION_BITS, IntegerHyperSynthesis, IntegerLayer
from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior
from numcodecs_dlwsi.train.data import (
    CropSampler,
    default_data_root,
    load_training_images,
    validation_tiles,
)
from numcodecs_dlwsi.train.export import quantize_hyper_synthesis
from numcodecs_dlwsi.train.train import with_constant_bounds


def hyper_synthesis(n: int, m: int, first: int, second: int, kernel: int) -> nn.Sequential:
    """h_s of the released shape with its widths and last kernel as parameters."""
    return nn.Sequential(deconv(n, first), nn.LeakyReLU(inplace=True),
                         deconv(first, second), nn.LeakyReLU(inplace=True),
                         conv(second, 2 * m, stride=1, kernel_size=kernel))


def load_model(checkpoint: Path) -> LiteMeanScaleHyperprior:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["model_config"]
    model = LiteMeanScaleHyperprior.from_config(cfg)
    model.load_state_dict(with_constant_bounds(state["model"], model))
    return model.eval()


@torch.no_grad()
def latents(model: LiteMeanScaleHyperprior, tiles: np.ndarray, batch: int = 16
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z_hat) of uint8 tiles (N, 3, H, W), z rounded around its medians as coded."""
    ys, zs = [], []
    medians = model.entropy_bottleneck._get_medians()
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(tiles[i : i + batch]).float() / 255.0
        y = model.g_a(x)
        z = model.h_a(y)
        ys.append(y)
        zs.append(torch.round(z - medians) + medians)
    return torch.cat(ys), torch.cat(zs)


def y_bits(model: LiteMeanScaleHyperprior, h_s: nn.Module, y: torch.Tensor,
           z_hat: torch.Tensor, training: bool) -> torch.Tensor:
    scales, means = h_s(z_hat).chunk(2, 1)
    _, likelihoods = model.gaussian_conditional(y, scales, means=means, training=training)
    return -torch.log2(likelihoods).sum()


def train_variant(model: LiteMeanScaleHyperprior, h_s: nn.Module, y: torch.Tensor,
                  z_hat: torch.Tensor, steps: int, batch: int) -> None:
    optimizer = torch.optim.Adam(h_s.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(y), (batch,), generator=generator)
        loss = y_bits(model, h_s, y[pick], z_hat[pick], training=True) / (batch * 256 * 256)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def integer_ms_per_chunk(h_s: nn.Sequential, n: int, repeat: int = 5) -> float:
    """Median time of the exact integer h_s on 8 chunks of 512² (z: 8x8), per chunk."""
    layers = tuple(IntegerLayer(**layer) for layer in quantize_hyper_synthesis(h_s))
    integer = IntegerHyperSynthesis(layers)
    z = np.random.default_rng(0).integers(-4, 5, size=(8, n, 8, 8)) * float(1 << FRACTION_BITS)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        integer(z)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / 8


def save_with(checkpoint: Path, target: Path, h_s: nn.Sequential, kernel: int, spec: str,
              args: argparse.Namespace) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["model"] = {name: value for name, value in state["model"].items()
                      if not name.startswith("h_s.")}
    state["model"].update({f"h_s.{name}": value.detach().clone()
                           for name, value in h_s.state_dict().items()})
    state["model_config"] = dict(state["model_config"], hyper_kernel=kernel)
    state["h_s_retrained"] = {"variant": spec, "crops": args.crops, "steps": args.steps,
                              "batch": args.batch, "from": str(checkpoint)}
    for key in ("optimizer", "aux_optimizer"):  # they belong to the old h_s
        state.pop(key, None)
    model = LiteMeanScaleHyperprior.from_config(state["model_config"])
    model.load_state_dict(with_constant_bounds(state["model"], model))  # it must load
    torch.save(state, target)
    print(f"wrote {target}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--variants", nargs="+", default=["96,144,3", "96,144,1", "96,96,3"],
                        help="h_s shapes FIRST,SECOND,KERNEL (the released is 96,144,3)")
    parser.add_argument("--crops", type=int, default=1024, help="training crops of 256²")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--with-slides", action="store_true",
                        help="draw crops from the training slides too (at 1x, 2x and 4x), "
                             "as the network's own training did")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save", type=Path, metavar="CHECKPOINT",
                        help="write the checkpoint with its h_s replaced by the first "
                             "variant (FIRST must be the model's hyper width, SECOND 1.5x "
                             "it), for dlwsi-train export")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = default_data_root()
    model = load_model(args.checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    sampler = CropSampler(load_training_images(root, with_slides=args.with_slides), 256)
    crops = np.stack([t for t in sampler.batch(args.crops)])
    y_train, z_train = latents(model, crops)
    y_val, z_val = latents(model, validation_tiles(root, size=256, per_image=4))
    val_pixels = len(y_val) * 256 * 256

    def report(name: str, h_s: nn.Sequential) -> dict:
        with torch.no_grad():
            bpp = y_bits(model, h_s, y_val, z_val, training=False).item() / val_pixels
        row = {"variant": name, "y_bpp": bpp,
               "params": sum(p.numel() for p in h_s.parameters()),
               "integer_ms_per_chunk": integer_ms_per_chunk(h_s, model.N)}
        print(f"{name:<24}{bpp:>9.4f}{row['params']:>10}{row['integer_ms_per_chunk']:>10.1f}",
              flush=True)
        return row

    print(f"{'h_s':<24}{'y bpp':>9}{'params':>10}{'ms/chunk':>10}   "
          f"({len(y_val)} held-out tiles; {args.crops} crops, {args.steps} steps each)")
    rows = [report("checkpoint's own", model.h_s)]
    for spec in args.variants:
        first, second, kernel = (int(v) for v in spec.split(","))
        h_s = hyper_synthesis(model.N, model.M, first, second, kernel)
        started = time.time()
        train_variant(model, h_s, y_train, z_train, args.steps, args.batch)
        row = report(f"{spec} from scratch", h_s.eval())
        row["train_s"] = time.time() - started
        rows.append(row)
        if args.save and len(rows) == 2:
            save_with(args.checkpoint, args.save, h_s, kernel, spec, args)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
