"""The ``ngff-convert`` command: convert (default), ``verify`` and ``info``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import ConvertError, ConvertInterrupted, __version__
from .codecs import CODECS, DEFAULT_TARGET_SSIM
from .tissue import Glass, MaskParams

DESCRIPTION = """\
Convert a whole-slide image (anything OpenSlide reads: SVS, NDPI, generic tiled TIFF,
DICOM, MIRAX, ...) to a multiscale OME-Zarr image, glass removed.

  ngff-convert SLIDE OUT [options]        convert (NGFF 0.5, dlwsi codec, glass fill)
  ngff-convert verify SLIDE OUT           per-level PSNR/SSIM and sizes vs the source
  ngff-convert info OUT                   levels, shapes, codec, stored vs raw bytes
  ngff-convert check OUT                  decode every stored chunk, list damaged ones
  ngff-convert extract OUT ROW COL -o F   a zero-loss store's level-0 tile, as the JPEG

OUT is a local path or an fsspec URL (s3://bucket/out.zarr, gs://..., file://...);
object-store credentials come from the usual places (environment, config files): for
s3://, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE,
AWS_REGION, and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible server.
--storage-option KEY=VALUE (repeatable) passes options to fsspec and wins over them:
  ngff-convert slide.svs s3://bucket/out.zarr --storage-option anon=false
      --storage-option endpoint_url=http://127.0.0.1:9000
"""

STORAGE_OPTION_HELP = ("fsspec option for a URL output, repeatable: e.g. "
                       "endpoint_url=http://127.0.0.1:9000, anon=true, key=..., "
                       "secret=..., profile=...; true/false/numbers/JSON are parsed, "
                       "a dotted key nests (client_kwargs.region_name=eu-west-1)")


def _add_storage_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--storage-option", metavar="KEY=VALUE", action="append", default=[],
                   dest="storage_options", help=STORAGE_OPTION_HELP)


def _add_reading_options(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """What every command that reads a store takes: fsspec options, the progress bar,
    tracebacks."""
    _add_storage_option(p)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

GLASS_HELP = """what to do with glass (slide background), from a tissue mask of a thumbnail:
  fill (default): chunks without tissue are not stored (they read as 255) and glass
        next to tissue is blended to white with a soft edge, so there are no seams
        between stored and dropped chunks;
  drop: chunks without tissue are not stored, kept glass keeps its scanned off-white
        (seams show where a dropped chunk meets a kept one);
  keep: every pixel as scanned."""


def _codec_help() -> str:
    return "; ".join(f"{c.name}: {c.note}" for c in CODECS.values())


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ngff-convert", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slide", help="input slide file")
    p.add_argument("out", help="output store: a path or an fsspec URL")
    p.add_argument("--codec", default="dlwsi", choices=list(CODECS),
                   help=f"chunk codec (default dlwsi). {_codec_help()}")
    p.add_argument("--quality", type=int, default=None,
                   help="codec quality in the codec's own scale, fixed for the whole slide "
                        "(default: chosen by --target-ssim for dlwsi, the codec's own for "
                        "the others); with --chunk-ssim, the highest dlwsi rung a chunk may "
                        "use")
    p.add_argument("--target-ssim", type=float, default=None, metavar="SSIM",
                   help="choose the slide's quality: the lowest whose level-0 tissue SSIM "
                        "vs the source, as 'verify' measures it, reaches SSIM on a sample "
                        "of up to 32 tissue chunks (every codec; a few trial encodes "
                        "before converting; the highest quality if none does). dlwsi's "
                        f"default: {DEFAULT_TARGET_SSIM}")
    p.add_argument("--chunk-ssim", type=float, default=None, metavar="SSIM",
                   help="dlwsi per-chunk rate control instead: each chunk gets the lowest "
                        "rung (up to --quality) whose decoded chunk reaches SSIM over its "
                        "non-white pixels, a floor for every chunk; on the Aperio slides it "
                        "stored 13-16%% more than one rung per slide at the same mean tissue SSIM")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="dlwsi latent refinement: STEPS gradient steps per chunk on the "
                        "model's own rate-distortion loss before entropy coding (100: about "
                        "7%% fewer bytes at equal SSIM on held-out H&E tiles, encoding "
                        "about 100x slower; needs PyTorch, the train extra; readers need "
                        "nothing new). --target-ssim then tries rungs below its plain "
                        "choice refined, for the bytes. Default 0")
    p.add_argument("--model", default=None, metavar="ID",
                   help="dlwsi model id (default: the installed default, he-mshl-v4). "
                        "he-mshl-v4-int8 decodes about 1.4x faster on CPUs with int8 "
                        "dot-product instructions (its rungs store v4's bits, decoded a "
                        "little less faithfully: about 2%% more bytes for the same SSIM)")
    p.add_argument("--ngff", choices=["0.5", "0.4"], default="0.5",
                   help="0.5: Zarr v3, sharded (default); 0.4: Zarr v2")
    p.add_argument("--glass", choices=[g.value for g in Glass], default=Glass.fill.value,
                   help=GLASS_HELP)
    p.add_argument("--chunk", type=int, default=512, help="chunk side in pixels (512)")
    p.add_argument("--shard", type=int, default=4,
                   help="chunks per shard side for NGFF 0.5 (4: 2048-pixel shards); "
                        "1 disables sharding")
    p.add_argument("--jpeg-lattice", choices=["auto", "off"], default="auto",
                   help="auto (default): when level 0 of the slide is stored as JPEG (SVS, "
                        "generic tiled TIFF) and its pixels check out against the JPEG "
                        "headers' quantization tables, level 0 gets the dlwsi_jpeg_lattice "
                        "filter, which snaps what the codec decodes back onto the source's "
                        "JPEG lattice when it is read (higher fidelity for the same bytes, "
                        "with every codec); off: never")
    p.add_argument("--level0", choices=["auto", "transcode", "lossy"], default="auto",
                   help="how level 0 is stored. transcode: zero loss, the source's own JPEG "
                        "tiles recompressed losslessly as JPEG-XL (about 0.74 of their "
                        "bytes; any reader decodes exactly the source's pixels, and "
                        "'ngff-convert extract' gives back each tile's JPEG byte for byte; "
                        "JPEG-tiled SVS, generic TIFF and DICOM, NGFF 0.5). lossy: coded with "
                        "--codec like the other levels. auto (default): transcode whenever "
                        "it is not larger than the lossy copy on the quality sample "
                        "(with a fixed --quality: lossy). Lower levels are always coded "
                        "with --codec")
    p.add_argument("--associated", action="store_true",
                   help="also store label/macro/thumbnail images under associated/ "
                        "(off by default: labels and macros can show patient identifiers)")
    p.add_argument("--keep-properties", action="store_true",
                   help="keep every OpenSlide property of the source (aperio.Filename, "
                        "aperio.User, aperio.Date, scanner IDs, tiff.ImageDescription, ...) "
                        "and name the image after the source file (off by default: only "
                        "vendor, pixel size, objective power, level geometry and the "
                        "source's SHA-256 are kept; docs/guides/converter.md)")
    _add_storage_option(p)
    m = p.add_argument_group("tissue mask")
    m.add_argument("--saturation-threshold", default="0.07",
                   help="HSV saturation (0-1) above which a pixel is tissue, or 'otsu' "
                        "(default 0.07)")
    m.add_argument("--brightness-threshold", type=int, default=220,
                   help="grey level (0-255) below which a pixel is tissue even when "
                        "unsaturated (default 220)")
    m.add_argument("--mask-dilate", type=int, default=2,
                   help="safety margin around tissue, in mask pixels (default 2)")
    m.add_argument("--min-tissue", type=int, default=16,
                   help="smallest tissue speck kept, in mask pixels (default 16)")
    m.add_argument("--mask-out", metavar="PNG",
                   help="write a preview: thumbnail, glass tinted blue, stored level-0 "
                        "chunks outlined in green")
    r = p.add_argument_group("running")
    r.add_argument("--workers", type=int, default=None,
                   help="threads for the local scheduler (default: CPU count)")
    r.add_argument("--scheduler", metavar="ADDRESS",
                   help="a dask.distributed scheduler (e.g. tcp://host:8786) to run on")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing output, only if ngff-convert wrote it and it "
                        "holds nothing else (never a folder with other files, the input, or "
                        "a bucket's root); a local store is replaced only once the new one "
                        "is complete")
    r.add_argument("--resume", action="store_true",
                   help="finish an interrupted conversion (a local one waits in "
                        "OUT.incomplete), keeping the chosen quality and what is written")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"ngff-convert {__version__}")
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngff-convert verify",
                                description="Compare a converted image with its source "
                                            "slide: PSNR/SSIM per level, sizes.")
    p.add_argument("slide")
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--min-ssim", type=float, default=None,
                   help="exit 3 when level 0's tissue SSIM is below this")
    p.add_argument("--workers", type=int, default=None)
    _add_reading_options(p)
    return p


def check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ngff-convert check",
        description="Decode every stored chunk of every level of a converted image, in "
                    "parallel, and list each damaged chunk by level, chunk index and the "
                    "object holding it. Exit 1 when any chunk is damaged.")
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding threads (default: CPU count)")
    _add_reading_options(p)
    return p


def extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ngff-convert extract",
        description="Write the source's JPEG of one level-0 tile of a zero-loss store "
                    "(--level0 transcode), byte for byte as the slide file held it (its "
                    "tables merged in). Tiles are numbered from the top left, in the "
                    "scanner's tile grid (ngff-convert info shows the tile size).")
    p.add_argument("out", help="the store")
    p.add_argument("row", type=int, help="tile row (0 at the top)")
    p.add_argument("column", type=int, help="tile column (0 at the left)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.jpg",
                   help="where to write the JPEG ('-' for standard output)")
    _add_reading_options(p, progress=False)
    return p


def _run_extract(args: argparse.Namespace) -> int:
    from .reading import extract_tile
    from .store import parse_storage_options

    jpeg = extract_tile(args.out, args.row, args.column,
                        parse_storage_options(args.storage_options))
    if args.output == "-":
        sys.stdout.buffer.write(jpeg)
        return 0
    try:
        with open(args.output, "xb") as f:
            f.write(jpeg)
    except FileExistsError:
        raise ConvertError(f"{args.output}: already exists; not replacing it") from None
    except OSError as exc:
        raise ConvertError(f"{args.output}: cannot write: {exc.strerror or exc}") from None
    print(f"{args.output}: tile {args.row},{args.column}, {len(jpeg)} bytes of JPEG")
    return 0


def info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ngff-convert info",
                                description="Describe a converted image.")
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_reading_options(p, progress=False)
    return p


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    from .options import Options
    from .store import parse_storage_options

    storage_options = parse_storage_options(args.storage_options)
    sat = args.saturation_threshold
    if sat == "otsu":
        saturation = None
    else:
        try:
            saturation = float(sat)
        except ValueError:
            raise ConvertError(f"--saturation-threshold must be a number or 'otsu', "
                               f"got {sat!r}") from None
        if not 0 <= saturation <= 1:
            raise ConvertError(f"--saturation-threshold must be in 0..1, got {sat}")
    if args.workers is not None and args.workers < 1:
        raise ConvertError(f"--workers must be >= 1, got {args.workers}")
    if args.overwrite and args.resume:
        raise ConvertError("--overwrite and --resume contradict each other; pick one")
    options = Options(
        codec=args.codec, quality=args.quality, target_ssim=args.target_ssim,
        chunk_ssim=args.chunk_ssim, refine=args.refine, model=args.model, ngff=args.ngff,
        glass=Glass(args.glass),
        chunk=args.chunk, shard=args.shard, associated=args.associated,
        keep_properties=args.keep_properties, level0=args.level0,
        jpeg_lattice=args.jpeg_lattice == "auto",
        mask=MaskParams(saturation=saturation, brightness=args.brightness_threshold,
                        min_area=args.min_tissue, dilate=args.mask_dilate),
        mask_out=args.mask_out, workers=args.workers, scheduler=args.scheduler,
        overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
        storage_options=storage_options)
    s = convert(args.slide, args.out, options, log=lambda m: print(m, file=sys.stderr))
    if s.already_complete:
        return 0
    print(f"{s.target}: {len(s.levels)} levels, level 0 {s.levels[0][2]}x{s.levels[0][1]}, "
          f"tissue {s.tissue_fraction:.0%}, {s.blocks_written} blocks written"
          + (f" ({s.blocks_skipped} already done)" if s.blocks_skipped else "")
          + f"; stored {_mib(s.stored_bytes)} in {s.stored_objects} objects vs source "
          f"{_mib(s.source_bytes)}; {s.seconds:.1f} s, {s.mp_per_s:.2f} MP/s")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from .reading import info
    from .store import parse_storage_options

    d = info(args.out, parse_storage_options(args.storage_options))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['store']}: OME-NGFF {d['ngff']} (Zarr v{d['zarr_format']}), {d['name']}, "
          f"glass {d['glass'] or '?'}, unit {d['unit'] or 'none (pixel size unknown)'}")
    print(f"{'level':>5} {'shape (c,y,x)':>20} {'scale':>22} {'objects':>8} {'stored':>12} "
          f"{'raw':>12} {'ratio':>7}  codec")
    for lv in d["levels"]:
        ratio = lv["raw_bytes"] / lv["stored_bytes"] if lv["stored_bytes"] else float("inf")
        scale = ",".join(f"{s:g}" for s in lv["scale"])
        print(f"{lv['path']:>5} {str(tuple(lv['shape'])):>20} {scale:>22} {lv['objects']:>8} "
              f"{_mib(lv['stored_bytes']):>12} {_mib(lv['raw_bytes']):>12} {ratio:>6.1f}x  "
              f"{lv['codec']}")
    src = d["source_bytes"]
    choice = d.get("quality_choice")
    if choice:
        print(f"quality {choice['quality']} chosen for level-0 tissue SSIM "
              f"{choice['target_ssim']}: {choice['ssim']:.4f} on {choice['chunks']} sampled "
              "chunks" + (f", {choice['refine']} refinement steps" if choice.get("refine")
                          else "")
              + ("" if choice["reached"] else " (the highest; target not reached)"))
    level0 = d.get("level0")
    if level0:
        tiles = level0.get("tiles")
        print(f"level 0: {'zero loss' if level0['mode'] == 'transcode' else 'lossy'} "
              f"({level0['reason']})"
              + (f"; {tiles['transcoded']} tiles recompressed as JPEG-XL, "
                 f"{tiles['kept_as_jpeg']} kept as JPEG, {tiles['not_stored']} not stored "
                 "(glass)" if tiles else ""))
    if d.get("jpeg_lattice") and (not level0 or level0["mode"] != "transcode"):
        print(f"JPEG lattice: {d['jpeg_lattice']}")
    print(f"total: {_mib(d['stored_bytes'])} stored in {d['objects']} objects, "
          f"{_mib(d['raw_bytes'])} raw"
          + (f", source file {_mib(src)} (stored = {d['stored_bytes'] / src:.1%} of it)"
             if src else ""))
    print("(from the metadata and object sizes; 'ngff-convert check' decodes every chunk "
          "and locates any damage)")
    return 0


def _damage_line(d: dict) -> str:
    return (f"level {d['level']}, chunk {d['chunk'][0]},{d['chunk'][1]} (object {d['key']}): "
            f"{d['error']}")


def _print_damage(damaged: list[dict]) -> None:
    for d in damaged:
        print(f"damaged: {_damage_line(d)}")


def _damage_error(store: str, damaged: list[dict], note: str = "") -> int:
    """The closing error line of a store with chunks that do not decode: exit 1."""
    count = f"{len(damaged)} chunk{'s' if len(damaged) > 1 else ''}"
    print(f"ngff-convert: error: {store}: {count} cannot be decoded{note} (first: "
          f"{_damage_line(damaged[0])})", file=sys.stderr)
    return 1


def _run_check(args: argparse.Namespace) -> int:
    from .options import Options
    from .reading import check
    from .store import parse_storage_options

    if args.workers is not None and args.workers < 1:
        raise ConvertError(f"--workers must be >= 1, got {args.workers}")
    d = check(args.out, Options(workers=args.workers, progress=not args.no_progress,
                                storage_options=parse_storage_options(args.storage_options)))
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_damage(d["damaged"])
        levels = ", ".join(f"level {lv['path']} {lv['chunks_checked']}"
                           + (f" ({lv['damaged']} damaged)" if lv["damaged"] else "")
                           for lv in d["levels"])
        print(f"{d['store']}: {d['chunks_checked']} chunks decoded ({levels}); "
              + (f"{len(d['damaged'])} damaged" if d["damaged"] else "no damage found"))
    return _damage_error(d["store"], d["damaged"]) if d["damaged"] else 0


def _run_verify(args: argparse.Namespace) -> int:
    from .options import Options
    from .store import parse_storage_options
    from .verify import verify

    options = Options(workers=args.workers, progress=not args.no_progress,
                      storage_options=parse_storage_options(args.storage_options))
    d = verify(args.slide, args.out, options)
    if args.json:
        print(json.dumps(d, indent=2, default=float))
    else:
        print(f"{d['store']} vs {d['source']}")
        print(f"{'level':>5} {'shape (c,y,x)':>20} {'tissue':>7} {'PSNR tis.':>10} "
              f"{'SSIM tis.':>10} {'worst blk':>9} {'PSNR all':>9} {'SSIM all':>9} "
              f"{'stored':>12} {'damaged':>8}")
        for lv in d["levels"]:
            pt = "-" if lv["psnr_tissue"] is None else f"{lv['psnr_tissue']:.2f}"
            st = "-" if lv["ssim_tissue"] is None else f"{lv['ssim_tissue']:.4f}"
            worst = lv["worst_block"]
            wt = "-" if worst is None else f"{worst['ssim_tissue']:.4f}"
            print(f"{lv['path']:>5} {str(tuple(lv['shape'])):>20} "
                  f"{lv['tissue_fraction']:>7.0%} {pt:>10} {st:>10} {wt:>9} "
                  f"{_figure(lv['psnr_all'], 2):>9} {_figure(lv['ssim_all'], 4):>9} "
                  f"{_mib(lv['stored_bytes']):>12} {lv['damaged_chunks']:>8}")
        print(f"stored {_mib(d['stored_bytes'])} vs source file {_mib(d['source_bytes'])} "
              f"({d['stored_bytes'] / d['source_bytes']:.1%} of it)")
        tiles = d.get("level0_tiles")
        if tiles is not None:
            print(f"level 0 keeps the source's tiles: {tiles['stored']} stored, "
                  f"{tiles['jpeg_identical']} give back the source's JPEG byte for byte, "
                  f"{tiles['pixels_identical']} decode to the source's pixels exactly; "
                  f"{tiles['not_stored']} not stored (glass)")
            for bad in tiles["differing"]:
                print(f"differs: level-0 tile {bad['tile'][0]},{bad['tile'][1]}: "
                      + (bad["error"] if "error" in bad else
                         f"JPEG {'identical' if bad['jpeg'] else 'differs'}, pixels "
                         f"{'identical' if bad['pixels'] else 'differ'}"))
        _print_damage(d["damaged"])
        worst = d["levels"][0]["worst_block"]
        if worst is not None:
            print(f"worst block: level 0, {worst['size']}x{worst['size']} at x={worst['x']} "
                  f"y={worst['y']}, tissue SSIM {worst['ssim_tissue']:.4f} "
                  f"(lowest of {worst['blocks_measured']} blocks at least a quarter tissue)")
    if d["damaged"]:
        return _damage_error(d["store"], d["damaged"], ", left out of the figures")
    if d.get("level0_tiles") and d["level0_tiles"]["differing"]:
        print(f"ngff-convert: error: {d['store']}: {len(d['level0_tiles']['differing'])} "
              "level-0 tiles differ from the source", file=sys.stderr)
        return 1
    if args.min_ssim is not None:
        level0 = d["levels"][0]
        ssim = level0["ssim_tissue"] if level0["ssim_tissue"] is not None else level0["ssim_all"]
        if ssim < args.min_ssim:
            print(f"error: level 0 SSIM {ssim:.4f} is below --min-ssim {args.min_ssim}",
                  file=sys.stderr)
            return 3
    return 0


COMMANDS = {"verify": (verify_parser, _run_verify), "info": (info_parser, _run_info),
            "check": (check_parser, _run_check), "extract": (extract_parser, _run_extract)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        make, run = COMMANDS[argv[0]]
        argv = argv[1:]
    else:
        if argv and argv[0] == "convert":
            argv = argv[1:]
        make, run = convert_parser, _run_convert
    args = make().parse_args(argv)
    try:
        return run(args)
    except ConvertInterrupted as exc:
        print(f"ngff-convert: {exc}", file=sys.stderr)
        return 130
    except ConvertError as exc:
        print(f"ngff-convert: error: {exc}", file=sys.stderr)
        _quiet_exit(args)
        return 1
    except ImportError as exc:
        print(f"ngff-convert: error: missing dependency {exc.name or exc}: install "
              "numcodecs-dlwsi[convert]", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ngff-convert: interrupted" + ("" if run is not _run_convert else
                                             " before anything was written; nothing to "
                                             "resume"), file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users, --debug for developers
        if getattr(args, "debug", False) or os.environ.get("NGFF_CONVERT_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ngff-convert: error: {type(exc).__name__}: {msg} (--debug for details)",
              file=sys.stderr)
        _quiet_exit(args)
        return 1


def _quiet_exit(args: argparse.Namespace) -> None:
    """After the one-line error, silence what abandoned object-store requests print as
    the interpreter exits (zarr's concurrent reads/writes that an error cut short:
    "coroutine ... was never awaited", "Exception ignored in ..."); --debug keeps it."""
    if getattr(args, "debug", False) or os.environ.get("NGFF_CONVERT_DEBUG"):
        return
    import warnings

    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    sys.unraisablehook = lambda _unraisable: None


if __name__ == "__main__":
    sys.exit(main())
