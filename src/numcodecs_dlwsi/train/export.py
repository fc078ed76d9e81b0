"""Export a trained checkpoint as a released model file (``weights/<model>-q<N>[-<K>].dlwsi``).

The file holds everything a decoder needs and nothing it must recompute in floating
point: the analysis and synthesis transforms as ONNX graphs, the hyper-synthesis as
integer layers, the integer frequency tables of the entropy coder, and the latent gain
of each quality rung (one network, a whole ladder).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from compressai.models.google import get_scale_table
from torch import nn

from ..entropy_coding import quantize_pmf
from ..hyper_synthesis import FRACTION_BITS
from ..model_file import GAIN_BITS, GAIN_FIXED_MAX, GAIN_FIXED_MIN, PAD_MULTIPLE, write_model_file
from ..model_store import register_model, released_in
from ..network.model import ARCHITECTURE, Analysis, LiteMeanScaleHyperprior, Synthesis
from .data import TRAINING_SLIDES, VALIDATION_FILES, default_data_root, he_files

WEIGHT_BITS = 13  # |quantized weight| < 2**13, see hyper_synthesis.IntegerLayer's bound
TAIL_MASS = 1e-9  # as CompressAI's GaussianConditional


def _onnx_bytes(module: nn.Module, example: torch.Tensor, inputs: list[str],
                outputs: list[str]) -> bytes:
    axes = {name: {0: "batch", 2: "height", 3: "width"} for name in inputs + outputs}
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (example,), buffer, input_names=inputs,
                      output_names=outputs, dynamic_axes=axes, opset_version=17, dynamo=False)
    return buffer.getvalue()


def quantize_hyper_synthesis(h_s: nn.Sequential) -> list[dict]:
    """Post-training quantization of h_s into the integer layers of hyper_synthesis."""
    layers: list[dict] = []
    for module in h_s:
        if isinstance(module, nn.LeakyReLU):
            layers[-1]["leaky_relu"] = True
            continue
        if not isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            raise TypeError(f"cannot quantize {type(module).__name__} in h_s")
        weight = module.weight.detach().double().numpy()
        shift = int(math.floor(math.log2((2**WEIGHT_BITS - 1) / np.abs(weight).max())))
        bias = module.bias.detach().double().numpy()
        layers.append({
            "kind": "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv",
            "weight": np.rint(weight * 2.0**shift).astype(np.int32),
            "bias": np.rint(bias * 2.0 ** (shift + FRACTION_BITS)).astype(np.int64),
            "shift": shift,
            "stride": module.stride[0],
            "padding": module.padding[0],
            "output_padding": module.output_padding[0] if isinstance(
                module, nn.ConvTranspose2d) else 0,
            "leaky_relu": False,
        })
    return layers


@torch.no_grad()
def hyper_latent_tables(model: LiteMeanScaleHyperprior) -> tuple[np.ndarray, list, list]:
    """Per-channel (lo, freqs) of the factorized prior, as CompressAI's update() bounds it."""
    eb = model.entropy_bottleneck
    medians = eb.quantiles[:, 0, 1]
    minima = torch.clamp(torch.ceil(medians - eb.quantiles[:, 0, 0]), min=0).long()
    maxima = torch.clamp(torch.ceil(eb.quantiles[:, 0, 2] - medians), min=0).long()
    los, freqs = [], []
    for c in range(len(medians)):
        samples = torch.arange(-minima[c], maxima[c] + 1, dtype=torch.float32) + medians[c]
        samples = samples.reshape(1, 1, -1).expand(eb.channels, 1, -1).contiguous()
        pmf, lower, upper = eb._likelihood(samples, stop_gradient=True)
        tail = torch.sigmoid(lower[c, 0, 0]) + torch.sigmoid(-upper[c, 0, -1])
        los.append(-int(minima[c]))
        freqs.append(quantize_pmf(pmf[c, 0].double().numpy(), float(tail)))
    return medians.double().numpy(), los, freqs


def gaussian_tables(scale_table: np.ndarray) -> tuple[list, list]:
    """(lo, freqs) of a zero-mean quantized Gaussian for each scale of the table."""
    multiplier = -float(torch.special.ndtri(torch.tensor(TAIL_MASS / 2, dtype=torch.float64)))
    los, freqs = [], []
    for scale in scale_table:
        half = int(math.ceil(scale * multiplier))
        k = torch.arange(-half, half + 1, dtype=torch.float64)
        upper = torch.special.ndtr((k + 0.5) / scale)
        lower = torch.special.ndtr((k - 0.5) / scale)
        pmf = (upper - lower).numpy()
        tail = float(2 * torch.special.ndtr(torch.tensor(-(half + 0.5) / scale)))
        los.append(-half)
        freqs.append(quantize_pmf(pmf, tail))
    return los, freqs


