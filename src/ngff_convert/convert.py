"""Whole slide -> multiscale OME-Zarr: the conversion and its stages.

The order of writes makes a half-written store never look complete: the image group is
first created with only a progress marker, then the arrays are filled (one dask task per
shard), and the NGFF ``multiscales`` metadata that makes it an image is written last.
``resume`` reopens such a store and skips the blocks whose objects are already there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import zarr

from . import ConvertError, ConvertInterrupted, __version__, ngff, one_line, provenance
from .calibrate import Calibration, choose_quality, sample_positions
from .codecs import (
    CodecChoice,
    codec_choice,
    jpeg_lattice_codec,
    v2_compressor,
    v3_codecs,
    with_jpeg_lattice,
)
from .destination import (
    Destination,
    discard_if_empty,
    interrupted_message,
    prepare,
    publish,
)
from .jpeg_source import MIN_CLOSE, SourceLattice, close_share, read_lattice
from .jpeg_tiles import JpegTiles, find_jpeg_tiles
from .options import Options
from .provenance import source_bytes, source_files
from .pyramid import Layout, level_shapes, pyramid
from .resume import check_same_settings
from .slide import SlideInfo, associated_image, open_slide, read_rgb
from .store import (
    PROGRESS_KEY,
    Output,
    check_writable,
    create_level,
    open_output,
)
from .tissue import Glass, TissueMask, mask_downsample, preview, thumbnail, tissue_mask
from .transcode import (
    Level0Plan,
    ZeroLossLevel0,
    count_tiles,
    plan_level0,
    tiles_per_block,
)
from .write import configure_zarr, write_levels

#: level-0 tissue chunks on which a JPEG lattice read from the headers is checked
LATTICE_CHECK_CHUNKS = 8


@dataclass
class Summary:
    target: str
    levels: list[tuple[int, int, int]]
    blocks_written: int
    blocks_skipped: int
    stored_bytes: int
    stored_objects: int
    source_bytes: int
    seconds: float
    megapixels: float
    tissue_fraction: float
    already_complete: bool = False

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0


def _settings(info: SlideInfo, options: Options, codec_config: dict[str, Any],
              calibration: Calibration | None, lattice: SourceLattice,
              source_sha256: str) -> dict[str, Any]:
    """What a --resume must match, and how the store was made (with --target-ssim,
    ``quality_choice`` records the search; ``jpeg_lattice`` is level 0's lattice filter)."""
    settings = {
        "source_sha256": source_sha256, "source_bytes": source_bytes(info.path),
        "codec": options.codec, "codec_config": codec_config, "ngff": options.ngff,
        "glass": options.glass.value, "chunk": options.chunk,
        "shard": options.shard if options.ngff == "0.5" else 1, "mask": asdict(options.mask),
        "jpeg_lattice": lattice.config, "jpeg_lattice_note": lattice.reason,
    }
    if calibration is not None:
        settings["quality_choice"] = calibration.as_dict()
    return settings


def _target_ssim(options: Options) -> float | None:
    """The --target-ssim in force: the user's, or the codec's default when neither a
    quality nor dlwsi's per-chunk --chunk-ssim is given."""
    if options.target_ssim is not None and options.quality is not None:
        raise ConvertError("--quality fixes the quality and --target-ssim chooses it; "
                           "give one of them")
    if options.target_ssim is not None and options.chunk_ssim is not None:
        raise ConvertError("--target-ssim chooses the slide's quality and --chunk-ssim a "
                           "rung per chunk; give one of them")
    if options.target_ssim is not None:
        if not 0.0 < options.target_ssim < 1.0:
            raise ConvertError(f"--target-ssim must be between 0 and 1, got "
                               f"{options.target_ssim}")
        return options.target_ssim
    if options.quality is None and options.chunk_ssim is None:
        return _codec_choice(options).default_target_ssim
    return None


def _codec_choice(options: Options) -> CodecChoice:
    """--codec, with dlwsi's --model among the settings stored with it."""
    choice = codec_choice(options.codec)
    if options.model is None:
        return choice
    if choice.name != "dlwsi":
        raise ConvertError(f"--model chooses dlwsi's model; --codec {choice.name} has none")
    return replace(choice, settings=(*choice.settings, ("model", options.model)))


def _chosen_quality(info: SlideInfo, tissue: TissueMask, options: Options, target: float,
                    earlier: dict[str, Any] | None, lattice: SourceLattice,
                    log: Callable[[str], None]) -> Calibration:
    """The slide's quality for ``target``; a resumed run keeps the interrupted run's."""
    if earlier and earlier.get("target_ssim") == target and \
            earlier.get("refine", 0) == options.refine:
        return Calibration.from_dict(earlier)
    restore = jpeg_lattice_codec(lattice.config) if lattice.config is not None else None
    return choose_quality(info, tissue, options.glass, options.chunk,
                          _codec_choice(options), target, options.workers, log,
                          restore=restore, refine=options.refine,
                          progress=options.progress)


def _level0_lattice(info: SlideInfo, tissue: TissueMask, options: Options,
                    log: Callable[[str], None]) -> SourceLattice:
    """Level 0's JPEG lattice, read from the slide's headers and checked on its pixels:
    snapping the source itself must leave it (nearly) unchanged."""
    if not options.jpeg_lattice:
        return SourceLattice(None, "off (--jpeg-lattice off)")
    found = read_lattice(info.path, info.vendor, info.width, info.height)
    if found.config is None:
        log(f"JPEG lattice: none ({found.reason})")
        return found
    try:
        codec = jpeg_lattice_codec(found.config)
    except Exception as exc:  # noqa: BLE001 - an older numcodecs-dlwsi, say
        return SourceLattice(None, f"{found.reason}, but the dlwsi_jpeg_lattice codec is "
                                   f"unavailable: {one_line(exc)}")
    chunk = options.chunk
    sources = [read_rgb(info, x, y, min(chunk, info.width - x), min(chunk, info.height - y))
               for y, x in sample_positions(info, tissue, chunk, LATTICE_CHECK_CHUNKS)]
    share = close_share(codec, sources)
    if share < MIN_CLOSE:
        reason = (f"{found.reason}, but snapping its pixels moves {1 - share:.0%} of them "
                  "by more than a grey level (not a JPEG decoder's output with these "
                  "tables on this grid): not used")
        log(f"JPEG lattice: {reason}")
        return SourceLattice(None, reason)
    reason = (f"{found.reason}; snapping its pixels moves {1 - share:.1%} of them by more "
              "than a grey level")
    log(f"JPEG lattice: {reason}; level 0 gets the dlwsi_jpeg_lattice filter")
    return SourceLattice(found.config, reason)


def _level0_plan(info: SlideInfo, tissue: TissueMask, options: Options, zarr_format: int,
                 calibration: Calibration | None, earlier: dict[str, Any] | None,
                 log: Callable[[str], None]) -> tuple[Level0Plan, JpegTiles | None]:
    """How level 0 is stored (``--level0``); a resumed run keeps the interrupted run's
    choice. Returns the plan and, for a zero-loss level 0, the source's tiles."""
    tiles = find_jpeg_tiles(info) if options.level0 != "lossy" else "not asked for"
    if earlier and earlier.get("requested") == options.level0:
        plan = Level0Plan.from_dict(earlier)
    else:
        boxes = [(y, x, min(options.chunk, info.height - y), min(options.chunk, info.width - x))
                 for y, x in sample_positions(info, tissue, options.chunk)]
        plan = plan_level0(options.level0, tiles, zarr_format,
                           calibration.bits_per_pixel if calibration else None, boxes,
                           options.codec, calibration.reached if calibration else True)
    log(f"level 0: {'zero loss' if plan.mode == 'transcode' else 'lossy'}: {plan.reason}")
    if plan.mode != "transcode":
        return plan, None
    if isinstance(tiles, str):
        raise ConvertError(f"--resume: the interrupted run kept level 0's JPEG tiles, but "
                           f"now {tiles}")
    return plan, tiles


def _codec_config(options: Options) -> dict[str, Any]:
    """Resolve --codec/--quality for the format; fail (one line) before writing anything."""
    choice = _codec_choice(options)
    if options.ngff == "0.5":
        config = v3_codecs(choice, options.quality, options.chunk_ssim, options.refine)
    else:
        config = {"compressors": v2_compressor(choice, options.quality, options.chunk_ssim,
                                               options.refine)}
    # instantiate once on a scratch store so a bad quality or missing weights fail now
    probe = zarr.create_array(zarr.storage.MemoryStore(), shape=(3, 64, 64),
                              chunks=(3, 64, 64), dtype="uint8", fill_value=255,
                              zarr_format=3 if options.ngff == "0.5" else 2, **config)
    try:
        probe[:] = np.full((3, 64, 64), 200, np.uint8)
    except Exception as exc:  # noqa: BLE001 - the codec's own message is the clearest
        raise ConvertError(f"codec {options.codec}: {one_line(exc)}") from None
    return config


def convert(source: str, target: str, options: Options,
            log: Callable[[str], None] = print) -> Summary:
    """Convert ``source`` (anything OpenSlide reads) to an OME-Zarr image at ``target``."""
    start = time.perf_counter()
    ngff._check_version(options.ngff)
    if options.chunk < 16 or options.chunk % 16:
        raise ConvertError(f"--chunk must be a positive multiple of 16, got {options.chunk}")
    if options.shard < 1:
        raise ConvertError(f"--shard must be >= 1, got {options.shard}")
    info = open_slide(source)
    configure_zarr()
    target_ssim = _target_ssim(options)
    try:
        codecs = _codec_config(options)
    except ConvertError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"codec {options.codec}: {one_line(exc)}") from None
    zarr_format = 3 if options.ngff == "0.5" else 2
    final = open_output(target, storage_options=options.storage_options)
    dest = prepare(final, options.overwrite, options.resume, source_files(info.path), log)
    if dest is None:
        return _summary(final, info, [], 0, 0, start, 0.0, already_complete=True)
    try:
        return _convert_into(dest, info, options, codecs, target_ssim, zarr_format, start,
                             log)
    except KeyboardInterrupt:
        raise ConvertInterrupted(interrupted_message(dest)) from None
    except BaseException:
        discard_if_empty(dest)  # failed before writing: leave no empty folder behind
        raise


