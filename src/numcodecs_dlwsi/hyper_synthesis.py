"""Bit-exact hyper-synthesis: the network that turns the hyper-latent into entropy parameters.

Whatever feeds the entropy coder must be identical on every machine, or the decoder
reads garbage. Float networks are not (summation order, FMA, kernels differ between
CPUs, GPUs and library versions), so this network runs in integer arithmetic after
post-training quantization (Ballé et al. 2019, "Integer networks for data compression
with latent-variable models").

All values are integers with ``FRACTION_BITS`` fractional bits. They are carried in
float64 so that BLAS does the matrix products: every product and partial sum is an
integer below 2**53, which IEEE-754 represents exactly, so the result is the same for
any summation order, blocking, threading or FMA use. Rounding is only ever a floor of
an exact value times a power of two, which is exact too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .blas_threads import single_threaded_blas

FRACTION_BITS = 10
#: Activations are clamped to this magnitude, which bounds every accumulator (see check).
ACTIVATION_LIMIT = float(1 << 26)
EXACT_LIMIT = float(1 << 52)
#: LeakyReLU slope 0.01 as the dyadic fraction 655 / 2**16.
LEAKY_NUMERATOR, LEAKY_SHIFT = 655, 16


@dataclass(frozen=True)
class IntegerLayer:
    """One quantized convolution: ``weight`` has scale 2**shift, activations 2**FRACTION_BITS."""

    kind: str  # "conv" (weight: Cout, Cin, k, k) or "deconv" (weight: Cin, Cout, k, k)
    weight: np.ndarray
    bias: np.ndarray  # integers at scale 2**(FRACTION_BITS + shift)
    shift: int
    stride: int
    padding: int
    output_padding: int
    leaky_relu: bool

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "deconv"):
            raise ValueError(f"unknown layer kind {self.kind!r}")
        if self.shift < 1 or self.stride < 1 or not 0 <= self.output_padding <= self.padding:
            raise ValueError("integer layer has invalid shift, stride or padding")
        w = np.asarray(self.weight, dtype=np.float64)
        if w.ndim != 4 or not np.array_equal(w, np.rint(w)):
            raise ValueError("integer layer weights must be a 4-d integer array")
        taps = w.shape[1] * w.shape[2] * w.shape[3] if self.kind == "conv" else (
            w.shape[0] * -(-w.shape[2] // self.stride) * -(-w.shape[3] // self.stride))
        bound = ACTIVATION_LIMIT * float(np.abs(w).max()) * taps + float(
            np.abs(self.bias).max())
        if bound >= EXACT_LIMIT:
            raise ValueError("integer layer could exceed exact float64 range")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", np.asarray(self.bias, dtype=np.float64))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (B, C, H, W) integer-valued float64 -> same layout."""
        acc = _conv(x, self.weight, self.stride, self.padding) if self.kind == "conv" else (
            _conv_transpose(x, self.weight, self.stride, self.padding, self.output_padding))
        acc += self.bias[None, :, None, None]
        # round half up back to FRACTION_BITS: exact (power-of-two scaling of integers)
        out = np.floor((acc + float(1 << (self.shift - 1))) * 2.0 ** -self.shift)
        if self.leaky_relu:
            out = np.where(out < 0, np.floor(out * LEAKY_NUMERATOR * 2.0**-LEAKY_SHIFT), out)
        return np.clip(out, -ACTIVATION_LIMIT, ACTIVATION_LIMIT)


def _conv(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    cout, cin, kh, kw = w.shape
    xp = np.pad(x.transpose(0, 2, 3, 1),
                ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    b = x.shape[0]
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    # im2col, channels last: one contiguous copy per tap, then a single product
    cols = np.empty((b, ho, wo, kh, kw, cin))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j] = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
    out = cols.reshape(b * ho * wo, -1) @ w.transpose(2, 3, 1, 0).reshape(-1, cout)
    return np.ascontiguousarray(out.reshape(b, ho, wo, cout).transpose(0, 3, 1, 2))


def _conv_transpose(x: np.ndarray, w: np.ndarray, stride: int, padding: int,
                    output_padding: int) -> np.ndarray:
    cin, cout, kh, kw = w.shape
    b, _, h, wd = x.shape
    # One product for all taps, channels last so each tap's block is contiguous.
    taps = w.transpose(0, 2, 3, 1).reshape(cin, kh * kw * cout)
    cols = (x.transpose(0, 2, 3, 1).reshape(b * h * wd, cin) @ taps).reshape(
        b, h, wd, kh, kw, cout)
    # Tap (i, j) lands on output rows of phase i % stride, shifted by i // stride: sum each
    # phase densely, then interleave the phases (col2im without strided accumulation).
    span_h, span_w = (kh - 1) // stride + 1, (kw - 1) // stride + 1
    phases = np.zeros((stride, stride, b, h + span_h - 1, wd + span_w - 1, cout))
    for i in range(kh):
        for j in range(kw):
            phases[i % stride, j % stride, :, i // stride : i // stride + h,
                   j // stride : j // stride + wd] += cols[:, :, :, i, j]
    full = np.empty((b, (h - 1) * stride + kh, (wd - 1) * stride + kw, cout))
    for p in range(stride):
        for q in range(stride):
            target = full[:, p::stride, q::stride]
            target[...] = phases[p, q, :, : target.shape[1], : target.shape[2]]
    ho = (h - 1) * stride - 2 * padding + kh + output_padding
    wo = (wd - 1) * stride - 2 * padding + kw + output_padding
    out = full[:, padding : padding + ho, padding : padding + wo]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class IntegerHyperSynthesis:
    """h_s as a stack of integer layers; output channels are (scales, means)."""

    layers: tuple[IntegerLayer, ...]

    def __call__(self, z_fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """z_fixed: (B, N, h, w) integers at 2**FRACTION_BITS -> (scales, means), same scale."""
        x = np.clip(np.asarray(z_fixed, dtype=np.float64), -ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        with single_threaded_blas():
            for layer in self.layers:
                x = layer(x)
        half = x.shape[1] // 2
        return x[:, :half], x[:, half:]


#: Largest scale threshold served by a look-up table instead of a binary search.
LEVEL_TABLE_LIMIT = 1 << 22


@functools.lru_cache(maxsize=8)
def _level_table(thresholds: bytes) -> np.ndarray:
    """scale_levels of every integer scale 0 .. last threshold."""
    t = np.frombuffer(thresholds, dtype=np.int64)
    levels = np.searchsorted(t[:-1], np.arange(int(t[-1]) + 1), side="left")
    return levels.astype(np.min_scalar_type(len(t)))


def scale_levels(scales_fixed: np.ndarray, thresholds_fixed: np.ndarray) -> np.ndarray:
    """Index of the first scale-table entry >= each scale (the last entry catches the rest).

    Scales are integers (fixed point: floors of exact values), so below 0 every scale is
    level 0 and from the last threshold on the last level: clamped, each indexes a table of
    the binary search's answers, which is several times faster than searching.
    """
    thresholds = np.ascontiguousarray(thresholds_fixed, dtype=np.int64)
    if thresholds[0] < 0 or thresholds[-1] > LEVEL_TABLE_LIMIT:
        return np.searchsorted(thresholds[:-1], scales_fixed, side="left").astype(np.int64)
    table = _level_table(thresholds.tobytes())
    index = np.clip(scales_fixed, 0, thresholds[-1]).astype(np.intp)
    return table[index].astype(np.int64)
