"""An int8 synthesis transform: what integer inference buys in decoding speed, and costs.

Decoding is two thirds synthesis (four 5x5 stride-2 transposed convolutions with inverse
GDN). onnxruntime's CPU provider has int8 kernels for Conv (``QLinearConv``, with VNNI
where the CPU has it) but none for ConvTranspose, so each transposed convolution is first
rewritten exactly as a 3x3 convolution with four times the output channels followed by a
pixel shuffle (the sub-pixel form: output phase (a, b) of a stride-2 5x5 transposed
convolution sees a 3x3 neighbourhood of the input). Then the graph is quantized
statically (onnxruntime.quantization, QDQ, int8 weights per channel, uint8 activations):
every tensor, or only the convolutions after the first on fixed activation grids, and
the latter again after quantization-aware fine-tuning on cached latents (the bits do not
change; no encoder pass per step).

The released g_s and each variant decode the *same* latents (the held-out tiles coded
once per rung, as ``narrow_synthesis.py`` does): reported are milliseconds per 512²
chunk on one onnxruntime thread, PSNR and SSIM per rung, and the BD-rate against the
released decoder at the same bits. Pixels change, so a decoder built on this would be a
new model id.

    python benchmarks/int8_synthesis.py --json docs/results/int8_synthesis.json
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from narrow_synthesis import (  # noqa: E402
    Pixels,
    curve,
    decode_ms,
    export,
    session,
    setup,
    train_on_latents,
)
from rd import bd_rate  # noqa: E402
from report import finish, percent, provenance, table  # noqa: E402

RELEASED = "released (float, ConvTranspose)"
#: for each output phase of a stride-2, pad-2, 5x5 transposed convolution: which kernel
#: row (column) multiplies the input at offset t - 1 (t = 0, 1, 2) from the output's
#: source position
PHASE_TAPS = ({0: 4, 1: 2, 2: 0}, {1: 3, 2: 1})


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


class Latents(CalibrationDataReader):
    def __init__(self, latents: np.ndarray) -> None:
        self.items = iter(latents[i:i + 1] for i in range(len(latents)))

    def get_next(self) -> dict | None:
        item = next(self.items, None)
        return None if item is None else {"y_hat": item}


def _prepared(float_model: Path, out: Path
              ) -> tuple[Path, list[tuple[onnx.NodeProto, bool]]]:
    """The graph onnxruntime's quantizer wants (shapes inferred), and its convolutions in
    order, each with whether it is an inverse GDN's (1x1)."""
    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    kernels = {init.name: list(init.dims[2:]) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    return prepared, [(node, kernels[node.input[1]] == [1, 1]) for node in convs]


def quantize_everywhere(float_model: Path, out: Path, latents: np.ndarray) -> Path:
    """Every tensor int8, on ranges from onnxruntime's percentile calibration."""
    prepared, _ = _prepared(float_model, out)
    quantize_static(str(prepared), str(out), Latents(latents), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile)
    return out


#: the activations onnxruntime quantizes when only the sub-pixel convolutions after the
#: first are int8: each one's input (the inverse GDN's output) and output
def activation_points() -> list[str]:
    return [name for k in (1, 2, 3) for name in (
        f"/g_s/g_s.{2 * k - 1}/Mul_output_0", f"/g_s/g_s.{2 * k}/g_s.{2 * k}.0/Conv_output_0")]


def uint8_grid(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of onnxruntime's asymmetric uint8 quantization of [low, high]
    (widened to hold 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return scale, int(np.clip(np.rint(-low / scale), 0, 255))


class QuantizationAware(nn.Module):
    """The sub-pixel g_s as onnxruntime runs it with int8 convolutions after the first:
    int8 weights per output channel, uint8 activations on per-tensor grids (fake-quantized,
    straight-through gradients; the grids fixed or learned), the first convolution and the
    inverse GDN in float."""

    def __init__(self, sub: nn.Sequential, grids: dict[str, tuple[float, int]],
                 weight_max: int = 127, learn_grids: bool = False) -> None:
        super().__init__()
        self.sub = sub
        self.weight_max = weight_max
        self.learn_grids = learn_grids
        # one (scale, zero point) pair per quantized activation, learnable as in LSQ
        # (Esser et al. 2020) when asked
        self.names = list(grids)
        self.scales = nn.ParameterList(
            [nn.Parameter(torch.tensor([grids[n][0]]), requires_grad=learn_grids)
             for n in self.names])
        self.zero_points = nn.ParameterList(
            [nn.Parameter(torch.tensor([float(grids[n][1])]), requires_grad=learn_grids)
             for n in self.names])

    def grids(self) -> dict[str, tuple[float, int]]:
        """The activation grids as they stand (learned, or as given)."""
        return {name: (float(scale.detach().abs()), int(np.clip(np.rint(float(zero)), 0, 255)))
                for name, scale, zero in zip(self.names, self.scales, self.zero_points,
                                             strict=True)}

    def _activation(self, x: torch.Tensor, name: str) -> torch.Tensor:
        k = self.names.index(name)
        scale, zero = self.scales[k], self.zero_points[k]
        if self.learn_grids:
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


def quantize_with_grids(float_model: Path, out: Path, latents: np.ndarray,
                        grids: dict[str, tuple[float, int]], reduced_weights: bool) -> Path:
    """int8 sub-pixel convolutions after the first, on the given activation grids; with
    ``reduced_weights``, weights in -64..64 (onnxruntime's reduce_range)."""
    prepared, convs = _prepared(float_model, out)
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


def title(results: dict) -> str:
    return "An int8 synthesis: integer inference against the released float decoder"


def render(results: dict) -> str:
    settings = results["settings"]
    rows, released = [], results["rows"][RELEASED]
    for name, row in results["rows"].items():
        rates = row.get("bd_rate_vs_released")
        rows.append([name, f"{row['decode_ms_512']:.1f}",
                     f"{released['decode_ms_512'] / row['decode_ms_512']:.2f}x",
                     *(f"{p['psnr']:.2f}, {p['ssim']:.4f}" for p in row["curve"]),
                     f"{percent(rates['ssim'])} / {percent(rates['psnr'])}" if rates else "0"])
    rungs = [f"q{p['setting']}" for p in released["curve"]]
    weights = ("int8 weights per output channel"
               + (" (in -64..64 after the first convolution)"
                  if settings.get("reduced_weights") == "True" else ""))
    description = " ".join([
        f"The synthesis transform of `{settings['model']}` decoding the same latents: the",
        f"{results['held_out_tiles']} held-out tiles coded once at each of rungs",
        f"{settings['rungs']}. Sub-pixel: each transposed convolution rewritten exactly as a",
        "3x3 convolution and a pixel shuffle (largest difference from the released decoder",
        f"{results['sub_pixel_max_difference']:.2g} grey levels before rounding).",
        f"int8: onnxruntime static quantization (QDQ; {weights}, uint8 activations).",
        "*Everywhere*: every tensor, on ranges from onnxruntime's percentile calibration.",
        "*After the first convolution*: the three sub-pixel convolutions after the first,",
        "on activation grids holding the central 99.999% of their values over latents of",
        f"{settings['crops']} training-side crops; the first convolution and the inverse GDN",
        "stay in float. *Quantization-aware steps*: that synthesis fine-tuned with the same",
        "quantization simulated (straight-through gradients"
        + ("; the grids learned too" if settings.get("learn_grids") == "True" else "")
        + f"; batches of {settings['batch']} cached latents, learning rate {settings['lr']},",
        "the model's own distortion against",
        ("the released decoder's output" if settings.get("distill") == "True"
         else "the original crops") + "), then quantized on",
        "the same grids. Milliseconds per 512² chunk on",
        f"one onnxruntime thread, median of {settings['repeat']}; onnxruntime",
        f"{results['onnxruntime']}, CPU flags: {results['cpu_flags']}. BD-rate against the",
        "released decoder at the same bits."])
    return "\n".join([
        description, "",
        table(["synthesis", "ms per 512²", "speed vs released",
               *(f"{r}: PSNR dB, SSIM" for r in rungs),
               "BD-rate vs released (SSIM / PSNR)"], rows)])


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                     if f in flags) or "no AVX2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="he-mshl-v3")
    p.add_argument("--rungs", default="3,7,11", help="rungs the tiles are coded at")
    p.add_argument("--crops", type=int, default=128,
                   help="training-side 256² crops: their latents calibrate the activations "
                        "and fine-tune the synthesis")
    p.add_argument("--per-image", type=int, default=4, help="held-out tiles per image")
    p.add_argument("--minutes", type=float, default=20.0,
                   help="quantization-aware fine-tuning time (0: none, or with --init only "
                        "measure the saved synthesis)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads for fine-tuning")
    p.add_argument("--repeat", type=int, default=9, help="timed runs per decoder")
    p.add_argument("--reduced-weights", action="store_true",
                   help="weights in -64..64 (7 bits): x86 int8 kernels without VNNI then "
                        "cannot saturate, so every x86 CPU computes the same pixels")
    p.add_argument("--learn-grids", action="store_true",
                   help="learn the activation grids during fine-tuning (LSQ)")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune towards the released decoder's output on the same latents "
                        "instead of the original crops")
    p.add_argument("--init", type=Path, metavar="PT",
                   help="continue fine-tuning from a --save of an earlier run (its weights "
                        "and grids)")
    p.add_argument("--save", type=Path, metavar="DIR",
                   help="write the fine-tuned synthesis here: synthesis_qat.pt (weights and "
                        "grids, for --init) and synthesis_int8.onnx (the quantized graph)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    weight_max = 64 if args.reduced_weights else 127
    state: dict = {}
    if args.init:  # checked before minutes of caching
        try:
            state = torch.load(args.init, map_location="cpu")
            if not {"synthesis", "grids", "steps"} <= set(state):
                raise KeyError("synthesis, grids, steps")
        except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds
            p.error(f"--init {args.init}: not a --save of this script ({exc!r})")
    qualities = [int(q) for q in args.rungs.split(",")]
    run = setup(args.model, qualities, args.crops, args.per_image, seed=2)
    meta, channels, released = run.meta, run.channels, run.released
    train_y, train_x, held_out, test_y, bpp = (run.train_y, run.train_x, run.held_out,
                                               run.test_y, run.bpp)
    sub = sub_pixel_synthesis(released).eval()
    with torch.no_grad():
        probe = torch.from_numpy(test_y[:4])
        difference = float((Pixels(released)(probe) - Pixels(sub)(probe)).abs().max())
    grids = calibrate_grids(sub, train_y)
    steps, losses = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {RELEASED: export(released, channels, folder / "released.onnx"),
                 "sub-pixel (float)": export(sub, channels, folder / "sub.onnx")}
        print("quantizing ...", file=sys.stderr)
        paths["sub-pixel, int8 everywhere (onnxruntime's percentile calibration)"] = (
            quantize_everywhere(paths["sub-pixel (float)"], folder / "int8_all.onnx",
                                train_y[::4]))
        paths["sub-pixel, int8 after the first convolution"] = quantize_with_grids(
            paths["sub-pixel (float)"], folder / "int8.onnx", train_y[:8], grids,
            args.reduced_weights)
        if args.minutes > 0 or args.init:
            print(f"quantization-aware fine-tuning for {args.minutes:g} minutes ...",
                  file=sys.stderr)
            tuned = copy.deepcopy(sub).train()
            start_grids, earlier_steps = grids, 0
            if args.init:
                tuned.load_state_dict(state["synthesis"])
                start_grids = {name: tuple(grid) for name, grid in state["grids"].items()}
                earlier_steps = int(state["steps"])
            aware = QuantizationAware(tuned, start_grids, weight_max, args.learn_grids)
            targets = train_x
            if args.distill:  # what the released decoder makes of each latent, 0-255
                with torch.no_grad():
                    targets = np.concatenate([
                        Pixels(released)(torch.from_numpy(train_y[i:i + 16])).numpy()
                        for i in range(0, len(train_y), 16)])
            losses = train_on_latents(aware, aware.parameters(), train_y, targets,
                                      args.minutes, args.batch, args.lr,
                                      float(meta.get("ssim_weight", 0.0)))
            steps = earlier_steps + len(losses)
            name = (f"sub-pixel, int8 after the first convolution, {steps} quantization-aware "
                    "steps")
            paths[name] = quantize_with_grids(export(tuned.eval(), channels,
                                                     folder / "tuned.onnx"),
                                              folder / "int8_tuned.onnx", train_y[:8],
                                              aware.grids(), args.reduced_weights)
            grids = aware.grids()
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                torch.save({"synthesis": tuned.state_dict(), "grids": grids, "steps": steps},
                           args.save / "synthesis_qat.pt")
                shutil.copy(paths[name], args.save / "synthesis_int8.onnx")
        rows = {}
        for name, path in paths.items():
            print(f"measuring {name} ...", file=sys.stderr)
            decoder = session(path)
            rows[name] = {"decode_ms_512": decode_ms(decoder, channels, args.repeat),
                          "curve": curve(decoder, test_y, held_out, qualities, bpp)}
    for name, row in rows.items():
        if name != RELEASED:
            row["bd_rate_vs_released"] = {m: bd_rate(row["curve"], rows[RELEASED]["curve"], m)
                                          for m in ("ssim", "psnr")}
    results = {**provenance("int8_synthesis"),
               "settings": {k: str(v) for k, v in vars(args).items()},
               "held_out_tiles": len(held_out), "sub_pixel_max_difference": difference,
               "onnxruntime": ort.__version__, "cpu_flags": cpu_flags(),
               "fine_tuning_steps": steps, "loss_first_last": [losses[:20], losses[-20:]],
               "activation_grids": grids, "rows": rows}
    finish(results, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