def _convert_into(dest: Destination, info: SlideInfo, options: Options,
                  codecs: dict[str, Any], target_ssim: float | None, zarr_format: int,
                  start: float, log: Callable[[str], None]) -> Summary:
    out, resuming, state = dest.work, dest.resuming, dest.state
    check_writable(out)

    # tissue mask: from a thumbnail, one for the whole slide, every level uses it
    ds = mask_downsample(info)
    thumb = thumbnail(info, ds)
    tissue = tissue_mask(thumb, ds, options.mask)
    if options.mask_out:
        _write_png(options.mask_out, preview(thumb, tissue, options.chunk, options.glass))

    chunks_per_block = options.shard if zarr_format == 3 and options.shard > 1 else 4
    layout = Layout(options.chunk, chunks_per_block)
    shapes = level_shapes(info.height, info.width, options.chunk)
    names = [str(i) for i in range(len(shapes))]
    lattice = _level0_lattice(info, tissue, options, log)
    calibration = None
    if target_ssim is not None:
        earlier = state.get("settings", {}).get("quality_choice") if resuming and state else None
        calibration = _chosen_quality(info, tissue, options, target_ssim, earlier, lattice,
                                      log)
        options = replace(options, quality=calibration.quality)
        codecs = _codec_config(options)
    plan, tiles = _level0_plan(info, tissue, options, zarr_format, calibration,
                               state.get("settings", {}).get("level0")
                               if resuming and state else None, log)
    settings = _settings(info, options, codecs, calibration, lattice,
                         provenance.source_sha256(info.path, log))
    settings["level0"] = plan.as_dict()
    level_codecs = [with_jpeg_lattice(codecs, lattice.config, zarr_format) if k == 0
                    else codecs for k in range(len(shapes))]
    zero_loss = None
    if tiles is not None:
        per_block = tiles_per_block(tiles.tile, options.chunk, chunks_per_block)
        zero_loss = ZeroLossLevel0(tiles, per_block, options.shard > 1,
                                   Glass.keep if options.glass is Glass.keep else Glass.drop)
        if options.glass is not Glass.keep:
            log(f"level 0: tiles without tissue are not stored (--glass "
                f"{options.glass.value}; the only change to level 0: --glass keep stores "
                "every tile), the others are kept as scanned")
    group, arrays = _level_arrays(out, resuming, settings, names, shapes, level_codecs,
                                  options, zarr_format, zero_loss)

    if zero_loss is None:
        levels = pyramid(info, layout, options.glass, tissue)
    else:  # lower levels from the pixels level 0 holds: the tiles, glass tiles white
        levels = pyramid(info, layout, zero_loss.glass, tissue, zero_loss.layout)
    written, skipped, tile_counts = write_levels(out, levels, arrays, names, layout, tissue,
                                                  options, resuming, log, zero_loss)
    if zero_loss is not None:
        if resuming:  # the interrupted run's blocks count too
            tile_counts = count_tiles(out.store, arrays[0], names[0], zero_loss.tiles)
        settings["level0"]["tiles"] = tile_counts
        log(f"level 0: {tile_counts['transcoded']} tiles recompressed losslessly as "
            f"JPEG-XL, {tile_counts['kept_as_jpeg']} kept as JPEG (JPEG-XL cannot take "
            f"them), {tile_counts['not_stored']} not stored (glass)")

    if options.associated:
        _write_associated(group, info, zarr_format, options.ngff)
    _finish(group, info, names, options, settings, tissue)
    publish(dest)
    megapixels = sum(h * w for _, h, w in shapes) / 1e6
    return _summary(dest.final, info, shapes, written, skipped, start, megapixels,
                    tissue_fraction=tissue.tissue_fraction)


