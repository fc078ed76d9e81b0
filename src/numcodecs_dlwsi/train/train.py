"""Resumable rate-distortion training on H&E crops.

A run is a folder: ``config.json`` (fixed at creation), ``checkpoint.pt`` (rewritten
atomically every ``--save-every`` steps) and ``log.jsonl`` (one line per logged step).
Running the same command again continues where the last run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_msssim import ssim

from .data import CropSampler, default_data_root, load_training_images, validation_tiles
from .model import LiteMeanScaleHyperprior, widen_state

#: (1 - SSIM) is scaled so that, near 30 dB on H&E, a dB of PSNR and the SSIM it brings
#: weigh about the same as the 255^2 * MSE term (CompressAI's MS-SSIM lambdas are ~10^3
#: times its MSE lambdas for the same reason).
SSIM_SCALE = 1000.0


@dataclass
class TrainConfig:
    lmbda: float = 0.0483
    steps: int = 3000
    batch: int = 8
    crop: int = 128
    lr: float | None = 5e-4  # None on resume: keep the run's
    N: int = 64
    M: int = 96
    last: int = 32
    seed: int = 0
    init: str | None = None  # checkpoint to start from (fine-tuning to another lambda)
    ssim_weight: float = 0.0  # share of the distortion measured as SSIM instead of MSE
    hyper: int = 0  # h_s hidden width (0 = M, CompressAI's choice)


def rate_distortion(model: LiteMeanScaleHyperprior, x: torch.Tensor, lmbda: float,
                    ssim_weight: float = 0.0) -> dict:
    out = model(x)
    num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(
        torch.log(lk).sum() / (-math.log(2) * num_pixels) for lk in out["likelihoods"].values()
    )
    mse = torch.mean((out["x_hat"] - x) ** 2)
    ssim_value = ssim(out["x_hat"].clamp(0.0, 1.0), x, data_range=1.0)
    distortion = (1.0 - ssim_weight) * 255**2 * mse + ssim_weight * SSIM_SCALE * (1 - ssim_value)
    return {"loss": lmbda * distortion + bpp, "bpp": bpp, "mse": mse, "ssim": ssim_value}


def _optimizers(model: LiteMeanScaleHyperprior, lr: float) -> tuple:
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=1e-3)


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: LiteMeanScaleHyperprior, tiles: np.ndarray, lmbda: float,
             ssim_weight: float = 0.0) -> dict:
    model.eval()
    x = torch.from_numpy(tiles).float() / 255.0
    rd = rate_distortion(model, x, lmbda, ssim_weight)
    model.train()
    psnr = 10 * math.log10(1.0 / max(rd["mse"].item(), 1e-12))
    return {"val_bpp": rd["bpp"].item(), "val_psnr": psnr, "val_ssim": rd["ssim"].item(),
            "val_loss": rd["loss"].item()}


def train(run: Path, config: TrainConfig | None = None, save_every: int = 200,
          log_every: int = 50, val_every: int = 500, data_root: Path | None = None) -> Path:
    """Train (or continue training) the run in ``run``; returns the checkpoint path."""
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "config.json"
    if config_path.exists():
        saved = TrainConfig(**json.loads(config_path.read_text()))
        # a run may be extended and its learning rate lowered; nothing else changes
        if config is not None:
            saved.steps = config.steps
            saved.lr = config.lr if config.lr is not None else saved.lr
            config_path.write_text(json.dumps(asdict(saved), indent=2))
        config = saved
    else:
        config = config or TrainConfig()
        if config.lr is None:
            config.lr = TrainConfig.lr
        config_path.write_text(json.dumps(asdict(config), indent=2))

    torch.manual_seed(config.seed)
    model = LiteMeanScaleHyperprior(config.N, config.M, config.last, config.hyper)
    optimizer, aux_optimizer = _optimizers(model, config.lr)
    checkpoint = run / "checkpoint.pt"
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        aux_optimizer.load_state_dict(state["aux_optimizer"])
        step = state["step"]
    elif config.init:
        state = torch.load(config.init, map_location="cpu", weights_only=False)
        if state["model"]["g_s.0.weight"].shape[0] != config.M:
            state["model"] = widen_state(state["model"], model)
        model.load_state_dict(state["model"])

    root = data_root or default_data_root()
    sampler = CropSampler(load_training_images(root), config.crop, seed=config.seed + step)
    val = validation_tiles(root, size=256, per_image=4)
    model.train()
    log = (run / "log.jsonl").open("a")
    started, window = time.perf_counter(), []
    while step < config.steps:
        x = torch.from_numpy(sampler.batch(config.batch)).float() / 255.0
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        rd = rate_distortion(model, x, config.lmbda, config.ssim_weight)
        if not torch.isfinite(rd["loss"]):
            continue  # a rare bad batch must not poison the weights
        rd["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_optimizer.step()
        step += 1
        window.append((rd["loss"].item(), rd["bpp"].item(), rd["mse"].item(),
                       rd["ssim"].item()))
        if step % log_every == 0 or step == config.steps:
            loss, bpp, mse, ssim_mean = np.mean(window, axis=0)
            entry = {"step": step, "loss": loss, "bpp": bpp,
                     "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "ssim": ssim_mean,
                     "aux": aux_loss.item(),
                     "s_per_step": (time.perf_counter() - started) / len(window)}
            if step % val_every == 0 or step == config.steps:
                entry.update(evaluate(model, val, config.lmbda, config.ssim_weight))
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(json.dumps(entry), flush=True)
            started, window = time.perf_counter(), []
        if step % save_every == 0 or step == config.steps:
            _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "aux_optimizer": aux_optimizer.state_dict(), "step": step,
                          "config": asdict(config), "model_config": model.config()},
                         checkpoint)
    log.close()
    return checkpoint
