"""An int8 synthesis transform: what integer inference buys in decoding speed, and costs.

Decoding is two thirds synthesis (four 5x5 stride-2 transposed convolutions with inverse
GDN). onnxruntime's CPU provider has int8 kernels for Conv but none for ConvTranspose, so
each transposed convolution is first rewritten exactly in the sub-pixel form (a 3x3
convolution to four times the channels, then a pixel shuffle; see
``numcodecs_dlwsi.train.int8_synthesis``). Then the graph is quantized statically (QDQ,
int8 weights per channel, uint8 activations): every tensor, or only the convolutions after
the first on fixed activation grids, and the latter again after quantization-aware
fine-tuning on cached latents (the bits do not change; no encoder pass per step).
``--pixel-grid`` puts the last convolution's output on the output's own pixel grid, so that
quantization is the decoder's final rounding.

The released g_s and each variant decode the *same* latents (the held-out tiles coded
once per rung, as ``narrow_synthesis.py`` does): reported are milliseconds per 512²
chunk on one onnxruntime thread, PSNR and SSIM per rung, and the BD-rate against the
released decoder at the same bits. Pixels change, so a decoder built on this is a new
model id: ``--save DIR`` keeps the fine-tuned synthesis, and ``dlwsi-train export-int8
DIR/synthesis_qat.pt --parent MODEL --model NEW`` releases it.

    python benchmarks/int8_synthesis.py --minutes 25 --learn-grids --distill --pixel-grid \
        --reduced-weights --save runs/int8 --json docs/results/int8_synthesis.json
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from numcodecs_dlwsi.runtime import linux_cpu_flags
from numcodecs_dlwsi.train.int8_synthesis import (
    PIXEL_GRID,
    WEIGHT_MAX,
    Latents,
    QuantizationAware,
    calibrate_grids,
    last_output,
    prepared_graph,
    quantize_with_grids,
    sub_pixel_synthesis,
)

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


def quantize_everywhere(float_model: Path, out: Path, latents: np.ndarray) -> Path:
    """Every tensor int8, on ranges from onnxruntime's percentile calibration."""
    prepared, _ = prepared_graph(float_model, out)
    quantize_static(str(prepared), str(out), Latents(latents), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile)
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
        "the same grids."
        + (" The last convolution's output is quantized on the output's own pixel grid"
           " (1/255, fixed), so that step is the decoder's final rounding and adds no error."
           if settings.get("pixel_grid") == "True" else ""),
        "Milliseconds per 512² chunk on",
        f"one onnxruntime thread, median of {settings['repeat']}; onnxruntime",
        f"{results['onnxruntime']}, CPU flags: {results['cpu_flags']}. BD-rate against the",
        "released decoder at the same bits."])
    return "\n".join([
        description, "",
        table(["synthesis", "ms per 512²", "speed vs released",
               *(f"{r}: PSNR dB, SSIM" for r in rungs),
               "BD-rate vs released (SSIM / PSNR)"], rows)])


def cpu_flags() -> str:
    flags = linux_cpu_flags()
    if not flags:
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
    p.add_argument("--pixel-grid", action="store_true",
                   help="quantize the last convolution's output on the output's own pixel "
                        "grid (1/255, fixed): that quantization is then the decoder's final "
                        "rounding and adds no error")
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
    weight_bits = 7 if args.reduced_weights else 8
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
    if args.pixel_grid:
        grids[last_output()] = PIXEL_GRID
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
            fixed = frozenset()
            if args.pixel_grid:
                start_grids[last_output()] = PIXEL_GRID
                fixed = frozenset([last_output()])
            aware = QuantizationAware(tuned, start_grids, WEIGHT_MAX[weight_bits],
                                      args.learn_grids, fixed)
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
                torch.save({"synthesis": tuned.state_dict(), "grids": grids, "steps": steps,
                            "weight_bits": weight_bits}, args.save / "synthesis_qat.pt")
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