def _level_arrays(out: Output, resuming: bool, settings: dict[str, Any], names: list[str],
                  shapes: list[tuple[int, int, int]], level_codecs: list[dict[str, Any]],
                  options: Options, zarr_format: int, zero_loss: ZeroLossLevel0 | None
                  ) -> tuple[zarr.Group, list[zarr.Array]]:
    """The image group and its level arrays: created with the "incomplete" marker, or
    reopened by ``--resume`` after checking that the settings are the interrupted run's."""
    if resuming:
        group = zarr.open_group(out.store, mode="r+")
        old = group.attrs.get(PROGRESS_KEY, {}).get("settings", {})
        check_same_settings(out.url, old, settings)
        # a run killed while it was creating the level arrays left only some of them
        arrays = [_level_or_create(group, name, shape, options, zarr_format, chain,
                                   zero_loss if k == 0 else None)
                  for k, (name, shape, chain) in enumerate(zip(names, shapes, level_codecs,
                                                               strict=True))]
    else:
        try:
            group = zarr.open_group(out.store, mode="w", zarr_format=zarr_format,
                                    attributes={PROGRESS_KEY: {"complete": False,
                                                               "settings": settings,
                                                               "version": __version__}})
            arrays = [zero_loss.create(group, name) if k == 0 and zero_loss is not None
                      else create_level(group, name, shape, options.chunk,
                                        options.shard if zarr_format == 3 else 1, zarr_format,
                                        chain)
                      for k, (name, shape, chain) in enumerate(zip(names, shapes,
                                                                   level_codecs, strict=True))]
        except Exception as exc:  # noqa: BLE001
            raise ConvertError(f"{out.url}: cannot create the store: {one_line(exc)}") from None
    return group, arrays


