"""Resumable rate-distortion training on H&E crops.

A run is a folder: ``config.json`` (fixed at creation), ``checkpoint.pt`` (rewritten
atomically every ``--save-every`` steps) and ``log.jsonl`` (one line per logged step).
Running the same command again continues where the last run stopped.

The same loop trains on a GPU (``device="cuda"``, bf16 autocast for the transforms, crops
drawn on the GPU from a data pack, a wall-clock limit): checkpoints are always saved with
CPU tensors, so a run started on a GPU continues on the CPU with the plain command (see
docs/development/gpu_training.md).
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

from ..network.loss import distortion
from ..network.model import LiteMeanScaleHyperprior, widen_state
from .data import (
    CropSampler,
    JpegRecompression,
    default_data_root,
    load_training_images,
    validation_tiles,
)
from .pack import TorchCropSampler, load_pack

#: TrainConfig fields a resumed run may change besides steps and lr, when asked to (a run
#: started on a GPU with large crops and batches goes on with small ones on the CPU).
RESUMABLE_OVERRIDES = ("batch", "crop")



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
    hyper_kernel: int = 3  # kernel of h_s's last layer (1: a third of CPU decode's h_s)
    first: int = 0  # width of g_s's first stage (0 = N)
    analysis: int = 0  # g_a's hidden width (0 = N)
    # Latent gains of a quality ladder: when given, the run tunes the decoder side only
    # (h_s and g_s; g_a, h_a and the hyper-latent prior stay as --init has them, so the
    # latents do not move), each crop coded at one of these gains, as exported rungs are.
    ladder_gains: list[float] | None = None
    # [low, high]: half the crops re-encoded as JPEG at a quality in that range, as the
    # slides the converter reads were (data.JpegRecompression)
    jpeg_recompress: list[int] | None = None


def rate_distortion(model: LiteMeanScaleHyperprior, x: torch.Tensor, lmbda: float,
                    ssim_weight: float = 0.0, amp: bool = False,
                    gain: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None) -> dict:
    """Loss and its parts for a batch; ``gain`` (B, 1, 1, 1) codes each crop at a latent
    gain and ``weight`` (B,) weighs each crop's distortion (mean 1 over the ladder)."""
    # bf16 autocast covers the model's transforms only: the model keeps its entropy models in
    # float32, and the loss (rates, MSE, SSIM) is computed here in float32 too
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x, gain)
    num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
    bpp = sum(
        torch.log(lk).sum() / (-math.log(2) * num_pixels) for lk in out["likelihoods"].values()
    )
    mse = torch.mean((out["x_hat"] - x) ** 2, dim=(1, 2, 3))
    ssim_value = ssim(out["x_hat"].clamp(0.0, 1.0), x, data_range=1.0, size_average=False)
    distorted = distortion(mse, ssim_value, ssim_weight)
    if weight is not None:
        distorted = distorted * weight
    return {"loss": lmbda * distorted.mean() + bpp, "bpp": bpp, "mse": mse.mean(),
            "ssim": ssim_value.mean()}


def with_constant_bounds(state: dict[str, torch.Tensor], model: torch.nn.Module
                         ) -> dict[str, torch.Tensor]:
    """``state`` with CompressAI's lower-bound buffers taken from ``model``.

    They are constants of the architecture (likelihood bound 1e-9, scale bound 0.11, GDN
    reparametrization bounds), not learned, but they travel in state dicts; a float16
    copy (a GPU payload's init, before float16 copies kept small tensors in float32)
    turned the 1e-9 likelihood bounds into 0, which lets a likelihood reach 0 and the
    loss infinity.
    """
    own = model.state_dict()
    return {name: own[name].clone() if name.endswith("bound") and name in own else value
            for name, value in state.items()}