def _training_record(data_root: Path) -> list[str]:
    files = [p.relative_to(data_root).as_posix() for p in he_files(data_root, "train")]
    return files + [s for s in TRAINING_SLIDES if (data_root / s).exists()]


def rung_gains(gains: list[float], channels: int) -> list[np.ndarray]:
    """Scalar gains (ascending: quality rises with the gain) as fixed-point (M,) vectors."""
    if not gains or any(not b > a for a, b in zip(gains, gains[1:], strict=False)):
        raise ValueError(f"gains must be strictly increasing, got {gains}")
    fixed = [np.full(channels, round(g * 2**GAIN_BITS), dtype=np.int64) for g in gains]
    if any(not GAIN_FIXED_MIN <= f[0] <= GAIN_FIXED_MAX for f in fixed):
        raise ValueError(f"gains must lie in 1/64..64, got {gains}")
    return fixed


def export_model(checkpoint: Path, weights_dir: Path, family: str, quality: int,
                 gains: list[float] | None = None, data_root: Path | None = None,
                 make_default: bool = False, default_quality: int | None = None) -> Path:
    """Write one file holding rungs ``quality``, ``quality + 1``, ... (one per gain) into
    ``weights_dir`` and register each rung."""
    gains = gains or [1.0]
    last = quality + len(gains) - 1
    if not 1 <= quality <= last <= 255:
        raise ValueError(f"qualities {quality}..{last} are outside 1..255")
    if default_quality is not None and not quality <= default_quality <= last:
        raise ValueError(f"default quality {default_quality} is not among {quality}..{last}")
    name = f"{family}-q{quality}" + (f"-{last}" if last > quality else "")
    target = weights_dir / f"{name}.dlwsi"
    if target.exists():
        raise FileExistsError(f"{target} exists: released weights never change; "
                              "export under a new model id instead")
    taken = sorted(set(released_in(weights_dir).get(family, {}))
                   & {str(q) for q in range(quality, last + 1)})
    if taken:
        raise FileExistsError(f"{family} quality {', '.join(taken)} is already released: "
                              "released weights never change")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["model_config"]
    model = LiteMeanScaleHyperprior.from_config(cfg)
    model.load_state_dict(state["model"])
    model.eval()

    medians, z_lo, z_freqs = hyper_latent_tables(model)
    scale_table = get_scale_table().double().numpy()
    y_lo, y_freqs = gaussian_tables(scale_table)
    root = data_root or default_data_root()
    meta = {
        "model": family,
        "gains": list(gains),
        "architecture": ARCHITECTURE,
        "N": cfg["N"], "M": cfg["M"], "last": cfg["last"], "hyper": cfg.get("hyper", cfg["M"]),
        "first": cfg.get("first", cfg["N"]),
        "analysis": cfg.get("analysis", cfg["N"]),
        "hyper_kernel": cfg.get("hyper_kernel", 3),
        "ssim_weight": state["config"].get("ssim_weight", 0.0),
        "pad_multiple": PAD_MULTIPLE,
        "fraction_bits": FRACTION_BITS,
        "lambda": state["config"]["lmbda"],
        "steps": state["step"],
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "trained_on": _training_record(root),
        "held_out": list(VALIDATION_FILES),
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    M = cfg["M"]
    fixed = rung_gains(gains, M)
    write_model_file(
        target,
        meta=meta,
        analysis_onnx=_onnx_bytes(Analysis(model), torch.rand(1, 3, 128, 128), ["x"],
                                  ["y", "z"]),
        synthesis_onnx=_onnx_bytes(Synthesis(model), torch.randn(1, M, 8, 8), ["y_hat"],
                                   ["x_hat"]),
        hyper_layers=quantize_hyper_synthesis(model.h_s),
        z_medians_fixed=np.rint(medians * 2.0**FRACTION_BITS).astype(np.int64),
        z_tables=list(zip(z_lo, z_freqs, strict=True)),
        scale_thresholds_fixed=np.floor(scale_table * 2.0**FRACTION_BITS).astype(np.int64),
        y_tables=list(zip(y_lo, y_freqs, strict=True)),
        rung_gains_fixed={quality + i: f for i, f in enumerate(fixed)},
    )
    for q in range(quality, last + 1):
        register_model(weights_dir, family, q, target, make_default=make_default,
                       default_quality=q == default_quality)
    print(json.dumps({"exported": str(target)}))
    return target
