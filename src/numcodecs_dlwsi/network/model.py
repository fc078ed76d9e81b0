"""The trained network: CompressAI's mean-scale hyperprior with a lighter synthesis.

Decoding speed on a CPU is dominated by the synthesis transform at full resolution, so
its last upsampling stage has half the channels of the analysis side (measured with
onnxruntime on 2 cores, 512x512: 57 ms instead of 180 ms for the plain N=64 g_s). Its
first stage (1/8 resolution) and g_a's hidden stages may be made wider than N; what each
costs per chunk is measured by ``benchmarks/transform_speed.py``.
"""

from __future__ import annotations

import torch
from compressai.layers import GDN
from compressai.models import MeanScaleHyperprior
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

#: Architecture name stored in every exported model; the runtime checks it.
ARCHITECTURE = "mbt2018-mean-lite"


def ste_round(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (torch.round(x) - x).detach() + x


class LiteMeanScaleHyperprior(MeanScaleHyperprior):
    """MeanScaleHyperprior (Minnen et al. 2018) with g_s narrowed at full resolution.

    Training uses additive noise for the rate term and straight-through rounding for
    what the synthesis sees (Minnen & Singh 2020), so training matches decoding.
    """

    def __init__(self, N: int = 64, M: int = 96, last: int = 32, hyper: int = 0,
                 first: int = 0, analysis: int = 0, hyper_kernel: int = 3) -> None:
        super().__init__(N=N, M=M)
        self.last = last
        self.first = first or N  # channels of g_s's first (1/8 resolution) stage
        # g_a's hidden width: the encoder's cost only, decoding does not run it
        self.analysis = analysis or N
        if self.analysis != N:
            a = self.analysis
            self.g_a = nn.Sequential(conv(3, a), GDN(a), conv(a, a), GDN(a), conv(a, a),
                                     GDN(a), conv(a, M))
        # h_s runs in exact integer arithmetic on the CPU, so its hidden width is kept
        # independent of M: a wider latent costs only h_s's last layer (0 = CompressAI's M)
        self.hyper = hyper or M
        # h_s's last layer is exact integer code at the latent's resolution, the largest
        # stage of CPU decoding: a 1x1 kernel costs 9x less than CompressAI's 3x3 and, on
        # he-mshl-v2's latents, 0.1% of rate (benchmarks/hyper_synthesis_width.py)
        self.hyper_kernel = hyper_kernel
        if self.hyper != M or hyper_kernel != 3:
            self.h_s = nn.Sequential(
                deconv(N, self.hyper),
                nn.LeakyReLU(inplace=True),
                deconv(self.hyper, self.hyper * 3 // 2),
                nn.LeakyReLU(inplace=True),
                conv(self.hyper * 3 // 2, M * 2, stride=1, kernel_size=hyper_kernel),
            )
        self.g_s = nn.Sequential(
            deconv(M, self.first),
            GDN(self.first, inverse=True),
            deconv(self.first, N),
            GDN(N, inverse=True),
            deconv(N, last),
            GDN(last, inverse=True),
            deconv(last, 3),
        )

    def forward(self, x: Tensor, gain: Tensor | None = None) -> dict:
        """``gain`` (B, 1, 1, 1), optional: code each crop at that latent gain, as a
        quality rung of the exported ladder does (y, its means and scales are multiplied
        by it before rounding, and y_hat divided by it after)."""
        y = self.g_a(x)
        # Under mixed precision (training with --amp bf16) only g_a and g_s run in bf16:
        # the hyperprior and both entropy models stay in float32, since bf16 likelihoods
        # (8 mantissa bits) break the rate term, and h_s is exact integer code when decoding.
        # Without autocast this block and the casts change nothing.
        with torch.autocast(x.device.type, enabled=False):
            y = y.float()
            z = self.h_a(y)
            _, z_likelihoods = self.entropy_bottleneck(z)
            z_offset = self.entropy_bottleneck._get_medians()
            z_hat = ste_round(z - z_offset) + z_offset
            scales_hat, means_hat = self.h_s(z_hat).chunk(2, 1)
            if gain is not None:
                y, scales_hat, means_hat = y * gain, scales_hat * gain, means_hat * gain
            _, y_likelihoods = self.gaussian_conditional(y, scales_hat, means=means_hat)
            y_hat = ste_round(y - means_hat) + means_hat
            if gain is not None:
                y_hat = y_hat / gain
        x_hat = self.g_s(y_hat).float()
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    @classmethod
    def from_config(cls, cfg: dict) -> LiteMeanScaleHyperprior:
        """The model a checkpoint's ``model_config`` (``config()``) describes; keys that
        older checkpoints lack take their defaults."""
        if cfg.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"checkpoint architecture {cfg['architecture']} is not "
                             f"{ARCHITECTURE}")
        return cls(cfg["N"], cfg["M"], cfg["last"], cfg.get("hyper", 0), cfg.get("first", 0),
                   cfg.get("analysis", 0), cfg.get("hyper_kernel", 3))

    def config(self) -> dict:
        return {"architecture": ARCHITECTURE, "N": self.N, "M": self.M, "last": self.last,
                "hyper": self.hyper, "first": self.first, "analysis": self.analysis,
                "hyper_kernel": self.hyper_kernel}


def widen_state(state: dict[str, Tensor], target: LiteMeanScaleHyperprior) -> dict[str, Tensor]:
    """A checkpoint of a narrower model mapped into ``target`` without changing its output.

    Every old weight keeps its place, new weights keep ``target``'s fresh initialisation,
    and weights from new input channels to old outputs are zero, so reconstructions and
    rates start where the narrow model was and only the new channels (latent, g_a's hidden
    stages, g_s's first stage) are learned from scratch (Net2Net-style widening: a wider
    model reuses the narrow model's training).
    """
    out = {name: value.clone() for name, value in target.state_dict().items()}
    for name, old in state.items():
        if name not in out:
            raise ValueError(f"checkpoint has {name}, which the wider model lacks")
        value = out[name]
        if name.startswith("h_s.4."):
            # the last h_s layer emits (scales, means): each half maps to its own half
            half_old, half_new = old.shape[0] // 2, value.shape[0] // 2
            _copy_block(value[:half_old], old[:half_old])
            _copy_block(value[half_new : half_new + half_old], old[half_old:])
            if value.ndim == 4:
                value[:half_old, old.shape[1]:] = 0.0
                value[half_new : half_new + half_old, old.shape[1]:] = 0.0
        else:
            _copy_block(value, old)
    for name, module in target.named_modules():
        weight = f"{name}.weight"
        if weight not in state or name.startswith("h_s.4"):
            continue
        old = state[weight]
        if isinstance(module, nn.ConvTranspose2d):  # weight is (in, out, kh, kw)
            out[weight][old.shape[0]:, : old.shape[1]] = 0.0
        elif isinstance(module, nn.Conv2d):  # weight is (out, in, kh, kw)
            out[weight][: old.shape[0], old.shape[1]:] = 0.0
    return out


def _copy_block(target: Tensor, source: Tensor) -> None:
    if any(s > t for s, t in zip(source.shape, target.shape, strict=True)):
        raise ValueError(f"cannot narrow {tuple(source.shape)} into {tuple(target.shape)}")
    target[tuple(slice(0, n) for n in source.shape)] = source


class Analysis(nn.Module):
    """x in [0, 1] -> (y, z): the encoder-side graph exported to ONNX."""

    def __init__(self, model: LiteMeanScaleHyperprior) -> None:
        super().__init__()
        self.g_a = model.g_a
        self.h_a = model.h_a

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.g_a(x)
        return y, self.h_a(y)


class Synthesis(nn.Module):
    """y_hat -> x_hat in [0, 255]: the decoder graph exported to ONNX."""

    def __init__(self, model: LiteMeanScaleHyperprior) -> None:
        super().__init__()
        self.g_s = model.g_s

    def forward(self, y_hat: Tensor) -> Tensor:
        return (self.g_s(y_hat) * 255.0).clamp(0.0, 255.0)