def _optimizers(model: LiteMeanScaleHyperprior, lr: float) -> tuple:
    """Adam for the trainable weights, and for the hyper-latent quantiles (None when
    they are frozen)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = [p for n, p in trainable if not n.endswith(".quantiles")]
    aux = [p for n, p in trainable if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=1e-3) if aux else None


def freeze_encoder_side(model: LiteMeanScaleHyperprior) -> None:
    """Fix everything that decides the coded latents: g_a, h_a and the hyper-latent prior
    (its medians offset z). Tuning what remains (h_s, g_s) changes rate and quality of
    every rung without retraining the encoder."""
    for module in (model.g_a, model.h_a, model.entropy_bottleneck):
        for parameter in module.parameters():
            parameter.requires_grad_(False)


class GainSampler:
    """One ladder gain per crop, uniform over the rungs, with the crop's distortion weight.

    The weight grows as gain² (normalised to mean 1 over the ladder): a rung's distortion
    falls about as 1/gain², so this asks every rung for the same relative improvement
    instead of letting the coarsest rungs' large errors dominate the loss.
    """

    def __init__(self, gains: list[float], device: torch.device) -> None:
        self.gains = torch.tensor(gains, dtype=torch.float32, device=device)
        self.weights = self.gains**2 / (self.gains**2).mean()

    def draw(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(self.gains), (batch,), device=self.gains.device)
        return self.gains[pick].view(-1, 1, 1, 1), self.weights[pick]


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _to_cpu(value: object) -> object:
    """State dicts with every tensor on the CPU, so GPU checkpoints load anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


@torch.no_grad()
def evaluate(model: LiteMeanScaleHyperprior, tiles: np.ndarray, lmbda: float,
             ssim_weight: float = 0.0) -> dict:
    model.eval()
    device = next(model.parameters()).device
    x = (torch.from_numpy(tiles).float() / 255.0).to(device)
    rd = rate_distortion(model, x, lmbda, ssim_weight)
    model.train()
    psnr = 10 * math.log10(1.0 / max(rd["mse"].item(), 1e-12))
    return {"val_bpp": rd["bpp"].item(), "val_psnr": psnr, "val_ssim": rd["ssim"].item(),
            "val_loss": rd["loss"].item()}


