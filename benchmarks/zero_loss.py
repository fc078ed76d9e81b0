"""Zero-loss level 0 (``--level0 transcode``) against the lossy default, on JPEG slides.

Sources: the real Aperio slide CMU-1-Small-Region (JPEG quality 30, RGB, 240² tiles) and
generic tiled TIFFs made here from training-side H&E (a 2x2 mosaic of four 1000² MoNuSeg
fields), JPEG-coded as tifffile writes JPEG TIFFs (YCbCr 4:2:0, tables in each tile,
240² tiles) at each ``--tiff-quality``. Each source is converted three ways, each in its
own process:

- ``transcode``: ``--level0 transcode --glass keep``, every tile kept (level 0 is the
  slide, bit for bit);
- ``auto``: the default (dlwsi at SSIM 0.95, glass fill; level 0 zero-loss or lossy,
  whichever the sample says is smaller);
- ``lossy``: ``--level0 lossy``, level 0 coded with dlwsi as the other levels.

Reported: level-0 bytes against the source's level-0 tile bytes, whole store against
the source file, the default's choice and estimates, conversion seconds, and level 0
read whole through zarr (MP/s), in one run on one machine.

    python benchmarks/zero_loss.py --json docs/results/zero_loss.json
    python benchmarks/zero_loss.py --tiff-quality 70 --no-cmu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import finish, provenance, table

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CMU = DATA / "slides" / "aperio" / "CMU-1-Small-Region.svs"
#: training-side fields (never held out), 1000² each
MOSAIC = ("he/monuseg_nc/TCGA-G9-6356-01Z-00-DX1.png", "he/monuseg_nc/TCGA-G9-6362-01Z-00-DX1.png",
          "he/monuseg_nc/TCGA-HE-7128-01Z-00-DX1.png", "he/monuseg_nc/TCGA-HE-7129-01Z-00-DX1.png")
TILE = 240
WAYS = {"transcode": ["--level0", "transcode", "--glass", "keep"], "auto": [],
        "lossy": ["--level0", "lossy"]}


def make_tiff(path: Path, quality: int) -> Path:
    """A generic tiled TIFF of the mosaic with JPEG tiles (tifffile's: YCbCr 4:2:0)."""
    import tifffile

    from numcodecs_dlwsi.train.data import read_image

    fields = [read_image(DATA / rel)[:1000, :1000] for rel in MOSAIC]
    image = np.concatenate([np.concatenate(fields[:2], axis=1),
                            np.concatenate(fields[2:], axis=1)], axis=0)
    tifffile.imwrite(path, image, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": quality},
                     resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    return path


def tile_bytes(slide: Path) -> int:
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        return int(sum(tif.pages[0].databytecounts))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_level0(store: Path) -> tuple[float, float]:
    """(seconds, megapixels) to read level 0 whole through zarr, in a fresh process."""
    code = ("import sys, time, zarr\n"
            "a = zarr.open_group(sys.argv[1], mode='r')['0']\n"
            "a[:, :64, :64]\n"  # open the codecs (weights, sessions) before timing
            "t = time.perf_counter(); a[:]; print(time.perf_counter() - t, a.shape[1] * "
            "a.shape[2] / 1e6)\n")
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def convert(slide: Path, out: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ngff_convert", str(slide), str(out),
                           "--no-progress", *extra], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"converting {slide.name} {' '.join(extra)} failed:\n{proc.stderr}")
    seconds = time.perf_counter() - start
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["ngff_convert"]
    read_s, megapixels = read_level0(out)
    return {"seconds": round(seconds, 1), "level0_bytes": folder_bytes(out / "0"),
            "store_bytes": folder_bytes(out), "level0": attrs["settings"]["level0"],
            "quality": attrs["settings"].get("quality_choice", {}).get("quality"),
            "level0_read_mps": round(megapixels / read_s, 2)}


def title(results: dict) -> str:
    return "Zero-loss level 0 against the lossy default, on JPEG slides"


def render(results: dict) -> str:
    """The page body: each source converted each way, sizes, time and level-0 reading."""
    lines = []
    for row in results["rows"]:
        for way in WAYS:
            r = row[way]
            level0 = r["level0"]
            choice = level0["mode"] + (f" (sample: zero loss {level0['zero_loss_bpp']:.2f}, "
                                       f"lossy {level0['lossy_bpp']:.2f} bpp)"
                                       if "zero_loss_bpp" in level0 else "")
            lines.append([row["source"], way, choice, f"{r['level0_bytes'] / 2**20:.3f}",
                          f"{r['level0_bytes'] / row['source_tile_bytes']:.3f}",
                          f"{r['store_bytes'] / 2**20:.3f}",
                          f"{r['store_bytes'] / row['source_bytes']:.3f}", f"{r['seconds']:.1f}",
                          f"{r['level0_read_mps']:.1f}"])
    return "\n".join([
        "Each source converted by `ngff-convert` three ways, each in its own process: "
        "`transcode` (`--level0 transcode --glass keep`: every scanner tile kept, level 0 is "
        "the slide bit for bit), `auto` (the default: dlwsi at SSIM 0.95, glass filled, "
        "level 0 zero-loss or lossy, whichever the quality sample says is smaller) and "
        "`lossy` (`--level0 lossy`). The TIFFs are a 2000² mosaic of four training-side "
        "MoNuSeg fields written by tifffile with JPEG tiles (YCbCr 4:2:0, 240²). Level 0 is "
        "read whole through zarr in a fresh process.", "",
        table(["source", "way", "level 0 kept as", "level 0 MiB", "of the source's tiles",
               "store MiB", "of the file", "seconds", "level 0 read MP/s"], lines)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiff-quality", type=int, nargs="*", default=[70, 90],
                   help="JPEG qualities of the TIFFs made from training-side H&E")
    p.add_argument("--no-cmu", action="store_true", help="leave out CMU-1")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if not (DATA / "he").is_dir():
        print(f"zero_loss.py: no shared data at {DATA}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = [] if args.no_cmu else [("CMU-1-Small-Region (Aperio q30)", CMU)]
        sources += [(f"training-side H&E, TIFF JPEG q{q}",
                     make_tiff(Path(tmp) / f"he-q{q}.tiff", q)) for q in args.tiff_quality]
        for name, slide in sources:
            row = {"source": name, "source_bytes": slide.stat().st_size,
                   "source_tile_bytes": tile_bytes(slide)}
            for way, extra in WAYS.items():
                print(f"{name}: {way} ...", file=sys.stderr)
                row[way] = convert(slide, Path(tmp) / f"{len(rows)}-{way}.zarr", extra)
            rows.append(row)
    results = {**provenance("zero_loss"), "rows": rows}
    finish(results, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
