"""Encoder-side latent refinement: spend encoding time, not bits or decoding time.

The analysis transform is amortized: one network guesses good latents for every image. A
guess can be improved per image by gradient descent on the very rate-distortion loss the
model was trained with, through the frozen hyper-synthesis and synthesis transforms
(Campos et al. 2019; Yang et al. 2020, "Improving Inference for Neural Image Compression").
Only the latents change, so the chunks are ordinary chunks of the same model: same
bitstream, same decoder, same model id and hash, and readers need nothing new.

Rounding is relaxed by stochastic Gumbel annealing (SGA, Yang et al. 2020): each latent
is a random soft choice between its floor and ceiling, whose temperature falls towards
hard rounding; the hyper-latent is rounded straight-through and costed with the released
integer tables themselves. Each image keeps the
iterate whose *hard-rounded* loss was lowest, so refinement never codes an image worse
than the analysis transform did (up to the float h_s used here instead of the exact
integer one).

Refinement needs PyTorch and CompressAI (the ``train`` extra) and runs on a CUDA device
when torch sees one. It is deterministic for given inputs on one machine (fixed noise
seed); decoding does not depend on it in any way.
"""

from __future__ import annotations

import math
import threading
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from .entropy_coding import TOTAL
from .hyper_synthesis import FRACTION_BITS
from .model_file import ModelFile
from .model_store import ModelRef, load

if TYPE_CHECKING:
    from torch import Generator, Tensor, nn

#: Refinement steps at most (each costs about three synthesis passes).
MAX_STEPS = 2000
#: Adam's step size on the latents, decayed by a cosine to 0 over the steps.
LEARNING_RATE = 0.02
#: SGA temperature: from TEMPERATURE_START down by exp(-TEMPERATURE_DECAY * progress),
#: never below TEMPERATURE_FLOOR.
TEMPERATURE_START = 0.5
TEMPERATURE_DECAY = 4.0
TEMPERATURE_FLOOR = 0.01
SEED = 0


class RefinementUnavailableError(ImportError):
    """Refinement asked for where PyTorch or CompressAI is not installed."""


def _torch() -> ModuleType:
    try:
        import torch  # noqa: PLC0415  (optional: only encoders that refine need it)
    except ImportError:
        raise RefinementUnavailableError(
            "dlwsi latent refinement (refine > 0) needs PyTorch and CompressAI: "
            "pip install 'numcodecs-dlwsi[train]'; refine=0 encodes without them") from None
    return torch


_networks: dict[str, nn.Module] = {}
_networks_lock = threading.Lock()


def _network(ref: ModelRef) -> nn.Module:
    """The released transforms as a frozen torch module, rebuilt from the model file once
    per process (every rung of a file shares it; converter threads ask concurrently)."""
    with _networks_lock:
        if ref.sha256 not in _networks:
            _networks[ref.sha256] = _frozen_network(ref)
        return _networks[ref.sha256]


def _frozen_network(ref: ModelRef) -> nn.Module:
    torch = _torch()
    with warnings.catch_warnings():  # CompressAI's import warns about torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from .network.release import network_from_release  # noqa: PLC0415

    net = network_from_release(ref)
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net.to("cuda" if torch.cuda.is_available() else "cpu")


def _hyper_latent_bits(model: ModelFile, device: object) -> tuple[Tensor, Tensor]:
    """The released hyper-latent tables as bits per symbol, (channels, width), for each
    channel's ``lo``, ``lo + 1``, ...; a value outside costs the escape and 32 bits."""
    torch = _torch()
    width = max(table.escape for table in model.z_tables) + 1
    bits = np.empty((len(model.z_tables), width))
    for c, table in enumerate(model.z_tables):
        costs = -np.log2(table.freqs / TOTAL)
        bits[c, : table.escape] = costs[: table.escape]
        bits[c, table.escape :] = costs[table.escape] + 32  # escaped values
    lows = np.array([table.lo for table in model.z_tables], np.float64)
    return (torch.from_numpy(bits).float().to(device),
            torch.from_numpy(lows).float().to(device).view(1, -1, 1, 1))


def _table_bits(symbols: Tensor, bits: Tensor, lows: Tensor) -> Tensor:
    """Bits of the hyper-latent: exact table costs of the rounded symbols in the forward
    pass, the slope of the table's linear interpolation in the backward pass."""
    torch = _torch()
    width = bits.shape[1]
    index = (symbols - lows).clamp(0, width - 1)
    low = torch.floor(index).clamp(max=width - 2)
    frac = index - low
    channel = torch.arange(bits.shape[0], device=bits.device).view(1, -1, 1, 1)
    low_bits, high_bits = bits[channel, low.long()], bits[channel, low.long() + 1]
    smooth = low_bits + frac * (high_bits - low_bits)
    exact = bits[channel, torch.round(index).long()]
    return exact + (smooth - smooth.detach())


def rung_lambda(base_lambda: float, gain: np.ndarray | None) -> float:
    """The rate-distortion trade-off a rung stands for.

    A latent gain g scales the quantization step by 1/g, so distortion falls about as
    1/g² and the rung's slope is the training lambda times g² (measured on he-mshl-v3's
    held-out tiles: slopes between rungs are 0.14-0.24 times g²).
    """
    g = 1.0 if gain is None else float(np.mean(gain))
    return base_lambda * g * g