def train(run: Path, config: TrainConfig | None = None, save_every: int = 200,
          log_every: int = 50, val_every: int = 500, data_root: Path | None = None, *,
          device: str = "cpu", amp: str = "none", minutes: float | None = None,
          data_pack: Path | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """Train (or continue training) the run in ``run``; returns the checkpoint path.

    ``device`` and ``amp`` ("none" or "bf16") choose where and in what precision to train,
    ``minutes`` stops the run cleanly (saved, logged, validated) after that much wall-clock
    time, ``data_pack`` trains from a pack (see :mod:`.pack`) instead of ``data_root``, and
    ``overrides`` names :data:`RESUMABLE_OVERRIDES` that a resumed run takes from ``config``.
    None of these is part of the run's config: they may change each time the run continues.
    """
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', not {amp!r}")
    deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
    dev = torch.device(device)
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "config.json"
    if config_path.exists():
        saved = TrainConfig(**json.loads(config_path.read_text()))
        # a run may be extended and its learning rate lowered, and its batch and crop
        # changed where asked to (moving between a GPU and a CPU); nothing else changes
        if config is not None:
            saved.steps = config.steps
            saved.lr = config.lr if config.lr is not None else saved.lr
            for name in overrides:
                if name not in RESUMABLE_OVERRIDES:
                    raise ValueError(f"a resumed run cannot change {name}")
                setattr(saved, name, getattr(config, name))
            config_path.write_text(json.dumps(asdict(saved), indent=2))
        config = saved
    else:
        config = config or TrainConfig()
        if config.lr is None:
            config.lr = TrainConfig.lr
        config_path.write_text(json.dumps(asdict(config), indent=2))

    torch.manual_seed(config.seed)
    model = LiteMeanScaleHyperprior(config.N, config.M, config.last, config.hyper,
                                    config.first, config.analysis, config.hyper_kernel)
    checkpoint = run / "checkpoint.pt"
    step, state, packs = 0, None, []
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(with_constant_bounds(state["model"], model))
        step = state["step"]
        packs = state.get("data_packs", [])
    elif config.init:
        init = torch.load(config.init, map_location="cpu", weights_only=False)
        shapes = {name: value.shape for name, value in model.state_dict().items()}
        if any(value.shape != shapes.get(name) for name, value in init["model"].items()):
            init["model"] = widen_state(init["model"], model)
        model.load_state_dict(with_constant_bounds(init["model"], model))
    model.to(dev)
    gain_sampler = None
    if config.ladder_gains:
        freeze_encoder_side(model)
        gain_sampler = GainSampler(config.ladder_gains, dev)
    optimizer, aux_optimizer = _optimizers(model, config.lr)
    if state is not None:  # Adam's moments move to the parameters' device as they load
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        if aux_optimizer is not None:
            aux_optimizer.load_state_dict(state["aux_optimizer"])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop and batch: autotune the convs
        # float32 means float32 (h_a, h_s and the loss; everything under --amp none):
        # TF32 convolutions keep only 10 mantissa bits, too few for the entropy model
        torch.backends.cudnn.allow_tf32 = False

    recompression = (JpegRecompression(*config.jpeg_recompress)
                     if config.jpeg_recompress else None)
    recompression_rng = np.random.default_rng(config.seed + step + 1)

    def as_sources(crops: np.ndarray) -> np.ndarray:
        return crops if recompression is None else recompression.apply(crops, recompression_rng)

    if data_pack is not None:
        pack = load_pack(data_pack)
        torch_sampler = TorchCropSampler(pack.regions, config.crop, seed=config.seed + step,
                                         device=device)
        val = pack.val  # None: the pack has no validation tiles, so there is no validation
        record = {"file": Path(data_pack).name, "sha256": pack.sha256,
                  "trained_on": pack.meta["trained_on"]}
        if all(p.get("sha256") != pack.sha256 for p in packs):
            packs = [*packs, record]

        def next_batch() -> torch.Tensor:
            x = torch_sampler.batch(config.batch)
            if recompression is None:
                return x
            crops = x.mul(255.0).round_().to(torch.uint8).cpu().numpy()
            return torch.from_numpy(as_sources(crops)).to(dev).float().div_(255.0)
    else:
        root = data_root or default_data_root()
        sampler = CropSampler(load_training_images(root), config.crop,
                              seed=config.seed + step)
        val = validation_tiles(root, size=256, per_image=4)

        def next_batch() -> torch.Tensor:
            x = torch.from_numpy(as_sources(sampler.batch(config.batch))).float() / 255.0
            return x.to(dev, non_blocking=True)

    extra = {}  # logged only where they differ from a plain CPU run
    if dev.type != "cpu":
        extra["device"] = dev.type
    if amp != "none":
        extra["amp"] = amp
    if data_pack is not None:
        extra["data"] = Path(data_pack).name

    model.train()
    log = (run / "log.jsonl").open("a")
    started, window = time.perf_counter(), []
    while step < config.steps:
        x = next_batch()
        gain, weight = gain_sampler.draw(len(x)) if gain_sampler else (None, None)
        optimizer.zero_grad()
        rd = rate_distortion(model, x, config.lmbda, config.ssim_weight, amp=amp == "bf16",
                             gain=gain, weight=weight)
        if not torch.isfinite(rd["loss"]):
            continue  # a rare bad batch must not poison the weights
        rd["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        aux_loss = model.aux_loss()
        if aux_optimizer is not None:
            aux_optimizer.zero_grad()
            aux_loss.backward()
            aux_optimizer.step()
        step += 1
        # kept on the device until logged: reading them each step would stall a GPU
        window.append(torch.stack([rd["loss"], rd["bpp"], rd["mse"], rd["ssim"]]).detach())
        out_of_time = deadline is not None and time.monotonic() >= deadline
        last = step == config.steps or out_of_time
        if step % log_every == 0 or last:
            loss, bpp, mse, ssim_mean = torch.stack(window).double().mean(0).tolist()
            entry = {"step": step, "loss": loss, "bpp": bpp,
                     "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "ssim": ssim_mean,
                     "aux": aux_loss.item(),
                     "s_per_step": (time.perf_counter() - started) / len(window), **extra}
            if val is not None and (step % val_every == 0 or last):
                entry.update(evaluate(model, val, config.lmbda, config.ssim_weight))
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(json.dumps(entry), flush=True)
            started, window = time.perf_counter(), []
        if step % save_every == 0 or last:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "aux_optimizer": aux_optimizer and aux_optimizer.state_dict(),
                     "step": step,
                     "config": asdict(config), "model_config": model.config()}
            if packs:
                state["data_packs"] = packs
            _save_atomic(_to_cpu(state), checkpoint)
        if out_of_time:
            print(f"stopped at step {step}: the {minutes} minute limit is reached", flush=True)
            break
    log.close()
    return checkpoint