def _level_or_create(group: zarr.Group, name: str, shape: tuple[int, int, int],
                     options: Options, zarr_format: int, codecs: dict[str, Any],
                     zero_loss: ZeroLossLevel0 | None = None) -> zarr.Array:
    """On --resume: the level array the interrupted run created, or a new one if it was
    killed before it got there (each metadata object is written atomically)."""
    try:
        array = group[name]
    except KeyError:
        array = None
    if isinstance(array, zarr.Array):
        if tuple(array.shape) != tuple(shape):
            raise ConvertError(f"level {name} has shape {tuple(array.shape)}, expected "
                               f"{tuple(shape)}; the store was not made from this slide")
        return array
    try:
        if zero_loss is not None:
            return zero_loss.create(group, name)
        return create_level(group, name, shape, options.chunk,
                            options.shard if zarr_format == 3 else 1, zarr_format, codecs)
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"cannot create level {name}: {one_line(exc)}") from None


def _finish(group: zarr.Group, info: SlideInfo, names: list[str], options: Options,
            settings: dict[str, Any], tissue: TissueMask) -> None:
    """Write the NGFF metadata that marks the image complete: always last."""
    pixel_size = (info.mpp_y, info.mpp_x) if info.mpp_x and info.mpp_y else None
    name = provenance.image_name(info, options.keep_properties)
    attrs = ngff.image_attrs(
        ngff.multiscale(names, pixel_size, name, options.ngff),
        ngff.omero_rgb(name, options.ngff), options.ngff,
        extra={
            "openslide": provenance.properties(info, options.keep_properties),
            PROGRESS_KEY: {
                "complete": True, "version": __version__, "settings": settings,
                "tissue": {"fraction": round(tissue.tissue_fraction, 4),
                           "mask_downsample": tissue.downsample,
                           "saturation_threshold": round(tissue.saturation_threshold, 4)},
                "associated": sorted(info.associated) if options.associated else [],
            },
        })
    group.attrs.put(attrs)  # replaces the "incomplete" marker in one write


