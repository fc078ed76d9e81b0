"""A narrower synthesis transform for faster decoding, trained on cached latents.

Decoding is two thirds synthesis (``he-mshl-v3``: 14.4 kFLOP per pixel). A narrower g_s
decodes the *same* chunks (the analysis, hyper-synthesis and entropy models are
untouched, so the latents and the bits stay exactly as they are); only the pixels change,
so it would be a new model id, never a change behind he-mshl-v3. This measures what such
a g_s costs in quality and buys in speed, on this CPU:

1. Cache the decoder's exact inputs: training-side crops coded by the released model at a
   few rungs, entropy-decoded to y_hat (``image_codec.decode_latents``), with the crops.
2. Start the narrow g_s from the released one, keeping each layer's strongest channels
   (by weight norm; the inverse-GDN parameters sliced to match), and train it on the
   cache with the model's own distortion (``network.loss``), no encoder pass per step.
   Widths above the released ones grow it instead (``widened_synthesis``: the same
   function until training gives the new channels a say), to see what width buys.
3. On the held-out tiles (the ``rd.py`` split), code each tile at each rung once; decode
   with the released g_s (onnxruntime, as the codec does) and with the narrow one (its
   ONNX export, the same way), and report PSNR/SSIM per rung, the BD-rate of the narrow
   decoder against the released one at the same bits, its FLOPs and its decoding time.

    python benchmarks/narrow_synthesis.py --widths 48,48,24 --minutes 15 \\
        --json docs/results/narrow_synthesis.json
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from compressai.layers import GDN
from compressai.models.utils import deconv
from pytorch_msssim import ssim as torch_ssim
from torch import nn

from numcodecs_dlwsi.image_codec import decode_latents, encode_batch
from numcodecs_dlwsi.model_store import load, resolve
from numcodecs_dlwsi.network.loss import distortion
from numcodecs_dlwsi.network.release import network_from_release
from numcodecs_dlwsi.train.data import (
    CropSampler,
    default_data_root,
    load_training_images,
    validation_tiles,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rd import bd_rate, ssim  # noqa: E402  (the rate-distortion benchmark's own measures)
from report import finish, percent, provenance, table  # noqa: E402

SIDE = 512  # decoding time is measured on chunks of this side


def narrow_synthesis(released: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """g_s with hidden widths ``widths`` (3 stages), each layer's strongest channels of
    ``released`` copied in: deconv weights (in, out, k, k), inverse GDN beta and gamma."""
    convs = [released[i] for i in (0, 2, 4, 6)]
    gdns = [released[i] for i in (1, 3, 5)]
    keep, previous = [], torch.arange(convs[0].weight.shape[0])
    for layer, width in zip(convs[:3], widths, strict=True):
        strength = layer.weight.detach()[previous].pow(2).sum(dim=(0, 2, 3))
        keep.append(torch.sort(torch.topk(strength, width).indices).values)
        previous = keep[-1]
    ins = [torch.arange(convs[0].weight.shape[0]), *keep]
    outs = [*keep, torch.arange(3)]
    layers: list[nn.Module] = []
    for k, (layer, cin, cout) in enumerate(zip(convs, ins, outs, strict=True)):
        narrow = deconv(len(cin), len(cout))
        with torch.no_grad():
            narrow.weight.copy_(layer.weight[cin][:, cout])
            narrow.bias.copy_(layer.bias[cout])
        layers.append(narrow)
        if k < 3:
            gdn = GDN(len(cout), inverse=True)
            with torch.no_grad():
                beta = gdns[k].beta_reparam(gdns[k].beta)
                gamma = gdns[k].gamma_reparam(gdns[k].gamma)
                gdn.beta.copy_(gdn.beta_reparam.init(beta[cout]))
                gdn.gamma.copy_(gdn.gamma_reparam.init(gamma[cout][:, cout]))
            layers.append(gdn)
    return nn.Sequential(*layers)


def widened_synthesis(released: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """g_s with hidden widths ``widths`` (3 stages, each at least the released one's): the
    released channels copied in, the new ones starting silent. A new channel's incoming
    weights are small and random, its outgoing weights zero, and it does not enter the
    released channels' inverse GDN, so the widened g_s computes exactly what the released
    one does until training gives the new channels a say."""
    convs = [released[i] for i in (0, 2, 4, 6)]
    gdns = [released[i] for i in (1, 3, 5)]
    ins = [convs[0].weight.shape[0], *widths]
    outs = [*widths, 3]
    generator = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for k, (layer, cin, cout) in enumerate(zip(convs, ins, outs, strict=True)):
        old_in, old_out = layer.weight.shape[:2]
        if cin < old_in or cout < old_out:
            raise ValueError(f"widths {widths} are narrower than the released g_s's")
        wide = deconv(cin, cout)
        with torch.no_grad():
            wide.weight.zero_()
            wide.bias.zero_()
            wide.weight[:old_in, :old_out] = layer.weight
            wide.bias[:old_out] = layer.bias
            scale = 0.1 * float(layer.weight.std())
            wide.weight[:old_in, old_out:] = scale * torch.randn(
                old_in, cout - old_out, *layer.weight.shape[2:], generator=generator)
        layers.append(wide)
        if k < 3:
            gdn = GDN(cout, inverse=True)
            with torch.no_grad():
                beta = torch.ones(cout)
                beta[:old_out] = gdns[k].beta_reparam(gdns[k].beta)
                gamma = 0.1 * torch.eye(cout)
                gamma[:old_out, :old_out] = gdns[k].gamma_reparam(gdns[k].gamma)
                gamma[:old_out, old_out:] = 0.0
                gamma[old_out:, :old_out] = 0.0
                gdn.beta.copy_(gdn.beta_reparam.init(beta))
                gdn.gamma.copy_(gdn.gamma_reparam.init(gamma))
            layers.append(gdn)
    return nn.Sequential(*layers)


def resize_kind(released: nn.Sequential, widths: list[int]) -> str | None:
    """"narrow" when every width is at most the released one's, "wide" when every one is
    at least it, None for a mix (neither way keeps the released g_s as a start)."""
    released_widths = [released[i].weight.shape[1] for i in (0, 2, 4)]
    pairs = list(zip(widths, released_widths, strict=True))
    if all(w <= r for w, r in pairs):
        return "narrow"
    return "wide" if all(w >= r for w, r in pairs) else None


def resized_synthesis(released: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """Narrowed or widened as :func:`resize_kind` says."""
    if resize_kind(released, widths) == "narrow":
        return narrow_synthesis(released, widths)
    return widened_synthesis(released, widths)


def cached_latents(tiles: np.ndarray, qualities: list[int], model: str
                   ) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(y_hat (n, M, h, w) float32, the tiles they code (n, 3, H, W) uint8, bpp per
    rung): each tile at each rung, as the codec decodes it."""
    latents, targets, bpp = [], [], {}
    for quality in qualities:
        chunks = encode_batch(list(tiles), resolve(model, quality))
        bpp[quality] = 8.0 * sum(len(c) for c in chunks) / tiles[:, 0].size
        latents += [item.y_hat for item in decode_latents(chunks)]
        targets += list(tiles)
    return np.stack(latents).astype(np.float32), np.stack(targets), bpp


@dataclass
class Setup:
    """A released model's synthesis and the latents a benchmark trains and measures on."""

    meta: dict
    channels: int
    released: nn.Sequential  # the released g_s, in eval mode
    train_y: np.ndarray  # latents of training-side crops, and the crops
    train_x: np.ndarray
    held_out: np.ndarray  # the rd.py held-out tiles, their latents, bpp per rung
    test_y: np.ndarray
    bpp: dict[int, float]


def setup(model: str, qualities: list[int], crops: int, per_image: int, seed: int) -> Setup:
    """Load ``model``'s synthesis and cache, at every rung of ``qualities``, the latents
    of ``crops`` training-side 256² crops and of the held-out tiles, entropy-decoded as the
    codec decodes them."""
    release = resolve(model, qualities[-1])
    meta = load(release).meta
    root = default_data_root()
    print(f"caching latents of {crops} training-side crops and the held-out tiles at rungs "
          f"{qualities} ...", file=sys.stderr)
    sample = CropSampler(load_training_images(root, with_slides=False), 256, seed=seed).batch(
        crops)
    train_y, train_x, _ = cached_latents(sample, qualities, model)
    held_out = validation_tiles(root, size=256, per_image=per_image)
    test_y, _, bpp = cached_latents(held_out, qualities, model)
    return Setup(meta, int(meta["M"]), network_from_release(release).g_s.eval(), train_y,
                 train_x, held_out, test_y, bpp)


def train_on_latents(g_s: nn.Module, parameters: Iterable[nn.Parameter], latents: np.ndarray,
                     targets: np.ndarray, minutes: float, batch: int, lr: float,
                     ssim_weight: float) -> list[float]:
    """Train a synthesis on cached latents for ``minutes`` with the model's own distortion
    (no encoder pass per step); the loss of every step."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    rng = np.random.default_rng(0)
    deadline, losses = time.monotonic() + 60 * minutes, []
    while time.monotonic() < deadline:
        pick = rng.integers(0, len(latents), batch)
        target = torch.from_numpy(targets[pick]).float() / 255.0
        x_hat = g_s(torch.from_numpy(latents[pick])).clamp(0.0, 1.0)
        mse = ((x_hat - target) ** 2).mean(dim=(1, 2, 3))
        similarity = torch_ssim(x_hat, target, data_range=1.0, size_average=False)
        loss = distortion(mse, similarity, ssim_weight).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


class Pixels(nn.Module):
    """g_s with the codec's output scaling: pixel values 0-255, as the released graph."""

    def __init__(self, g_s: nn.Module) -> None:
        super().__init__()
        self.g_s = g_s

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return (self.g_s(y_hat) * 255.0).clamp(0.0, 255.0)


def export(g_s: nn.Module, channels: int, target: Path | io.BytesIO) -> Path | io.BytesIO:
    """``g_s`` as an ONNX graph with the codec's input and output names."""
    example = torch.zeros(1, channels, SIDE // 16, SIDE // 16)
    torch.onnx.export(Pixels(g_s).eval(), (example,), target, input_names=["y_hat"],
                      output_names=["x_hat"], dynamic_axes={"y_hat": {0: "b", 2: "h", 3: "w"}},
                      opset_version=17, dynamo=False)
    return target


def session(model: Path | bytes) -> ort.InferenceSession:
    """An onnxruntime CPU session with one thread, as the codec decodes a chunk."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                providers=["CPUExecutionProvider"])


def onnx_session(g_s: nn.Module, channels: int) -> ort.InferenceSession:
    return session(export(g_s, channels, io.BytesIO()).getvalue())


def decode_ms(run: ort.InferenceSession, channels: int, repeat: int = 7) -> float:
    """Median milliseconds of one 512² chunk's synthesis."""
    y_hat = np.random.default_rng(0).normal(size=(1, channels, SIDE // 16, SIDE // 16)
                                            ).astype(np.float32)
    run.run(None, {"y_hat": y_hat})
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run.run(None, {"y_hat": y_hat})
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def kflop_per_pixel(g_s: nn.Sequential) -> float:
    """Multiply-adds x 2 of the transposed convolutions per output pixel (stride 2 each:
    a layer's input has 1/4 of its output's pixels)."""
    convs = [m for m in g_s if isinstance(m, nn.ConvTranspose2d)]
    total, scale = 0.0, 1.0 / 4 ** len(convs)
    for layer in convs:
        cin, cout, kh, kw = layer.weight.shape
        total += 2 * cin * cout * kh * kw * scale
        scale *= 4
    return total / 1e3


def curve(session: ort.InferenceSession, latents: np.ndarray, tiles: np.ndarray,
          qualities: list[int], bpp: dict[int, float]) -> list[dict]:
    """(bpp, PSNR, SSIM) per rung of the tiles decoded through ``session``."""
    points, n = [], len(tiles)
    for k, quality in enumerate(qualities):
        decoded = [np.clip(np.rint(session.run(None, {"y_hat": latents[i:i + 1]})[0][0]),
                           0, 255).astype(np.uint8) for i in range(k * n, (k + 1) * n)]
        mse = np.mean([np.mean((d.astype(np.float64) - t) ** 2)
                       for d, t in zip(decoded, tiles, strict=True)])
        points.append({"setting": quality, "bpp": bpp[quality],
                       "psnr": float(10 * np.log10(255.0**2 / mse)),
                       "ssim": float(np.mean([ssim(d, t) for d, t in
                                              zip(decoded, tiles, strict=True)]))})
    return points


def title(results: dict) -> str:
    if "wide" in results["rows"]:
        return "A wider synthesis trained on cached latents"
    return "A narrower synthesis trained on cached latents"


def render(results: dict) -> str:
    """The page body: each synthesis's work, speed and quality at the same bits."""
    settings = results["settings"]
    rows = []
    for name, row in results["rows"].items():
        rates = row.get("bd_rate_vs_released")
        rows.append([name, f"{row['kflop_per_pixel']:.1f}", f"{row['decode_ms_512']:.1f}",
                     *(f"{p['psnr']:.2f}, {p['ssim']:.4f}" for p in row["curve"]),
                     f"{percent(rates['ssim'])} / {percent(rates['psnr'])}" if rates else "0"])
    rungs = [f"q{p['setting']}" for p in next(iter(results["rows"].values()))["curve"]]
    return "\n".join([
        f"The synthesis transform g_s of `{settings['model']}` with hidden widths "
        f"{settings['widths']} ("
        + ("the released channels kept, the new ones starting silent"
           if "wide" in results["rows"] else "its strongest channels kept")
        + "), trained for "
        f"{float(settings['minutes']):g} CPU minutes ({results['training_steps']} steps of "
        f"{settings['batch']} crops) on latents of {settings['crops']} training-side 256² "
        f"crops coded at rungs {settings['rungs']} and cached, so the bits do not change. "
        f"Measured on {results['held_out_tiles']} held-out tiles: PSNR and SSIM per rung, "
        "BD-rate against the released g_s at the same bits, work per output pixel (the "
        "transposed convolutions) and milliseconds per 512² chunk on one onnxruntime thread.",
        "", table(["g_s", "kFLOP/px", "ms per 512²", *(f"{r}: PSNR dB, SSIM" for r in rungs),
                   "BD-rate vs released (SSIM / PSNR)"], rows)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="he-mshl-v3")
    p.add_argument("--widths", default="48,48,24", help="g_s hidden widths (released: 64,64,32)")
    p.add_argument("--rungs", default="3,7,11", help="rungs coded for training and testing")
    p.add_argument("--crops", type=int, default=96, help="training-side crops of 256² cached")
    p.add_argument("--minutes", type=float, default=15.0, help="training time")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--per-image", type=int, default=4, help="held-out tiles per image")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        widths = []
    if len(widths) != 3 or min(widths) < 1:
        p.error(f"--widths {args.widths}: three positive integers, e.g. 48,48,24")
    qualities = [int(q) for q in args.rungs.split(",")]
    # checked before minutes of caching
    kind = resize_kind(network_from_release(resolve(args.model, None)).g_s, widths)
    if kind is None:
        p.error(f"--widths {args.widths}: each width at most the released one's "
                "(narrower) or each at least it (wider), not a mix")
    run = setup(args.model, qualities, args.crops, args.per_image, seed=1)
    meta, channels, released = run.meta, run.channels, run.released
    train_y, train_x, held_out, test_y, bpp = (run.train_y, run.train_x, run.held_out,
                                               run.test_y, run.bpp)
    narrow = resized_synthesis(released, widths)
    print(f"training g_s {widths} for {args.minutes:g} minutes ...", file=sys.stderr)
    losses = train_on_latents(narrow, narrow.parameters(), train_y, train_x, args.minutes,
                              args.batch, args.lr, float(meta.get("ssim_weight", 0.0)))
    steps = len(losses)
    narrow.eval()

    start_narrow = resized_synthesis(released, widths).eval()
    modules = {"released": released, kind: narrow, f"{kind}, untrained": start_narrow}
    sessions = {name: onnx_session(g_s, channels) for name, g_s in modules.items()}
    rows = {}
    for name, decoder in sessions.items():
        g_s = modules[name]
        rows[name] = {"curve": curve(decoder, test_y, held_out, qualities, bpp),
                      "kflop_per_pixel": kflop_per_pixel(g_s),
                      "decode_ms_512": decode_ms(decoder, channels)}
    for name in (kind, f"{kind}, untrained"):
        rows[name]["bd_rate_vs_released"] = {
            m: bd_rate(rows[name]["curve"], rows["released"]["curve"], m)
            for m in ("ssim", "psnr")}
    results = {**provenance("narrow_synthesis"),
               "settings": {k: str(v) for k, v in vars(args).items()},
               "training_steps": steps, "loss_first_last": [losses[:20], losses[-20:]],
               "held_out_tiles": len(held_out), "rows": rows}
    finish(results, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
