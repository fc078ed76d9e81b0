"""Whole slides at matched quality: store size vs SSIM curves per codec, with BD-rates.

``slides.py`` compares each codec at its default setting, where the codecs land at
different qualities (JPEG-XL's default is far above dlwsi's on CMU-1), so its sizes do
not say which codec stores a slide smaller *at the same quality*. This sweeps each
codec's setting through the real converter (``ngff-convert``, one process per run), runs
``ngff-convert verify`` on each store, and reports BD-rate (Bjontegaard, as in
``rd.py``) of the whole store's bytes against level-0 tissue SSIM (in dB) and PSNR, per
slide, vs JPEG, JPEG-XL and AVIF. Stores are written with one glass mode (``fill``, the
converter's default) so every codec stores the same pixels.

dlwsi is swept three ways: over its fixed rungs (``--quality Q``); over ``--target-ssim
S`` (``dlwsi-target``: the slide's rung chosen from a level-0 sample, the converter's
default mode since he-mshl-v3, so its points are fixed rungs); and over per-chunk rate
control (``dlwsi-rc``: ``--chunk-ssim S``, each chunk's rung up to the model's default,
the converter's default before he-mshl-v3).

    python benchmarks/slides_rd.py --json docs/results/slides_rd.json
    python benchmarks/slides_rd.py --slides aperio/CMU-1-Small-Region.svs --curves jpegxl dlwsi
    DLWSI_WEIGHTS=/tmp/candidate python benchmarks/slides_rd.py --curves dlwsi \
        --baselines-from docs/results/slides_rd.json        # screen a candidate (its own default)
    python benchmarks/slides_rd.py --curves jpegxl avif dlwsi --jpeg-lattice auto off
                       # each curve with level 0's JPEG lattice filter (auto) and without it

Curves without the filter are named ``<curve>/off`` and compared with references without
it; on slides that are not JPEG the two are the same conversion.

Long on CPU: every point is a full conversion plus a verify.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rd import bd_rate  # noqa: E402
from report import finish, percent, provenance, table  # noqa: E402
from slides import SLIDES, cli, run_measured  # noqa: E402

#: curve name -> (converter arguments for each point)
SWEEPS: dict[str, list[list[str]]] = {
    "jpeg": [["--codec", "jpeg", "--quality", q] for q in ("50", "65", "80", "90", "95")],
    "jpegxl": [["--codec", "jpegxl", "--quality", q] for q in ("40", "55", "70", "80", "90")],
    "avif": [["--codec", "avif", "--quality", q] for q in ("30", "45", "60", "70", "80")],
    # he-mshl-v3's ladder (13 rungs; v2's 7 were swept as 3-7)
    "dlwsi": [["--codec", "dlwsi", "--quality", q] for q in ("5", "7", "9", "11", "13")],
    "dlwsi-target": [["--codec", "dlwsi", "--target-ssim", s]
                     for s in ("0.92", "0.93", "0.94", "0.95", "0.96")],
    "dlwsi-rc": [["--codec", "dlwsi", "--chunk-ssim", s]
                 for s in ("0.93", "0.94", "0.95", "0.96", "0.97")],
}
REFERENCES = ("jpeg", "jpegxl", "avif")
DEFAULT_SLIDES = ["aperio/CMU-1-Small-Region.svs", "aperio/TCGA-CR-7395-01A-01-TS1.svs"]


def point(src: Path, store: Path, args: list[str], workers: int | None) -> dict | None:
    """Convert ``src`` with ``args`` and verify it: size, level-0 tissue SSIM and PSNR."""
    command = [src, store, *args, "--overwrite", "--no-progress"]
    if workers:
        command += ["--workers", workers]
    conv, seconds, _ = run_measured(cli(*command))
    if conv.returncode != 0:
        print(f"# {src.name} {' '.join(args)}: {conv.stderr.strip()}", file=sys.stderr)
        return None
    report = json.loads(subprocess.run(cli("verify", src, store, "--json", "--no-progress"),
                                       check=True, capture_output=True, text=True).stdout)
    level0 = report["levels"][0]
    return {"setting": " ".join(args[2:4]), "stored_bytes": report["stored_bytes"],
            "source_bytes": report["source_bytes"], "ssim": level0["ssim_tissue"],
            "psnr": level0["psnr_tissue"], "seconds": seconds,
            # bd_rate works on log(rate); any rate proportional to the store's bytes will do
            "bpp": report["stored_bytes"] * 8 / (level0["shape"][1] * level0["shape"][2])}


def sweep(slides: list[str], curves: list[str], workers: int | None, workdir: Path,
          lattices: tuple[str, ...] = ("auto",)) -> dict[str, dict[str, list[dict]]]:
    results: dict[str, dict[str, list[dict]]] = {}
    runs = [(curve, lattice) for lattice in lattices for curve in curves]
    for rel in slides:
        src = SLIDES / rel
        results[rel] = {}
        for base, lattice in runs:
            curve = base if lattice == "auto" else f"{base}/{lattice}"
            points = []
            for i, args in enumerate(SWEEPS[base]):
                args = [*args, "--jpeg-lattice", lattice]
                row = point(src, workdir / f"{Path(rel).stem}-{base}-{lattice}-{i}.zarr",
                            args, workers)
                if row is not None:
                    points.append(row)
                    print(f"# {Path(rel).name} {curve} {row['setting']}: "
                          f"{row['stored_bytes'] / 2**20:.3f} MiB, SSIM {row['ssim']:.4f}, "
                          f"PSNR {row['psnr']:.2f} dB", file=sys.stderr, flush=True)
            results[rel][curve] = points
    return results


def title(results: dict) -> str:
    return "Whole slides at matched quality: store bytes against level-0 tissue quality"


def _bd_rows(curves: dict[str, list[dict]], refs: list[str]) -> list[list[str]]:
    rows = []
    for curve, points in curves.items():
        suffix = curve[curve.index("/"):] if "/" in curve else ""
        cells = []
        for ref in (r + suffix for r in refs):
            if ref == curve:
                cells.append("0")
            elif ref not in curves:
                cells.append("")
            else:
                cells.append(" / ".join(percent(bd_rate(points, curves[ref], metric))
                                        for metric in ("ssim", "psnr")))
        rows.append([curve, *cells])
    return rows


def render(results: dict) -> str:
    """The page body: per slide, BD-rates of the store's bytes and every point."""
    out = ["Each codec's setting swept through `ngff-convert` (glass filled), each store "
           "checked by `ngff-convert verify`: the whole store's bytes against level-0 tissue "
           "SSIM and PSNR. BD-rate as in `rd.py` (SSIM in dB), negative = fewer bytes at equal "
           "quality; n/a: the curves share no quality range. Curves named `/off` ran with the "
           "JPEG lattice filter off and are compared with references without it."]
    for rel, curves in results["slides"].items():
        refs = [r for r in REFERENCES if r in {name.split("/")[0] for name in curves}]
        out += ["", f"## {Path(rel).name}", "",
                table(["curve", *(f"vs {r} (SSIM / PSNR)" for r in refs)],
                      _bd_rows(curves, refs)),
                "", table(["curve", "setting", "stored MiB", "of the source", "SSIM", "PSNR dB"],
                          [[curve, p["setting"], f"{p['stored_bytes'] / 2**20:.3f}",
                            f"{p['stored_bytes'] / p['source_bytes']:.1%}",
                            f"{p['ssim']:.4f}", f"{p['psnr']:.2f}"]
                           for curve, points in curves.items() for p in points])]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="+", default=DEFAULT_SLIDES,
                   help="paths relative to ../shared/data/slides")
    p.add_argument("--curves", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the stores go (default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, default=None, help="also write the points as JSON")
    p.add_argument("--baselines-from", type=Path, metavar="JSON",
                   help="take the JPEG, JPEG-XL and AVIF curves this run does not sweep from "
                        "an earlier --json run (to screen a candidate model: --curves dlwsi)")
    p.add_argument("--jpeg-lattice", nargs="+", default=["auto"], choices=["auto", "off"],
                   help="the converter's --jpeg-lattice; with several, each curve with each")
    args = p.parse_args()
    if not SLIDES.is_dir():
        sys.exit(f"slides not found at {SLIDES}")
    earlier = (json.loads(args.baselines_from.read_text())["slides"] if args.baselines_from
               else {})
    if missing := [rel for rel in args.slides if earlier and rel not in earlier]:
        sys.exit(f"{args.baselines_from} has no curves for {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = sweep(args.slides, args.curves, args.workers, workdir,
                        tuple(args.jpeg_lattice))
    for rel, curves in results.items():  # only the classical references: an earlier
        # dlwsi curve came from another model and would read as this one's
        results[rel] = {**{name: points for name, points in earlier.get(rel, {}).items()
                           if name in REFERENCES and name not in curves}, **curves}
    results = {**provenance("slides_rd"), "slides": results}
    finish(results, args.json, render)


if __name__ == "__main__":
    main()
