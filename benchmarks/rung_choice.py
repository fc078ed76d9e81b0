"""Which dlwsi rung for which chunk? One per slide, one per chunk, or an SSIM floor.

Codes every chunk the converter would store for a slide (every level, glass ``fill``)
at every rung of the model, and records its bytes and its tissue SSIM against the source
exactly as ``ngff-convert verify`` computes it (``ngff_convert.fidelity``). From that
table it compares, without further encoding, the ways of choosing rungs, as curves of
the store's bytes against level-0 tissue SSIM, with BD-rates against one fixed rung for
the whole slide:

- ``fixed``: one rung everywhere (``--quality Q``);
- ``floor``: each chunk at the lowest rung reaching an SSIM over its non-white pixels
  (per-chunk rate control, ``--chunk-ssim S``, up to the top rung);
- ``slope``: each chunk at the rung minimising bytes + lambda x (1 - SSIM) x non-white
  pixels, one lambda for the slide (the best per-chunk choice an encoder can make without
  the tissue mask);
- ``oracle``: the same with verify's own tissue SSIM and mask (an upper bound).

    python benchmarks/rung_choice.py --slides aperio/CMU-1-Small-Region.svs \\
        aperio/TCGA-CR-7395-01A-01-TS1.svs --json docs/results/rung_choice.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rd import bd_rate  # noqa: E402
from report import percent, provenance, publish, table  # noqa: E402

from numcodecs_dlwsi.model_store import default_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides"
FLOORS = (0.93, 0.94, 0.95, 0.96, 0.97)
LAMBDAS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def measure(path: Path, chunk: int = 512) -> dict:
    """Per stored chunk: level, tissue pixels, non-white pixels; per rung: bytes, verify's
    tissue-SSIM sum, SSIM over non-white pixels."""
    import numcodecs

    from ngff_convert.fidelity import in_tissue, ssim_map
    from ngff_convert.pyramid import Layout, pyramid
    from ngff_convert.slide import open_slide
    from ngff_convert.tissue import Glass, MaskParams, mask_downsample, thumbnail, tissue_mask
    from numcodecs_dlwsi.model_store import default_model, qualities

    info = open_slide(path)
    ds = mask_downsample(info)
    tissue = tissue_mask(thumbnail(info, ds), ds, MaskParams())
    coded = pyramid(info, Layout(chunk, 4), Glass.fill, tissue)
    sources = pyramid(info, Layout(chunk, 4), Glass.keep, None)
    rungs = qualities(default_model())
    codecs = [numcodecs.get_codec({"id": "dlwsi", "quality": q}) for q in rungs]
    chunks = []
    for level, (level_coded, level_source) in enumerate(zip(coded, sources, strict=True)):
        image, source = np.asarray(level_coded.compute()), np.asarray(level_source.compute())
        for y in range(0, image.shape[1], chunk):
            for x in range(0, image.shape[2], chunk):
                block = image[:, y:y + chunk, x:x + chunk]
                if (block == 255).all():
                    continue  # glass: never stored
                h, w = block.shape[1:]
                padded = np.pad(block, ((0, 0), (0, chunk - h), (0, chunk - w)),
                                constant_values=255)  # as Zarr pads an edge chunk
                mask = in_tissue(tissue, y, x, h, w, 2**level)
                not_white = (block != 255).any(axis=0)
                row = {"level": level, "tissue": int(mask.sum()),
                       "not_white": int(not_white.sum()), "bytes": [], "ssim_tissue_sum": [],
                       "ssim_not_white": []}
                for codec in codecs:
                    data = codec.encode(padded)
                    decoded = np.asarray(codec.decode(data)).reshape(padded.shape)[:, :h, :w]
                    ssim = ssim_map(decoded, source[:, y:y + chunk, x:x + chunk])
                    row["bytes"].append(len(data))
                    row["ssim_tissue_sum"].append(float(ssim[mask].sum()))
                    row["ssim_not_white"].append(float(ssim[not_white].mean()))
                chunks.append(row)
        print(f"{path.name}: level {level} measured, {len(chunks)} chunks so far", flush=True)
    return {"rungs": rungs, "chunks": chunks}


def strategies(table: dict) -> dict[str, list[dict]]:
    """Curves (bytes, level-0 tissue SSIM) of each way of choosing rungs."""
    rows = table["chunks"]
    size = np.array([r["bytes"] for r in rows], float)
    tissue_sum = np.array([r["ssim_tissue_sum"] for r in rows])
    not_white = np.array([r["ssim_not_white"] for r in rows])
    tissue = np.array([r["tissue"] for r in rows], float)
    pixels = np.array([r["not_white"] for r in rows], float)
    level0 = np.array([r["level"] == 0 for r in rows])
    index = np.arange(len(rows))

    def point(choice: np.ndarray, setting: float) -> dict:
        ssim = tissue_sum[index, choice][level0].sum() / tissue[level0].sum()
        return {"setting": setting, "bpp": float(size[index, choice].sum()),
                "ssim": float(ssim), "psnr": 0.0}

    top = size.shape[1] - 1
    floor = [point(np.array([next((q for q in range(top + 1) if not_white[r, q] >= s), top)
                             for r in index]), s) for s in FLOORS]
    return {
        "fixed": [point(np.full(len(rows), q), table["rungs"][q]) for q in range(top + 1)],
        "floor": floor,
        "slope": [point(np.argmin(size + lam * (1 - not_white) * pixels[:, None], axis=1), lam)
                  for lam in LAMBDAS],
        "oracle": [point(np.argmin(size + lam * (tissue[:, None] - tissue_sum), axis=1), lam)
                   for lam in LAMBDAS],
    }


def title(results: dict) -> str:
    return "Which rung for which chunk: one per slide, one per chunk, or an SSIM floor"


WAYS = {"fixed": "one rung for the slide (`--quality Q`)",
        "floor": "per chunk, the lowest rung reaching an SSIM floor (`--chunk-ssim S`)",
        "slope": "per chunk, equal slope: bytes + λ·(1-SSIM)·non-white pixels",
        "oracle": "per chunk, equal slope with verify's own tissue mask and SSIM (a bound)"}


def render(results: dict) -> str:
    """The page body: BD-rate of each way of choosing against one rung, and its points."""
    slides = results["slides"]
    names = [Path(rel).name for rel in slides]
    out = ["Every chunk the converter stores for a slide (all levels, glass filled) coded at "
           f"every rung of `{results.get('model', 'the default model')}`; its bytes and its "
           "tissue SSIM recorded exactly as `ngff-convert verify` computes them. Each way of "
           "choosing rungs is a curve of the store's bytes against level-0 tissue SSIM; "
           "BD-rate in SSIM against one fixed rung for the slide (negative = fewer bytes).", "",
           table(["way of choosing", *names],
                 [[text, *(percent(bd_rate(slide["curves"][way], slide["curves"]["fixed"],
                                           "ssim")) if way != "fixed" else "0"
                           for slide in slides.values())] for way, text in WAYS.items()])]
    for rel, slide in slides.items():
        out += ["", f"## {Path(rel).name}", "",
                table(["way", "setting", "store MB", "level-0 tissue SSIM"],
                      [[way, f"{p['setting']:g}", f"{p['bpp'] / 1e6:.3f}", f"{p['ssim']:.4f}"]
                       for way, points in slide["curves"].items() for p in points])]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", nargs="+", default=["aperio/CMU-1-Small-Region.svs"],
                   help="slides under ../shared/data/slides")
    p.add_argument("--json", type=Path, help="write the per-chunk tables and curves here")
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the shared slides")
    slides = {}
    for rel in args.slides:
        per_chunk = measure(DATA / rel)
        curves = strategies(per_chunk)
        slides[rel] = {"table": per_chunk, "curves": curves}
        print(f"\n{rel}: store MB @ level-0 tissue SSIM; BD-rate (SSIM) vs fixed")
        for name, points in curves.items():
            bd = "" if name == "fixed" else \
                f"   BD {bd_rate(points, curves['fixed'], 'ssim'):+.1f}%"
            print(f"  {name:>6}: " + " ".join(f"{q['bpp'] / 1e6:.3f}@{q['ssim']:.4f}"
                                              for q in points) + bd)
    results = {**provenance("rung_choice"), "model": default_model(), "slides": slides}
    if args.json:
        print(f"wrote {publish(args.json, results)}", file=sys.stderr)


if __name__ == "__main__":
    main()
