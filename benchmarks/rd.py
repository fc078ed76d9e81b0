"""Rate-distortion of dlwsi models beside JPEG, JPEG-XL, AVIF and JPEG 2000, with BD-rates.

Every codec runs on the same held-out H&E tiles (train/data.py's validation split, never
seen in training). Classical codecs are swept over their quality setting, each dlwsi
model family over its quality ladder. Bits per pixel count every byte of each encoded
tile (dlwsi's chunk header included). BD-rate (Bjontegaard) is the average bit-rate
difference at equal quality over the range both curves cover, with piecewise-cubic
(PCHIP) interpolation of log-rate; SSIM is compared in dB, -10 log10(1 - SSIM), where
the curves are close to straight.

    python benchmarks/rd.py --json docs/results/rd.json --plot docs/results/rd.png
    python benchmarks/rd.py --model he-mshl-v1 --model he-mshl-v2   # compare families
                       # (BD-rate of each family against the last one named, too)
    python benchmarks/rd.py --source-jpeg 30 --json docs/results/rd_source_jpeg30.json
                       # tiles as a JPEG-30 scanner stored them, the source to match
    python benchmarks/rd.py --source-jpeg 30 --source-layout rgb   # as Aperio does (CMU-1)
    python benchmarks/rd.py --source-jpeg 30 --source-layout rgb --lattice
                       # every codec's decoded tiles through the JPEG lattice filter
    python benchmarks/rd.py --model he-mshl-v3 --per-image 4 --refine 100 \
        --rungs 1,3,5,7,9,11,13 --baselines-from docs/results/rd.json   # latent refinement
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
from report import percent, provenance, publish, table
from scipy.interpolate import PchipInterpolator
from scipy.ndimage import gaussian_filter

from numcodecs_dlwsi import image_codec
from numcodecs_dlwsi.jpeg_lattice import JpegLattice, snap
from numcodecs_dlwsi.model_store import default_model, qualities, resolve
from numcodecs_dlwsi.train.data import (
    JPEG_LAYOUTS,
    default_data_root,
    jpeg_round_trip,
    validation_tiles,
)

Encoder = Callable[[np.ndarray], bytes]
Decoder = Callable[[bytes], np.ndarray]
#: BD-rates are reported against these, in this order
REFERENCES = ("JPEG", "JPEG-XL", "AVIF", "JPEG 2000")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels (Wang et al. 2004, Gaussian window sigma 1.5)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ca, cb in zip(a, b, strict=True):
        mu_a, mu_b = gaussian_filter(ca, 1.5), gaussian_filter(cb, 1.5)
        var_a = gaussian_filter(ca * ca, 1.5) - mu_a**2
        var_b = gaussian_filter(cb * cb, 1.5) - mu_b**2
        cov = gaussian_filter(ca * cb, 1.5) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        scores.append(s[5:-5, 5:-5].mean())
    return float(np.mean(scores))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def ssim_db(value: float) -> float:
    return -10.0 * np.log10(max(1.0 - value, 1e-12))


def measure(tiles: np.ndarray, encode: Encoder, decode: Decoder) -> dict:
    """Rate and quality of one codec setting over all tiles ((3, H, W) uint8).

    PSNR is that of the mean squared error over all tiles: a mean of per-tile PSNRs is
    dominated by any near-flat tile a codec happens to reproduce almost exactly.
    """
    bits, errors, ssims = 0, [], []
    for tile in tiles:
        blob = encode(tile)
        back = decode(blob)
        bits += 8 * len(blob)
        errors.append(mse(back, tile))
        ssims.append(ssim(back, tile))
    pixels = tiles.shape[0] * tiles.shape[2] * tiles.shape[3]
    psnr = 10 * np.log10(255.0**2 / max(float(np.mean(errors)), 1e-12))
    return {"bpp": bits / pixels, "psnr": float(psnr), "ssim": float(np.mean(ssims))}


def _hwc(t: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(t.transpose(1, 2, 0))


def _chw(t: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(t.transpose(2, 0, 1))


def baselines() -> dict[str, tuple[list, Callable[[object], Encoder], Decoder]]:
    """name -> (settings, setting -> encoder, decoder), all through imagecodecs."""
    codecs = {
        "JPEG": (list(range(10, 100, 5)) + [97],
                 lambda q: lambda t: imagecodecs.jpeg_encode(_hwc(t), level=q),
                 lambda b: _chw(imagecodecs.jpeg_decode(b))),
        "JPEG-XL": ([8.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.2],
                    lambda d: lambda t: imagecodecs.jpegxl_encode(_hwc(t), distance=d, effort=7),
                    lambda b: _chw(imagecodecs.jpegxl_decode(b))),
        "AVIF": (list(range(20, 100, 5)) + [97],
                 lambda q: lambda t: imagecodecs.avif_encode(_hwc(t), level=q, speed=6),
                 lambda b: _chw(imagecodecs.avif_decode(b))),
        # imagecodecs' level is the target PSNR of the single quality layer
        "JPEG 2000": ([22, 25, 28, 30, 32, 34, 36, 38, 40, 43, 46, 50],
                      lambda q: lambda t: imagecodecs.jpeg2k_encode(_hwc(t), level=q),
                      lambda b: _chw(imagecodecs.jpeg2k_decode(b))),
    }
    return {name: c for name, c in codecs.items() if _available(name)}


def _available(name: str) -> bool:
    flag = {"JPEG": "JPEG8", "JPEG-XL": "JPEGXL", "AVIF": "AVIF", "JPEG 2000": "JPEG2K"}[name]
    return bool(getattr(imagecodecs, flag).available)


def bd_rate(test: list[dict], reference: list[dict], metric: str) -> float | None:
    """Average rate change of ``test`` vs ``reference`` at equal ``metric``, in percent.

    A one-point ``test`` (a single candidate model) gives the rate change at its quality.
    None when the curves share no quality range (or the reference has under two points).
    """
    def curve(points: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        quality = [ssim_db(p["ssim"]) if metric == "ssim" else p[metric] for p in points]
        order = np.argsort(quality)
        q = np.asarray(quality)[order]
        r = np.log(np.asarray([p["bpp"] for p in points]))[order]
        keep = np.concatenate([[True], np.diff(q) > 1e-9])  # PCHIP needs increasing x
        return q[keep], r[keep]

    q_test, r_test = curve(test)
    q_ref, r_ref = curve(reference)
    if len(q_ref) < 2 or not len(q_test):
        return None
    if len(q_test) == 1:
        if not q_ref[0] <= q_test[0] <= q_ref[-1]:
            return None
        at_same_quality = PchipInterpolator(q_ref, r_ref)(q_test[0])
        return float((np.exp(r_test[0] - at_same_quality) - 1.0) * 100.0)
    low, high = max(q_test[0], q_ref[0]), min(q_test[-1], q_ref[-1])
    if high <= low:
        return None
    area_test = PchipInterpolator(q_test, r_test).integrate(low, high)
    area_ref = PchipInterpolator(q_ref, r_ref).integrate(low, high)
    return float((np.exp((area_test - area_ref) / (high - low)) - 1.0) * 100.0)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    curves = {**results["baselines"], **results["dlwsi"]}
    for name, points in curves.items():
        bpp = [p["bpp"] for p in points]
        style = "o-" if name in results["dlwsi"] else ".--"
        axes[0].plot(bpp, [p["ssim"] for p in points], style, label=name)
        axes[1].plot(bpp, [p["psnr"] for p in points], style, label=name)
    for ax, label in zip(axes, ("SSIM", "PSNR (dB)"), strict=True):
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(label)
        ax.set_xlim(0, 4)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.8, 1.0)
    axes[1].set_ylim(26, 46)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"H&E rate-distortion, {results['tiles']} held-out 256x256 tiles")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _unchanged(image: np.ndarray) -> np.ndarray:
    return image


def source_lattice(quality: int, layout: str) -> JpegLattice:
    """The lattice of tiles stored by ``jpeg_round_trip(quality, layout)``, from the JPEG
    headers libjpeg writes with those settings (the tables depend on nothing else)."""
    from ngff_convert.jpeg_source import lattice_config

    tile = np.full((16, 16, 3), 128, np.uint8)
    if layout == "rgb":
        encoded = imagecodecs.jpeg_encode(tile, level=quality, colorspace="RGB",
                                          outcolorspace="RGB")
    else:
        encoded = imagecodecs.jpeg_encode(tile, level=quality, subsampling=layout[-3:])
    return JpegLattice.from_dict(lattice_config([encoded], "rgb" if layout == "rgb"
                                                else "ycbcr"))


def _dlwsi_curve(tiles: np.ndarray, model: str,
                 restore: Callable[[np.ndarray], np.ndarray] = _unchanged,
                 refine: int = 0, rungs: list[int] | None = None) -> list[dict]:
    """One model's ladder (``rungs`` of it, default all). With ``refine``, tiles are coded
    in batches, as the converter hands them over (refinement runs on a whole batch)."""
    points = []
    for quality in rungs or qualities(model):
        ref = resolve(model, quality)
        if refine:
            chunks = iter(image_codec.encode_batch(list(tiles), ref, refine=refine))
            point = measure(tiles, lambda t, c=chunks: next(c),
                            lambda b: restore(image_codec.decode(b)))
        else:
            point = measure(tiles, lambda t, r=ref: image_codec.encode_batch([t], r)[0],
                            lambda b: restore(image_codec.decode(b)))
        points.append(dict(point, setting=quality, sha256=ref.sha256))
        print(f"  {model} q{quality}{f' refine {refine}' if refine else ''}: "
              f"{point['bpp']:.3f} bpp, {point['psnr']:.2f} dB, SSIM {point['ssim']:.4f}",
              file=sys.stderr, flush=True)
    return points


def title(results: dict) -> str:
    source = results.get("source_jpeg")
    if source is None:
        return "Rate-distortion on held-out H&E tiles"
    return f"Rate-distortion on held-out H&E tiles stored first as JPEG {source}"


def _source_text(results: dict) -> str:
    source = results.get("source_jpeg")
    if source is None:
        return "the tiles as they are"
    quality, *rest = str(source).split()
    layout = ("RGB, each channel coded on its own, as Aperio scanners do" if "rgb" in rest
              else "YCbCr 4:2:0, as most scanners do")
    text = (f"each tile first stored as a scanner would, JPEG quality {quality} ({layout}), "
            "and every codec measured against those decoded pixels, as `ngff-convert verify` "
            "measures a slide against its source")
    if "lattice" in rest:
        text += ("; every codec's decoded tiles pass through the `dlwsi_jpeg_lattice` filter "
                 "with the source's tables, as `ngff-convert` does on level 0 of a JPEG slide")
    return text


def _pair(rates: dict) -> str:
    return f"{percent(rates['ssim'])} / {percent(rates['psnr'])}"


def render(results: dict) -> str:
    """The page body: what was measured, BD-rates, each rung, each baseline point."""
    refs = [r for r in REFERENCES if r in results["baselines"]]
    carried = (f" The baseline curves are carried from `{results['baselines_from']}` (the "
               "same tiles, measured by a full run)." if results.get("baselines_from") else "")
    out = [
        f"{results['tiles']} tissue-rich 256x256 tiles from the held-out H&E images (never "
        f"seen in training), {_source_text(results)}. Every byte of every encoded tile is "
        "counted (dlwsi's chunk header included). JPEG is libjpeg-turbo, JPEG-XL libjxl at "
        "effort 7, AVIF libavif (aom) at speed 6, JPEG 2000 OpenJPEG, all through "
        "imagecodecs, each swept over its quality setting; dlwsi over its model's rungs. "
        "SSIM is the Gaussian-window SSIM (σ 1.5) averaged over RGB and tiles; PSNR that "
        f"of the mean squared error over all tiles.{carried}", "",
        "BD-rate: the average change in bits at equal quality over the range both curves "
        "cover (PCHIP on log-rate; SSIM compared as -10·log10(1-SSIM)); negative means "
        "fewer bits than the reference. n/a: the curves share no quality range.", "",
        "## BD-rate, SSIM / PSNR", "",
        table(["codec", *(f"vs {r}" for r in refs)],
              [[name, *(_pair(rates[r]) if name != r else "0" for r in refs)]
               for name, rates in results["bd_rate"].items()])]
    if results.get("bd_rate_vs_model") or results.get("refine_vs_plain"):
        rows = [[name, rates["reference"], _pair(rates)]
                for name, rates in results.get("bd_rate_vs_model", {}).items()]
        rows += [[f"{model} refine", model, _pair(rates)]
                 for model, rates in results.get("refine_vs_plain", {}).items()]
        out += ["", "## Models against each other (same tiles, same run)", "",
                table(["curve", "against", "BD-rate SSIM / PSNR"], rows)]
    if results.get("plot"):
        out += ["", f"![rate-distortion]({Path(results['plot']).name})"]
    per_rung = results.get("rate_change_per_setting", {})
    shown = [r for r in ("JPEG-XL", "AVIF") if r in refs]
    out += ["", "## dlwsi, rung by rung", "",
            "Each rung's bits against the reference curve at that rung's quality.", "",
            table(["curve", "rung", "bpp", "PSNR dB", "SSIM",
                   *(f"vs {r} (SSIM / PSNR)" for r in shown)],
                  [[name, f"q{p['setting']}", f"{p['bpp']:.3f}", f"{p['psnr']:.2f}",
                    f"{p['ssim']:.4f}",
                    *(_pair(per_rung[f"{name} q{p['setting']}"][r])
                      if f"{name} q{p['setting']}" in per_rung else "" for r in shown)]
                   for name, points in results["dlwsi"].items() for p in points])]
    out += ["", "## Baselines, setting by setting", "",
            table(["codec", "setting", "bpp", "PSNR dB", "SSIM"],
                  [[name, p["setting"], f"{p['bpp']:.3f}", f"{p['psnr']:.2f}",
                    f"{p['ssim']:.4f}"]
                   for name, points in results["baselines"].items() for p in points])]
    if results.get("seconds"):
        out += ["", f"The run took {results['seconds']:.0f} s."]
    return "\n".join(out)


def _earlier_run(path: Path) -> dict | str:
    """The results of an earlier ``--json`` run, or why the file is not one."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return str(error)
    if not isinstance(earlier, dict) or not {"tiles", "baselines"} <= earlier.keys():
        return "not a file written by rd.py --json"
    return earlier


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append",
                        help="dlwsi model family (repeatable; default: the installed default)")
    parser.add_argument("--per-image", type=int, default=8,
                        help="256x256 tiles per held-out image (most tissue first)")
    parser.add_argument("--data", type=Path, help="shared data folder (default ../shared/data)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--plot", type=Path, help="write the rate-distortion plot (PNG) here")
    parser.add_argument("--baselines-from", type=Path, metavar="JSON",
                        help="reuse the baseline curves of an earlier --json run on the same "
                             "tiles (to screen a candidate model quickly; publish full runs)")
    parser.add_argument("--source-jpeg", type=int, metavar="Q",
                        help="first store every tile as a scanner would, JPEG quality Q with "
                             "4:2:0 chroma (CMU-1's scanner: 30), and measure every codec "
                             "against those pixels, as ngff-convert verify measures a slide "
                             "against its source file")
    parser.add_argument("--lattice", action="store_true",
                        help="with --source-jpeg: pass every codec's decoded tiles through the "
                             "dlwsi_jpeg_lattice filter with the source's tables, as "
                             "ngff-convert does on level 0 of a JPEG slide")
    parser.add_argument("--refine", type=int, default=0, metavar="STEPS",
                        help="also measure each model with STEPS of latent refinement at "
                             "encoding (a second curve, '<model> refine STEPS'; needs "
                             "PyTorch), and report its BD-rate against the plain curve")
    parser.add_argument("--rungs", type=lambda v: [int(q) for q in v.split(",")],
                        metavar="Q,Q,...", help="only these rungs of each model (all by "
                                                "default)")
    parser.add_argument("--source-layout", choices=list(JPEG_LAYOUTS), default="ycbcr420",
                        help="the scanner's JPEG layout for --source-jpeg: YCbCr 4:2:0 "
                             "(most scanners) or RGB, each channel coded on its own (Aperio; "
                             "CMU-1)")
    args = parser.parse_args()
    if args.source_jpeg is not None and not 1 <= args.source_jpeg <= 100:
        parser.error("--source-jpeg must be a JPEG quality, 1-100")
    if args.lattice and args.source_jpeg is None:
        parser.error("--lattice needs --source-jpeg (the lattice is the source's)")
    root = args.data or default_data_root()
    if not (root / "he").is_dir():
        print(f"rd: no H&E data at {root}", file=sys.stderr)
        return 2
    tiles = validation_tiles(root, size=256, per_image=args.per_image)
    if args.source_jpeg is not None:
        tiles = np.stack([jpeg_round_trip(np.ascontiguousarray(tile.transpose(1, 2, 0)),
                                          args.source_jpeg, args.source_layout).transpose(2, 0, 1)
                          for tile in tiles])
    started = time.time()
    source = (None if args.source_jpeg is None
              else args.source_jpeg if args.source_layout == "ycbcr420"
              else f"{args.source_jpeg} {args.source_layout}")
    restore: Callable[[np.ndarray], np.ndarray] = _unchanged
    if args.lattice:
        restore = functools.partial(snap, lattice=source_lattice(args.source_jpeg,
                                                                 args.source_layout))
        source = f"{source} lattice"
    results: dict = {**provenance("rd"), "tiles": int(len(tiles)), "source_jpeg": source,
                     "dlwsi": {}, "baselines": {}, "bd_rate": {}}
    for model in args.model or [default_model()]:
        results["dlwsi"][model] = _dlwsi_curve(tiles, model, restore, rungs=args.rungs)
        if args.refine:
            refined = _dlwsi_curve(tiles, model, restore, args.refine, args.rungs)
            results["dlwsi"][f"{model} refine {args.refine}"] = refined
            results.setdefault("refine_vs_plain", {})[model] = {
                m: bd_rate(refined, results["dlwsi"][model], m) for m in ("ssim", "psnr")}
    if args.baselines_from:
        earlier = _earlier_run(args.baselines_from)
        if isinstance(earlier, str):
            print(f"rd: --baselines-from {args.baselines_from}: {earlier}", file=sys.stderr)
            return 2
        if earlier["tiles"] != len(tiles):
            print(f"rd: {args.baselines_from} measured {earlier['tiles']} tiles, this run has "
                  f"{len(tiles)} (--per-image must match)", file=sys.stderr)
            return 2
        if earlier.get("source_jpeg") != source:
            print(f"rd: {args.baselines_from} was measured with source JPEG "
                  f"{earlier.get('source_jpeg')}, this run with {source}", file=sys.stderr)
            return 2
        results["baselines"] = earlier["baselines"]
        results["baselines_from"] = str(args.baselines_from)
    else:
        for name, (settings, make_encoder, decode) in baselines().items():
            results["baselines"][name] = [
                dict(measure(tiles, make_encoder(s), lambda b, d=decode: restore(d(b))),
                     setting=s) for s in settings]
    for name, points in {**results["dlwsi"], **results["baselines"]}.items():
        results["bd_rate"][name] = {
            ref: {m: bd_rate(points, curve, m) for m in ("ssim", "psnr")}
            for ref, curve in results["baselines"].items()}
    results["rate_change_per_setting"] = {
        f"{name} q{p['setting']}": {
            ref: {m: bd_rate([p], curve, m) for m in ("ssim", "psnr")}
            for ref, curve in results["baselines"].items()}
        for name, points in results["dlwsi"].items() if len(points) > 1 for p in points}
    # several model families: each against the last named (a candidate against a release)
    families = [name for name in results["dlwsi"] if " refine " not in name]
    if len(families) > 1:
        reference = families[-1]
        results["bd_rate_vs_model"] = {
            name: {"reference": reference, **{m: bd_rate(results["dlwsi"][name],
                                                         results["dlwsi"][reference], m)
                                              for m in ("ssim", "psnr")}}
            for name in families[:-1]}
    results["seconds"] = round(time.time() - started, 1)
    print(render(results))
    for name, rates in results.get("bd_rate_vs_model", {}).items():
        print(f"{name} vs {rates['reference']}: SSIM {rates['ssim']:+.2f}%, "
              f"PSNR {rates['psnr']:+.2f}% (BD-rate)")
    for model, rates in results.get("refine_vs_plain", {}).items():
        print(f"{model} refine {args.refine} vs {model}: SSIM {rates['ssim']:+.1f}%, "
              f"PSNR {rates['psnr']:+.1f}% (BD-rate)")
    print(f"({results['seconds']:.0f} s)")
    if args.plot:
        plot(results, args.plot)
        results["plot"] = str(args.plot)
    if args.json:
        print(f"wrote {publish(args.json, results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