def _gumbel_round(value: Tensor, temperature: float, generators: list[Generator]) -> Tensor:
    """A soft, random choice between floor and ceiling (SGA). Each image draws its noise
    from its own generator, so its result does not depend on the batch it came in."""
    torch = _torch()
    low = torch.floor(value)
    frac = (value - low).clamp(1e-4, 1 - 1e-4)
    logits = torch.stack([-torch.atanh(frac), -torch.atanh(1 - frac)], dim=-1) / temperature
    uniform = torch.stack([torch.rand(logits.shape[1:], generator=g, device=value.device)
                           for g in generators])
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0)))
    weights = torch.softmax((logits + gumbel) / temperature, dim=-1)
    return low + weights[..., 1]


def _straight_through_round(value: Tensor) -> Tensor:
    torch = _torch()
    return (torch.round(value) - value).detach() + value


def refine_latents(ref: ModelRef, x: np.ndarray, y: np.ndarray, z: np.ndarray,
                   gains: list[np.ndarray | None], size: tuple[int, int], steps: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Refined latents (y, z) for a batch, each image for its own rung.

    ``x`` is the analysis input (B, 3, H, W) in [0, 1] (padded), ``y`` and ``z`` the
    analysis output, ``gains`` each image's rung gain as float (M,) (None: format 1),
    ``size`` the unpadded (height, width) whose pixels count in the distortion.
    """
    torch = _torch()
    from pytorch_msssim import ssim  # noqa: PLC0415

    net = _network(ref)  # first: it imports CompressAI with its warnings silenced
    from .network.loss import distortion  # noqa: PLC0415  (the training loss's own)

    model = load(ref)
    device = next(net.parameters()).device
    base_lambda = float(model.meta["lambda"])
    ssim_weight = float(model.meta.get("ssim_weight", 0.0))
    height, width = size
    pixels = height * width
    target = torch.from_numpy(np.ascontiguousarray(x[:, :, :height, :width])).to(device)
    gain = torch.from_numpy(np.stack([
        np.ones(y.shape[1], np.float32) if g is None else g.astype(np.float32)
        for g in gains])[:, :, None, None]).to(device)
    lambdas = torch.tensor([rung_lambda(base_lambda, g) for g in gains], device=device)
    medians = model.z_medians_fixed / float(1 << FRACTION_BITS)
    medians = torch.from_numpy(medians).float().to(device).view(1, -1, 1, 1)
    z_bits_table, z_lows = _hyper_latent_bits(model, device)
    conditional = net.gaussian_conditional

    def loss(y_var: Tensor, z_var: Tensor, temperature: float | None,
             generators: list[Generator] | None = None) -> Tensor:
        z_symbols = _straight_through_round(z_var - medians)
        z_bits = _table_bits(z_symbols, z_bits_table, z_lows).sum(dim=(1, 2, 3))
        z_hat = z_symbols + medians
        scales, means = net.h_s(z_hat).chunk(2, 1)
        y_gained, scales, means = y_var * gain, scales * gain, means * gain
        residual = y_gained - means
        rounded = (_straight_through_round(residual) if temperature is None
                   else _gumbel_round(residual, temperature, generators))
        y_hat = rounded + means
        y_likelihood = conditional.likelihood_lower_bound(
            conditional._likelihood(y_hat, scales, means))
        bits = -torch.log2(y_likelihood).sum(dim=(1, 2, 3)) + z_bits
        x_hat = net.g_s(y_hat / gain)[:, :, :height, :width].clamp(0.0, 1.0)
        mse = ((x_hat - target) ** 2).mean(dim=(1, 2, 3))
        similarity = ssim(x_hat, target, data_range=1.0, size_average=False) \
            if ssim_weight else 1.0
        return bits / pixels + lambdas * distortion(mse, similarity, ssim_weight)

    y_var = torch.from_numpy(y).to(device).requires_grad_(True)
    z_var = torch.from_numpy(z).to(device).requires_grad_(True)
    best_y, best_z = y_var.detach().clone(), z_var.detach().clone()
    best = torch.full((len(y),), math.inf, device=device)
    optimizer = torch.optim.Adam([y_var, z_var], lr=LEARNING_RATE)
    generators = [torch.Generator(device=device).manual_seed(SEED) for _ in range(len(y))]

    def keep_better(y_now: Tensor, z_now: Tensor) -> None:
        with torch.no_grad():
            hard = loss(y_now, z_now, None)
            better = hard < best
            best[better] = hard[better]
            best_y[better] = y_now.detach()[better]
            best_z[better] = z_now.detach()[better]

    for step in range(steps):
        keep_better(y_var, z_var)
        progress = step / steps
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * progress))
        temperature = max(TEMPERATURE_START * math.exp(-TEMPERATURE_DECAY * progress),
                          TEMPERATURE_FLOOR)
        optimizer.zero_grad()
        loss(y_var, z_var, temperature, generators).sum().backward()
        optimizer.step()
    keep_better(y_var, z_var)
    return best_y.cpu().numpy(), best_z.cpu().numpy()