def _write_associated(group: zarr.Group, info: SlideInfo, zarr_format: int,
                      version: str) -> None:
    """Label/macro/thumbnail as one-level NGFF images under ``associated/``, lossless."""
    parent = group.require_group("associated")
    for name in info.associated:
        image = associated_image(info, name)
        sub = parent.require_group(name)
        chunks = (3, *(min(1024, n) for n in image.shape[1:]))
        kwargs: dict[str, Any] = ({"compressors": [{"name": "zstd",
                                                    "configuration": {"level": 5}},
                                                   {"name": "crc32c"}],
                                   "dimension_names": ["c", "y", "x"]}
                                  if zarr_format == 3 else
                                  {"compressors": {"id": "zstd", "level": 5},
                                   "chunk_key_encoding": {"name": "v2", "separator": "/"}})
        arr = sub.create_array("0", shape=image.shape, chunks=chunks, dtype="uint8",
                               overwrite=True, **kwargs)
        arr[:] = image
        sub.attrs.update(ngff.image_attrs(ngff.multiscale(["0"], None, name, version),
                                          ngff.omero_rgb(name, version), version))


def _summary(out: Output, info: SlideInfo, shapes: list, written: int, skipped: int,
             start: float, megapixels: float, tissue_fraction: float = 0.0,
             already_complete: bool = False) -> Summary:
    stored, objects = out.size()
    return Summary(out.url, shapes, written, skipped, stored, objects,
                   source_bytes(info.path), time.perf_counter() - start, megapixels,
                   tissue_fraction, already_complete)


def _write_png(path: str, rgb: np.ndarray) -> None:
    from PIL import Image

    try:
        Image.fromarray(rgb).save(path, format="PNG")
    except OSError as exc:
        raise ConvertError(f"--mask-out {path}: {one_line(exc)}") from None
