"""An int8 synthesis transform, and a model id that decodes with it.

onnxruntime's CPU provider has int8 kernels for Conv (``QLinearConv``, VNNI where the CPU
has it) but none for ConvTranspose, so each transposed convolution of g_s is rewritten
exactly as a 3x3 convolution to four times the channels and a pixel shuffle (the
sub-pixel form). The convolutions after the first are then quantized statically (QDQ:
int8 weights per output channel, uint8 activations on per-tensor grids); the first one,
whose input is the latent itself, and the inverse GDN stay in float. The last
convolution's output is quantized on the output's own pixel grid, so that step is the
decoder's final rounding and adds no error.

:class:`QuantizationAware` simulates exactly that quantization in PyTorch for
fine-tuning on cached latents (``benchmarks/int8_synthesis.py --save`` trains it and
measures the result); :func:`export_int8_model` turns such a fine-tuned synthesis into a
model file beside its parent's: the same analysis, hyper-synthesis, entropy tables and
rungs (so the same bits), a new synthesis, a new model id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from ..model_file import read_model_file, write_model_file
from ..model_store import ModelRef, load, register_model, released_in
from ..network.model import Synthesis
from ..network.release import network_from_release

#: for each output phase of a stride-2, pad-2, 5x5 transposed convolution: which kernel
#: row (column) multiplies the input at offset t - 1 (t = 0, 1, 2) from the output's
#: source position
PHASE_TAPS = ({0: 4, 1: 2, 2: 0}, {1: 3, 2: 1})
#: the grid of the synthesis's own output (0-1, scaled by 255 to pixels): an activation
#: quantized on it is already rounded as the decoder rounds its output
PIXEL_GRID = (1.0 / 255.0, 0)
#: largest |weight| after quantization: 127 (8 bits), or 64 (7 bits: x86 int8 kernels
#: without VNNI add pairs of products in 16 bits, which 8-bit weights can saturate)
WEIGHT_MAX = {8: 127, 7: 64}


def sub_pixel(layer: nn.ConvTranspose2d) -> nn.Sequential:
    """The same map as ``layer`` (5x5, stride 2, padding 2, output padding 1) as a 3x3
    convolution to 4x the channels and a pixel shuffle: exact up to float rounding."""
    weight = layer.weight.detach()  # (in, out, 5, 5)
    cin, cout = weight.shape[:2]
    kernel = torch.zeros(cout, 2, 2, cin, 3, 3)
    for a, rows in enumerate(PHASE_TAPS):
        for b, columns in enumerate(PHASE_TAPS):
            for t, row in rows.items():
                for u, column in columns.items():
                    kernel[:, a, b, :, t, u] = weight[:, :, row, column].T
    conv = nn.Conv2d(cin, 4 * cout, 3, padding=1)
    with torch.no_grad():
        # PixelShuffle reads channel c*4 + a*2 + b into output (c, 2i + a, 2j + b)
        conv.weight.copy_(kernel.reshape(4 * cout, cin, 3, 3))
        conv.bias.copy_(layer.bias.detach().repeat_interleave(4))
    return nn.Sequential(conv, nn.PixelShuffle(2))


def sub_pixel_synthesis(g_s: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*(sub_pixel(m) if isinstance(m, nn.ConvTranspose2d) else m
                           for m in g_s))


def activation_points() -> list[str]:
    """The activations quantized when the sub-pixel convolutions after the first are int8
    (onnxruntime's tensor names): each one's input (the inverse GDN's output) and output."""
    return [name for k in (1, 2, 3) for name in (
        f"/g_s/g_s.{2 * k - 1}/Mul_output_0", f"/g_s/g_s.{2 * k}/g_s.{2 * k}.0/Conv_output_0")]


def last_output() -> str:
    """The last convolution's output: the decoded pixels before the shuffle."""
    return activation_points()[-1]


def uint8_grid(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of onnxruntime's asymmetric uint8 quantization of [low, high]
    (widened to hold 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return scale, int(np.clip(np.rint(-low / scale), 0, 255))


class QuantizationAware(nn.Module):
    """The sub-pixel g_s as onnxruntime runs it with int8 convolutions after the first:
    int8 weights per output channel, uint8 activations on per-tensor grids (fake-quantized,
    straight-through gradients; the grids fixed or learned, except those in ``fixed``), the
    first convolution and the inverse GDN in float."""

    def __init__(self, sub: nn.Sequential, grids: dict[str, tuple[float, int]],
                 weight_max: int = 127, learn_grids: bool = False,
                 fixed: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.sub = sub
        self.weight_max = weight_max
        # one (scale, zero point) pair per quantized activation, learnable as in LSQ
        # (Esser et al. 2020) when asked
        self.names = list(grids)
        self.learned = {n: learn_grids and n not in fixed for n in self.names}
        self.scales = nn.ParameterList(
            [nn.Parameter(torch.tensor([grids[n][0]]), requires_grad=self.learned[n])
             for n in self.names])
        self.zero_points = nn.ParameterList(
            [nn.Parameter(torch.tensor([float(grids[n][1])]), requires_grad=self.learned[n])
             for n in self.names])

    def grids(self) -> dict[str, tuple[float, int]]:
        """The activation grids as they stand (learned, or as given)."""
        return {name: (float(scale.detach().abs()),
                       int(np.clip(np.rint(float(zero.detach())), 0, 255)))
                for name, scale, zero in zip(self.names, self.scales, self.zero_points,
                                             strict=True)}

    def _activation(self, x: torch.Tensor, name: str) -> torch.Tensor:
        k = self.names.index(name)
        scale, zero = self.scales[k], self.zero_points[k]
        if self.learned[name]:
            grad_factor = 1.0 / float(np.sqrt(x.numel() * 255))
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale.abs() + 1e-8, zero, 0, 255, grad_factor)
        return torch.fake_quantize_per_tensor_affine(
            x, float(scale.detach()), int(zero.detach()), 0, 255)

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / self.weight_max
        return torch.fake_quantize_per_channel_affine(
            w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -self.weight_max,
            self.weight_max)

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        x = self.sub[1](self.sub[0](y_hat))
        points = iter(activation_points())
        for k in (1, 2, 3):
            conv, shuffle = self.sub[2 * k]
            x = self._activation(x, next(points))
            x = nn.functional.conv2d(x, self._weight(conv.weight), conv.bias, padding=1)
            x = shuffle(self._activation(x, next(points)))
            if k < 3:
                x = self.sub[2 * k + 1](x)
        return x


def calibrate_grids(sub: nn.Sequential, latents: np.ndarray, percentile: float = 99.999
                    ) -> dict[str, tuple[float, int]]:
    """uint8 grids of the quantized activations from the float sub-pixel g_s on
    ``latents``: the central ``percentile`` of each tensor's values."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in activation_points()}
    names = iter(activation_points())
    hooks = []

    def record(inputs: str, outputs: str) -> object:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[inputs].append(args[0].detach().flatten())
            seen[outputs].append(out.detach().flatten())
        return hook

    for k in (1, 2, 3):
        hooks.append(sub[2 * k][0].register_forward_hook(record(next(names), next(names))))
    with torch.no_grad():
        for i in range(0, len(latents), 8):
            sub(torch.from_numpy(latents[i:i + 8]))
    for hook in hooks:
        hook.remove()
    grids = {}
    rng = np.random.default_rng(0)
    for name, parts in seen.items():
        values = torch.cat(parts).numpy()
        values = values[rng.integers(0, len(values), min(len(values), 4_000_000))]
        grids[name] = uint8_grid(float(np.percentile(values, 100 - percentile)),
                                 float(np.percentile(values, percentile)))
    return grids


class Latents(CalibrationDataReader):
    def __init__(self, latents: np.ndarray) -> None:
        self.items = iter(latents[i:i + 1] for i in range(len(latents)))

    def get_next(self) -> dict | None:
        item = next(self.items, None)
        return None if item is None else {"y_hat": item}


def prepared_graph(float_model: Path, out: Path
                   ) -> tuple[Path, list[tuple[onnx.NodeProto, bool]]]:
    """The graph onnxruntime's quantizer wants (shapes inferred), and its convolutions in
    order, each with whether it is an inverse GDN's (1x1)."""
    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    kernels = {init.name: list(init.dims[2:]) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    return prepared, [(node, kernels[node.input[1]] == [1, 1]) for node in convs]


def quantize_with_grids(float_model: Path, out: Path, latents: np.ndarray,
                        grids: dict[str, tuple[float, int]], reduced_weights: bool) -> Path:
    """int8 sub-pixel convolutions after the first, on the given activation grids; with
    ``reduced_weights``, weights in -64..64 (onnxruntime's reduce_range). Every quantized
    activation has its grid given, so ``latents`` (the calibration onnxruntime runs
    anyway) do not change the result."""
    prepared, convs = prepared_graph(float_model, out)
    # the first convolution (its input is the latent itself) and the inverse GDN in float
    exclude = [convs[0][0].name] + [node.name for node, is_gdn in convs if is_gdn]
    overrides = {name: [{"scale": np.array(scale, np.float32),
                         "zero_point": np.array(zero_point, np.uint8)}]
                 for name, (scale, zero_point) in grids.items()}
    quantize_static(str(prepared), str(out), Latents(latents), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=exclude, op_types_to_quantize=["Conv"],
                    reduce_range=reduced_weights,
                    extra_options={"TensorQuantOverrides": overrides})
    return out


def synthesis_onnx(g_s: nn.Module, channels: int) -> bytes:
    """``g_s`` as the codec's synthesis graph: y_hat -> x_hat, pixel values 0-255."""
    holder = nn.Module()
    holder.g_s = g_s
    buffer = io.BytesIO()
    axes = {name: {0: "batch", 2: "height", 3: "width"} for name in ("y_hat", "x_hat")}
    torch.onnx.export(Synthesis(holder).eval(), (torch.zeros(1, channels, 32, 32),), buffer,
                      input_names=["y_hat"], output_names=["x_hat"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return buffer.getvalue()


def load_fine_tuned(path: Path) -> dict:
    """A fine-tuned int8 synthesis as ``benchmarks/int8_synthesis.py --save`` writes it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = {"synthesis", "grids", "steps", "weight_bits"} - set(state)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds
        raise ValueError(f"{path} is not a fine-tuned int8 synthesis: {exc}") from None
    if missing:
        raise ValueError(f"{path} is not a fine-tuned int8 synthesis: it lacks "
                         f"{', '.join(sorted(missing))}")
    if state["weight_bits"] not in WEIGHT_MAX:
        raise ValueError(f"{path}: weights of {state['weight_bits']} bits; this quantization "
                         f"has {' or '.join(map(str, WEIGHT_MAX))}")
    return state


def int8_synthesis_bytes(parent: ModelRef, state: dict) -> tuple[bytes, dict]:
    """The quantized synthesis graph of a fine-tuned state on ``parent``'s g_s, and a
    description of it for the model file."""
    g_s = sub_pixel_synthesis(network_from_release(parent).g_s)
    try:
        g_s.load_state_dict(state["synthesis"])
    except RuntimeError as exc:
        raise ValueError(f"the fine-tuned synthesis does not fit {parent.model}'s: "
                         f"{str(exc).splitlines()[0]}") from None
    grids = {name: (float(scale), int(zero)) for name, (scale, zero) in state["grids"].items()}
    if set(grids) != set(activation_points()):
        raise ValueError("the fine-tuned synthesis has grids for other activations than "
                         "this quantization's")
    weight_bits = int(state["weight_bits"])
    channels = int(load(parent).meta["M"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        float_graph = folder / "float.onnx"
        float_graph.write_bytes(synthesis_onnx(g_s.eval(), channels))
        quantized = quantize_with_grids(
            float_graph, folder / "int8.onnx", np.zeros((1, channels, 4, 4), np.float32),
            grids, reduced_weights=weight_bits == 7)
        graph = quantized.read_bytes()
    description = {"form": "sub-pixel, int8 QDQ after the first convolution",
                   "weight_bits": weight_bits, "fine_tuning_steps": int(state["steps"]),
                   "activation_grids": {k: list(v) for k, v in sorted(grids.items())}}
    return graph, description


def export_int8_model(parent: ModelRef, fine_tuned: Path, model: str, weights_dir: Path,
                      default_quality: int | None = None) -> Path:
    """Write ``parent``'s model file with its synthesis replaced by the int8 one in
    ``fine_tuned`` as model ``model`` into ``weights_dir``, and register every rung."""
    source = load(parent)
    if source.int8_synthesis:
        raise ValueError(f"{parent.model}'s synthesis is already int8: derive from "
                         f"{source.meta.get('parent')} instead")
    if model in released_in(weights_dir):
        raise FileExistsError(f"{model} is already released: released weights never change")
    qualities = sorted(source.rungs)
    target = weights_dir / f"{model}-q{qualities[0]}-{qualities[-1]}.dlwsi"
    if target.exists():
        raise FileExistsError(f"{target} exists: released weights never change")
    if default_quality is not None and default_quality not in qualities:
        raise ValueError(f"default quality {default_quality} is not one of {parent.model}'s "
                         f"rungs {qualities[0]}..{qualities[-1]}")
    graph, description = int8_synthesis_bytes(parent, load_fine_tuned(fine_tuned))
    meta = {k: v for k, v in source.meta.items() if k not in ("format", "hyper_layers")}
    meta.update(model=model, parent=parent.model, parent_sha256=parent.sha256,
                synthesis=dict(description, fine_tuned_sha256=hashlib.sha256(
                    fine_tuned.read_bytes()).hexdigest()),
                exported=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    layers = [{"kind": layer.kind, "weight": layer.weight.astype(np.int32),
               "bias": layer.bias.astype(np.int64), "shift": layer.shift,
               "stride": layer.stride, "padding": layer.padding,
               "output_padding": layer.output_padding, "leaky_relu": layer.leaky_relu}
              for layer in source.hyper_synthesis.layers]
    write_model_file(
        target, meta=meta, analysis_onnx=source.analysis_onnx, synthesis_onnx=graph,
        hyper_layers=layers, z_medians_fixed=source.z_medians_fixed,
        z_tables=[(table.lo, table.freqs) for table in source.z_tables],
        scale_thresholds_fixed=source.scale_thresholds_fixed,
        y_tables=[(table.lo, table.freqs) for table in source.y_tables],
        rung_gains_fixed=dict(source.rungs))
    try:
        read_model_file(target)  # what was written reads back
    except ValueError:
        target.unlink()
        raise
    for quality in qualities:
        register_model(weights_dir, model, quality, target,
                       default_quality=quality == default_quality)
    return target
