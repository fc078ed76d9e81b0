"""The seed paper's slide table: store size per slide, codec and glass mode.

Converts each real slide in ../shared/data/slides with ``ngff-convert`` (each run in its
own process, so peak memory is that conversion's) for every codec x glass mode, runs
``ngff-convert verify`` on it, and prints store sizes with the reduction vs the source
file and vs JPEG (same glass mode), level-0 tissue SSIM vs the source, peak RSS and
conversion speed in megapixels (all levels) per second.

    python benchmarks/slides.py                       # every slide, every combination
    python benchmarks/slides.py --slides dicom/highdicom_sm_image/sm_image.dcm \\
        --codecs jpeg dlwsi --glass keep fill          # a quick subset
    python benchmarks/slides.py --json results.json
    python benchmarks/slides.py --target-ssim 0.95 --glass fill   # every codec at one bar
    python benchmarks/slides.py --jpeg-lattice auto off   # with and without the lattice
    python benchmarks/slides.py --slides aperio/CMU-1-Small-Region.svs --glass fill \\
        --target-ssim 0.95 --refine 100      # dlwsi also with latent refinement
    python benchmarks/slides.py --slides aperio/CMU-1-Small-Region.svs --glass fill \\
        --codecs jpegxl avif dlwsi --target-ssim 0.95 \\
        --models he-mshl-v4 he-mshl-v3       # several dlwsi models in one run

With ``--target-ssim S`` every codec converts with ``--target-ssim S`` (the quality
chosen for level-0 tissue SSIM S as ``verify`` measures it) instead of its default
setting, so the codecs meet the same quality bar and the sizes compare directly.
``--jpeg-lattice auto off`` converts each combination with level 0's JPEG lattice filter
(the converter's default for JPEG slides) and without it. ``--refine STEPS`` adds a dlwsi
row converted with ``--refine STEPS`` beside the plain one (hours per slide on a CPU).
``--models`` converts a dlwsi row with each of these model ids (default: the installed
default model only).

This is long on CPU (dlwsi encodes ~3 chunks/s/core); run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import finish, provenance, table

from numcodecs_dlwsi.model_store import qualities

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"
DEFAULT_SLIDES = ["aperio/CMU-1-Small-Region.svs", "aperio/TCGA-CR-7395-01A-01-TS1.svs",
                  "dicom/highdicom_sm_image/sm_image.dcm", "tiny_fixtures/boxes.tiff"]
CODECS = ["jpeg", "jpegxl", "avif", "dlwsi"]
GLASS = ["keep", "fill", "drop"]


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``cmd``; (result, seconds, peak RSS of that process in bytes)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        result = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    return result, seconds, usage.ru_maxrss * 1024  # Linux: kilobytes


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "ngff_convert", *map(str, args)]


def label(codec: str, refine: int, model: str | None = None) -> str:
    """A row's name: the codec, its model id when one was named, and ``rN`` when it was
    converted with ``--refine N``."""
    name = f"{codec} {model}" if model else codec
    return f"{name} r{refine}" if refine else name


def _variants(codecs: list[str], refine: int, models: list[str]) -> list[tuple]:
    """(codec, refine steps, model id or None) for every row of one slide and glass mode."""
    variants = []
    for codec in codecs:
        if codec != "dlwsi":
            variants.append((codec, 0, None))
            continue
        for model in models or [None]:
            variants.append((codec, 0, model))
            if refine:
                variants.append((codec, refine, model))
    return variants


def bench(slides: list[str], codecs: list[str], glass_modes: list[str], workers: int | None,
          workdir: Path, target_ssim: float | None = None,
          lattices: tuple[str, ...] = ("auto",), refine: int = 0,
          models: list[str] | None = None) -> list[dict]:
    rows = []
    combinations = [(glass, codec, steps, model, lattice) for glass in glass_modes
                    for lattice in lattices
                    for codec, steps, model in _variants(codecs, refine, models or [])]
    for rel in slides:
        src = SLIDES / rel
        for glass, codec, steps, model, lattice in combinations:
            name = f"{Path(rel).stem}-{codec}{steps or ''}{'-' + model if model else ''}"
            store = workdir / f"{name}-{glass}-{lattice}.zarr"
            args = [src, store, "--codec", codec, "--glass", glass, "--overwrite",
                    "--no-progress", "--jpeg-lattice", lattice]
            if steps:
                args += ["--refine", steps]
            if model:
                args += ["--model", model]
            if workers:
                args += ["--workers", workers]
            if target_ssim is not None:
                args += ["--target-ssim", target_ssim]
            conv, seconds, peak = run_measured(cli(*args))
            if conv.returncode != 0:
                print(f"# {rel} {label(codec, steps, model)} {glass}: {conv.stderr.strip()}",
                      file=sys.stderr)
                continue
            info = json.loads(subprocess.run(cli("info", store, "--json"), check=True,
                                             capture_output=True, text=True).stdout)
            ver = json.loads(subprocess.run(cli("verify", src, store, "--json",
                                                "--no-progress"), check=True,
                                            capture_output=True, text=True).stdout)
            level0 = ver["levels"][0]
            megapixels = sum(lv["shape"][1] * lv["shape"][2] for lv in info["levels"]) / 1e6
            rows.append({
                "slide": rel, "codec": codec, "refine": steps, "model": model, "glass": glass,
                "jpeg_lattice": info.get("jpeg_lattice") if lattice == "auto" else "off",
                "source_bytes": info["source_bytes"], "stored_bytes": info["stored_bytes"],
                "objects": info["objects"],
                # the codec (and model id) of every level, as ngff-convert info names them
                "level_codecs": [lv["codec"] for lv in info["levels"]],
                "ssim_tissue": level0["ssim_tissue"], "psnr_tissue": level0["psnr_tissue"],
                "ssim_all": level0["ssim_all"], "seconds": seconds,
                "megapixels": megapixels, "mp_per_s": megapixels / seconds,
                "peak_rss_bytes": peak, "tissue": info.get("tissue"),
                "chosen_quality": info["quality_choice"]["quality"]
                if info.get("quality_choice") else None,
            })
    return rows


def title(results: dict) -> str:
    bar = results.get("target_ssim")
    if bar is not None:
        return f"Whole slides, every codec at level-0 tissue SSIM {bar}"
    return "Whole slides, every codec at its default setting"


def _lattice(r: dict) -> str:
    return "-" if r.get("jpeg_lattice") in (None, "off") or r["jpeg_lattice"].startswith(
        "none") else "yes"


def render(results: dict) -> str:
    """The page body: one row per slide, codec and glass mode."""
    rows = results["rows"]
    jpeg = {(r["slide"], r["glass"], _lattice(r)): r["stored_bytes"] for r in rows
            if r["codec"] == "jpeg"}
    lines = []
    for r in rows:
        ref = jpeg.get((r["slide"], r["glass"], _lattice(r)))
        # no tissue at all (an all-glass slide): the whole image's SSIM, marked *
        ssim = f"{r['ssim_all']:.4f}*" if r["ssim_tissue"] is None else f"{r['ssim_tissue']:.4f}"
        lines.append([
            Path(r["slide"]).name, r["glass"], _lattice(r),
            label(r["codec"], r.get("refine", 0), r.get("model")),
            "" if r.get("chosen_quality") is None else r["chosen_quality"],
            f"{r['stored_bytes'] / 2**20:.3f}", f"{r['stored_bytes'] / r['source_bytes']:.1%}",
            f"{r['stored_bytes'] / ref:.1%}" if ref else "-", ssim,
            "-" if r["psnr_tissue"] is None else f"{r['psnr_tissue']:.2f}",
            f"{r['seconds']:.0f}", f"{r['mp_per_s']:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}"])
    return "\n".join([
        "Each slide converted by `ngff-convert` in its own process (peak memory is that "
        "conversion's), then `ngff-convert verify` against the source file. Stored: every "
        "object of the store. SSIM / PSNR: level 0, tissue pixels (* all pixels, where the "
        "slide has no tissue). lattice: level 0 through the JPEG lattice filter. MP/s: all "
        "levels' pixels per second of wall time. dlwsi rN: converted with `--refine N`.",
        "", table(["slide", "glass", "lattice", "codec", "setting", "stored MiB",
                   "of the source", "of JPEG's", "SSIM", "PSNR dB", "seconds", "MP/s",
                   "peak MiB"], lines)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", nargs="+", default=DEFAULT_SLIDES,
                   help="paths relative to ../shared/data/slides")
    p.add_argument("--codecs", nargs="+", default=CODECS, choices=CODECS + ["jpeg2k"])
    p.add_argument("--glass", nargs="+", default=GLASS, choices=GLASS)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the stores go (default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the rows as JSON, and its results page beside it")
    p.add_argument("--target-ssim", type=float, default=None, metavar="S",
                   help="convert with every codec at --target-ssim S instead of its default")
    p.add_argument("--jpeg-lattice", nargs="+", default=["auto"], choices=["auto", "off"],
                   help="the converter's --jpeg-lattice; several: each combination with each")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="also convert with dlwsi --refine STEPS (latent refinement)")
    p.add_argument("--models", nargs="+", default=None, metavar="ID",
                   help="dlwsi model ids, a dlwsi row each (default: the installed default)")
    args = p.parse_args()
    if args.refine < 0:
        p.error("--refine must be 0 (off) or a number of steps")
    if args.models and "dlwsi" not in args.codecs:
        p.error("--models names dlwsi models, but --codecs leaves dlwsi out")
    for model in args.models or []:
        if not qualities(model):
            p.error(f"--models: dlwsi model {model!r} is not installed")
    if not SLIDES.is_dir():
        sys.exit(f"slides not found at {SLIDES}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = bench(args.slides, args.codecs, args.glass, args.workers, workdir,
                     args.target_ssim, tuple(args.jpeg_lattice), args.refine, args.models)
    results = {**provenance("slides"), "target_ssim": args.target_ssim, "rows": rows}
    finish(results, args.json, render)


if __name__ == "__main__":
    main()
