"""Whole slide -> multiscale OME-Zarr (``convert``), and ``verify`` / ``info`` of a result.

The order of writes makes a half-written store never look complete: the image group is
first created with only a progress marker, then the arrays are filled (one dask task per
shard), and the NGFF ``multiscales`` metadata that makes it an image is written last.
``resume`` reopens such a store and skips the blocks whose objects are already there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import dask
import numpy as np
import zarr

from . import ConvertError, ConvertInterrupted, __version__, ngff, provenance
from .calibrate import Calibration, choose_quality, sample_positions
from .check import DamageLog, check_store, read_region
from .codecs import (
    codec_choice,
    describe_v3,
    jpeg_lattice_codec,
    register_image_codecs,
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
    work_sibling,
)
from .fidelity import in_tissue, ssim_map
from .jpeg_source import MIN_CLOSE, SourceLattice, close_share, read_lattice
from .jpeg_tiles import JpegTiles, find_jpeg_tiles
from .provenance import source_bytes, source_files
from .pyramid import Layout, level_shapes, pyramid
from .slide import SlideInfo, associated_image, open_slide, read_rgb
from .store import (
    PROGRESS_KEY,
    Output,
    check_range_support,
    check_writable,
    create_level,
    open_output,
)
from .tissue import Glass, MaskParams, TissueMask, mask_downsample, preview, thumbnail, tissue_mask
from .transcode import (
    Level0Plan,
    ZeroLossLevel0,
    plan_level0,
    stored_chunk,
    tile_codec,
    tiles_per_block,
    verify_tiles,
)

BATCH_SIZE = 16  # chunks per codec call: dlwsi encodes a batch at once
#: level-0 tissue chunks on which a JPEG lattice read from the headers is checked
LATTICE_CHECK_CHUNKS = 8


@dataclass
class Options:
    codec: str = "dlwsi"
    quality: int | None = None
    target_ssim: float | None = None  # the slide's quality chosen to reach this (calibrate)
    chunk_ssim: float | None = None  # dlwsi: each chunk's rung chosen to reach this SSIM
    refine: int = 0  # dlwsi: latent refinement steps per chunk (slower encoding, fewer bytes)
    ngff: str = "0.5"
    glass: Glass = Glass.fill
    chunk: int = 512
    shard: int = 4  # chunks per shard side (NGFF 0.5); 1 = no sharding
    associated: bool = False
    level0: str = "auto"  # auto | transcode | lossy (transcode.py)
    keep_properties: bool = False  # identifying properties and the file name kept
    jpeg_lattice: bool = True  # level 0 of a JPEG slide gets the lattice filter (jpeg_source)
    mask: MaskParams = field(default_factory=MaskParams)
    mask_out: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec, for URLs


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


def configure_zarr() -> None:
    """Codec batches and no empty chunks; set once per process (workers included)."""
    zarr.config.set({"codec_pipeline.batch_size": BATCH_SIZE,
                     "array.write_empty_chunks": False})


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
        return codec_choice(options.codec).default_target_ssim
    return None


def _chosen_quality(info: SlideInfo, tissue: TissueMask, options: Options, target: float,
                    earlier: dict[str, Any] | None, lattice: SourceLattice,
                    log: Callable[[str], None]) -> Calibration:
    """The slide's quality for ``target``; a resumed run keeps the interrupted run's."""
    if earlier and earlier.get("target_ssim") == target and \
            earlier.get("refine", 0) == options.refine:
        return Calibration.from_dict(earlier)
    restore = jpeg_lattice_codec(lattice.config) if lattice.config is not None else None
    return choose_quality(info, tissue, options.glass, options.chunk,
                          codec_choice(options.codec), target, options.workers, log,
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
                                   f"unavailable: {_one_line(exc)}")
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
    choice = codec_choice(options.codec)
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
        raise ConvertError(f"codec {options.codec}: {_one_line(exc)}") from None
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
        raise ConvertError(f"codec {options.codec}: {_one_line(exc)}") from None
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
    if resuming:
        group = zarr.open_group(out.store, mode="r+")
        old = group.attrs.get(PROGRESS_KEY, {}).get("settings", {})
        different = _changed_settings(
            {k: _jsonable(old.get(k)) for k in RESUME_SETTINGS},
            {k: _jsonable(settings[k]) for k in RESUME_SETTINGS})
        if different:
            raise ConvertError(f"{out.url}: --resume with different settings than the "
                               f"interrupted run: {'; '.join(different)}")
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
            raise ConvertError(f"{out.url}: cannot create the store: {_one_line(exc)}") from None

    if zero_loss is None:
        levels = pyramid(info, layout, options.glass, tissue)
    else:  # lower levels from the pixels level 0 holds: the tiles, glass tiles white
        levels = pyramid(info, layout, zero_loss.glass, tissue, zero_loss.layout)
    written, skipped, tile_counts = _write_levels(out, levels, arrays, names, layout, tissue,
                                                  options, resuming, log, zero_loss)
    if zero_loss is not None:
        settings["level0"]["tiles"] = tile_counts
        log(f"level 0: {tile_counts['transcoded']} tiles recompressed losslessly as "
            f"JPEG-XL, {tile_counts['kept_as_jpeg']} kept as JPEG (JPEG-XL cannot take "
            f"them), {tile_counts['not_stored']} not stored (glass)"
            + (" (this run's blocks)" if resuming else ""))

    if options.associated:
        _write_associated(group, info, zarr_format, options.ngff)
    _finish(group, info, names, options, settings, tissue)
    publish(dest)
    megapixels = sum(h * w for _, h, w in shapes) / 1e6
    return _summary(dest.final, info, shapes, written, skipped, start, megapixels,
                    tissue_fraction=tissue.tissue_fraction)


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
        raise ConvertError(f"cannot create level {name}: {_one_line(exc)}") from None


def _write_levels(out: Output, levels: list[Any], arrays: list[zarr.Array], names: list[str],
                  layout: Layout, tissue: TissueMask, options: Options,
                  resuming: bool, log: Callable[[str], None],
                  zero_loss: ZeroLossLevel0 | None = None
                  ) -> tuple[int, int, dict[str, int]]:
    """Store every level, one task per block; returns (blocks written, blocks skipped,
    level 0's tile counts when it keeps the source's tiles)."""
    from dask.optimization import cull

    writes, keys, skipped, done = [], [], 0, []
    for k, (level, array, name) in enumerate(zip(levels, arrays, names, strict=True)):
        before = skipped
        present = out.keys(f"{name}/") if resuming else set()
        frozen = dask.delayed(frozenset(present), pure=True)
        # tasks carry the store and the array's path, not the array: a scheduler or
        # worker unpickling an array would need its codecs registered first
        if k == 0 and zero_loss is not None:
            w = level.map_blocks(_write_tiles_block, store=out.store, path=name,
                                 job=dask.delayed(zero_loss, pure=True),
                                 tissue=dask.delayed(tissue, pure=True), present=frozen,
                                 dtype=np.int64,
                                 chunks=((1,), (1,) * len(level.chunks[1]),
                                         (3,) * len(level.chunks[2])),
                                 name=f"write-level-{name}-tiles")
        else:
            w = level.map_blocks(_write_block, store=out.store, path=name, dtype=np.int64,
                                 present=frozen, prefix=f"{name}/", chunk=layout.chunk,
                                 chunks=((1,), (1,) * len(level.chunks[1]),
                                         (1,) * len(level.chunks[2])),
                                 name=f"write-level-{name}")
        for by in range(len(level.chunks[1])):
            for bx in range(len(level.chunks[2])):
                if resuming and (
                        zero_loss.block_done(array, name, tissue, by, bx, present)
                        if k == 0 and zero_loss is not None else
                        _block_done(array, present, name, k, by, bx, layout, tissue,
                                    options.glass)):
                    skipped += 1
                else:
                    keys.append((w.name, 0, by, bx))
        writes.append(w)
        done.append(f"level {name} {skipped - before}/{w.numblocks[1] * w.numblocks[2]}")
    if resuming:
        log(f"found {skipped} blocks already written ({', '.join(done)}); "
            f"{len(keys)} remain")
    counts = np.zeros(3, np.int64)
    if keys:
        graph: dict = {}
        for w in writes:  # the levels share their upstream tasks; keys are unique
            graph.update(dict(w.__dask_graph__()))
        graph, _ = cull(graph, keys)  # resume: only what the missing blocks need
        results = _run_graph(graph, keys, options)
        for key, result in zip(keys, results, strict=True):
            if zero_loss is not None and key[0] == writes[0].name:
                counts += np.asarray(result).reshape(3)
    tile_counts = {"transcoded": int(counts[0]), "kept_as_jpeg": int(counts[1]),
                   "not_stored": int(counts[2])}
    return len(keys), skipped, tile_counts


def _write_tiles_block(block: np.ndarray, store: Any, path: str, job: ZeroLossLevel0,
                       tissue: TissueMask, present: frozenset[str],
                       block_info: dict | None = None) -> np.ndarray:
    """Level 0 of a zero-loss store: the block's tiles from the source file (the pixel
    block itself is only what the lower levels are computed from)."""
    assert block_info is not None
    (_, _), (y0, _), (x0, _) = block_info[0]["array-location"]
    counts = job.write(store, path, tissue, y0, x0, present)
    return counts.reshape(1, 1, 3)


def _run_graph(graph: dict, keys: list, options: Options) -> list:
    if options.scheduler:
        try:
            from distributed import Client, progress
        except ImportError:
            raise ConvertError("--scheduler needs the 'distributed' package") from None
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as exc:
            raise ConvertError(f"cannot reach dask scheduler {options.scheduler}: "
                               f"{_one_line(exc)}") from None
        with client:
            client.run(configure_zarr)
            futures = client.get(graph, keys, sync=False)
            if options.progress:
                progress(futures)
            return client.gather(futures)
    from dask.threaded import get

    workers = options.workers or os.cpu_count() or 1
    if options.progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="converting", unit="task", leave=True):
            return get(graph, keys, num_workers=workers)
    return get(graph, keys, num_workers=workers)


def _write_block(block: np.ndarray, store: Any, path: str, present: frozenset[str],
                 prefix: str, chunk: int, block_info: dict | None = None) -> np.ndarray:
    """Store one block. A shard is one object, written whole; without sharding, chunks
    that a previous (interrupted) run already stored are left as they are."""
    assert block_info is not None
    configure_zarr()
    register_image_codecs()
    array = zarr.open_array(store, path=path, mode="r+")
    (_, _), (y0, y1), (x0, x1) = block_info[0]["array-location"]
    if array.shards is not None or not present:
        array[:, y0:y1, x0:x1] = block
        return np.ones((1, 1, 1), np.int64)
    encode = array.metadata.encode_chunk_key
    for cy in range(y0, y1, chunk):
        for cx in range(x0, x1, chunk):
            if prefix + encode((0, cy // chunk, cx // chunk)) in present:
                continue
            cy1, cx1 = min(cy + chunk, y1), min(cx + chunk, x1)
            array[:, cy:cy1, cx:cx1] = block[:, cy - y0:cy1 - y0, cx - x0:cx1 - x0]
    return np.ones((1, 1, 1), np.int64)


def _block_done(array: zarr.Array, present: set[str], name: str, level: int, by: int,
                bx: int, layout: Layout, tissue: TissueMask, glass: Glass) -> bool:
    """Whether a block's objects are all stored (each object is written atomically)."""
    meta = array.metadata
    if array.shards is not None:
        return f"{name}/{meta.encode_chunk_key((0, by, bx))}" in present
    step = 2**level
    _, h, w = array.shape
    n = layout.chunks_per_block
    for cy in range(by * n, min((by + 1) * n, math.ceil(h / layout.chunk))):
        for cx in range(bx * n, min((bx + 1) * n, math.ceil(w / layout.chunk))):
            if glass is not Glass.keep and not tissue.has_tissue(
                    cy * layout.chunk * step, cx * layout.chunk * step,
                    layout.chunk * step, layout.chunk * step):
                continue  # a glass chunk is never stored
            if f"{name}/{meta.encode_chunk_key((0, cy, cx))}" not in present:
                return False
    return True


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


# ---------------------------------------------------------------------------- info


def open_image(target: str, storage_options: dict[str, Any] | None = None,
               ) -> tuple[Output, zarr.Group, str, dict[str, Any]]:
    """Open a finished image: (output, group, NGFF version, multiscales entry)."""
    register_image_codecs()
    out = open_output(target, read_only=True, storage_options=storage_options)
    if not out.exists():
        work = work_sibling(out)
        if work is not None and work.exists():
            raise ConvertError(f"{target}: incomplete conversion (in {work.url}); re-run "
                               "ngff-convert with --resume")
        raise ConvertError(f"{target}: no such store")
    try:
        group = zarr.open_group(out.store, mode="r")
    except Exception as exc:  # noqa: BLE001
        raise ConvertError(f"{target}: not a Zarr group: {_one_line(exc)}") from None
    found = ngff.read_multiscale(dict(group.attrs))
    if found is None:
        state = group.attrs.get(PROGRESS_KEY)
        if isinstance(state, dict) and not state.get("complete"):
            raise ConvertError(f"{target}: incomplete conversion (no multiscales metadata); "
                               "re-run ngff-convert with --resume")
        raise ConvertError(f"{target}: not an OME-Zarr image (no multiscales metadata)")
    if any(getattr(group[d["path"]], "shards", None) for d in found[1]["datasets"]):
        check_range_support(out)
    return out, group, found[0], found[1]


def info(target: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Levels, shapes, codec and stored vs raw bytes of a converted image."""
    out, group, version, ms = open_image(target, storage_options)
    levels = []
    for ds in ms["datasets"]:
        arr = group[ds["path"]]
        stored, objects = out.size(ds["path"])
        raw = int(np.prod(arr.shape)) * arr.dtype.itemsize
        if arr.metadata.zarr_format == 3:
            codec = describe_v3([c.to_dict() for c in arr.metadata.codecs])
        else:
            comp = arr.metadata.compressor
            codec = " + ".join([f.codec_id for f in arr.metadata.filters or []]
                               + [str(comp.get_config() if comp is not None else None)])
        levels.append({
            "path": ds["path"], "shape": list(arr.shape), "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None, "codec": codec,
            "scale": ds["coordinateTransformations"][0]["scale"],
            "stored_bytes": stored, "objects": objects, "raw_bytes": raw,
        })
    unit = next((a.get("unit") for a in ms["axes"] if a["name"] == "x"), None)
    state = group.attrs.get(PROGRESS_KEY, {})
    total_stored, total_objects = out.size()
    raw_total = sum(level["raw_bytes"] for level in levels)
    return {
        "store": out.url, "ngff": version, "zarr_format": group.metadata.zarr_format,
        "name": ms.get("name"), "unit": unit, "levels": levels,
        "stored_bytes": total_stored, "objects": total_objects, "raw_bytes": raw_total,
        "source_bytes": state.get("settings", {}).get("source_bytes"),
        "glass": state.get("settings", {}).get("glass"),
        "tissue": state.get("tissue"),
        "quality_choice": state.get("settings", {}).get("quality_choice"),
        "jpeg_lattice": state.get("settings", {}).get("jpeg_lattice_note"),
        "level0": state.get("settings", {}).get("level0"),
    }


def check(target: str, options: Options | None = None) -> dict[str, Any]:
    """Decode every stored chunk of every level of a converted image (``check.py``)."""
    options = options or Options()
    out, group, _, ms = open_image(target, options.storage_options)
    return check_store(out, group, [d["path"] for d in ms["datasets"]], options.workers,
                       options.progress)


def extract_tile(target: str, row: int, column: int,
                 storage_options: dict[str, Any] | None = None) -> bytes:
    """The source's JPEG of level-0 tile (row, column) of a zero-loss store, byte for
    byte (tables merged)."""
    out, group, _, ms = open_image(target, storage_options)
    level0 = group.attrs.get(PROGRESS_KEY, {}).get("settings", {}).get("level0") or {}
    if level0.get("mode") != "transcode":
        raise ConvertError(f"{target}: level 0 is not the source's tiles (not converted "
                           "with a zero-loss level 0), so there is no JPEG to extract")
    path = ms["datasets"][0]["path"]
    array = group[path]
    rows, columns = (-(-n // c) for n, c in zip(array.shape[1:], array.chunks[1:],
                                                  strict=True))
    if not (0 <= row < rows and 0 <= column < columns):
        raise ConvertError(f"tile {row},{column} is outside level 0's {rows}x{columns} tiles")
    data = stored_chunk(out.store, array, path, row, column)
    if data is None:
        raise ConvertError(f"tile {row},{column} is not stored (glass)")
    config = array.metadata.codecs[0].to_dict()
    config = config.get("configuration", {}).get("codecs", [config])[0]
    try:
        return tile_codec(config["configuration"]["colorspace"]).jpeg(data)
    except ValueError as exc:
        raise ConvertError(f"tile {row},{column}: {_one_line(exc)}") from None


# -------------------------------------------------------------------------- verify


def verify(source: str, target: str, options: Options | None = None) -> dict[str, Any]:
    """Per-level PSNR/SSIM of the stored image against the source, and sizes.

    The reference for level k is the source's level 0 halved k times with the same 2x2
    mean (glass untouched). ``*_tissue`` numbers cover the tissue mask only (the codec's
    fidelity); ``*_all`` cover every pixel, glass changes included. ``worst_block`` is the
    512² block (in that level's pixels) with the lowest tissue SSIM, among those at least
    a quarter tissue: a mean can hide one badly coded region.
    """
    from skimage.metrics import structural_similarity  # noqa: F401 - fail early if absent

    options = options or Options()
    out, group, version, ms = open_image(target, options.storage_options)
    slide = open_slide(source)
    state = group.attrs.get(PROGRESS_KEY, {})
    mask_params = MaskParams(**state.get("settings", {}).get("mask", {})) \
        if state.get("settings", {}).get("mask") else MaskParams()
    ds = mask_downsample(slide)
    tissue = tissue_mask(thumbnail(slide, ds), ds, mask_params)
    shapes = level_shapes(slide.height, slide.width,
                          int(state.get("settings", {}).get("chunk", 512)))
    paths = [d["path"] for d in ms["datasets"]]
    layout = Layout(512, 4)
    reference = pyramid(slide, layout, Glass.keep, None)
    rows = []
    import dask.array as da

    tasks = []
    damage = DamageLog()
    for k, path in enumerate(paths):
        arr = group[path]
        if k >= len(shapes) or tuple(arr.shape) != shapes[k]:
            raise ConvertError(f"{target}: level {path} has shape {tuple(arr.shape)}, the "
                               f"source gives {shapes[k] if k < len(shapes) else 'none'}")
        ref = reference[k]
        tile = layout.chunk
        stats = da.map_blocks(_compare_block, ref, array=arr, path=path, damage=damage,
                              tissue=dask.delayed(tissue, pure=True),
                              step=2**k, tile=tile, dtype=np.float64,
                              name=f"verify-level-{path}-{id(damage)}",
                              chunks=((1,), tuple(-(-n // tile) for n in ref.chunks[1]),
                                      tuple(6 * -(-n // tile) for n in ref.chunks[2])))
        tasks.append(stats)
    if options.progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="verifying", unit="task", leave=True):
            results = dask.compute(*tasks, num_workers=options.workers or os.cpu_count())
    else:
        results = dask.compute(*tasks, num_workers=options.workers or os.cpu_count())
    for path, result in zip(paths, results, strict=True):
        blocks = result.reshape(result.shape[1], -1, 6)
        s = blocks.reshape(-1, 6).sum(axis=0)
        stored_bytes, _ = out.size(path)
        arr = group[path]
        rows.append({
            "path": path, "shape": list(arr.shape),
            "psnr_all": _psnr(s[0], s[1]) if s[1] else None,
            "ssim_all": float(s[2] / s[1]) if s[1] else None,
            "psnr_tissue": _psnr(s[3], s[4]) if s[4] else None,
            "ssim_tissue": float(s[5] / s[4]) if s[4] else None,
            "tissue_fraction": float(s[4] / max(s[1], 1)),
            "stored_bytes": stored_bytes, "raw_bytes": int(np.prod(arr.shape)),
            "worst_block": _worst_block(blocks, layout.chunk),
        })
    stored_total, _ = out.size()
    level0_tiles = None
    if (state.get("settings", {}).get("level0") or {}).get("mode") == "transcode":
        tiles = find_jpeg_tiles(slide)
        if isinstance(tiles, str):
            raise ConvertError(f"{target}: level 0 keeps the source's JPEG tiles, but "
                               f"{source}: {tiles}")
        level0_tiles = verify_tiles(out.store, group[paths[0]], paths[0], tiles,
                                    lambda x, y, w, h: read_rgb(slide, x, y, w, h))
    found = damage.sorted()
    for row in rows:
        row["damaged_chunks"] = sum(d.level == row["path"] for d in found)
    return {"store": out.url, "source": source, "ngff": version, "levels": rows,
            "damaged": [d.as_dict() for d in found], "level0_tiles": level0_tiles,
            "stored_bytes": stored_total, "source_bytes": source_bytes(slide.path)}


#: a block's own SSIM is reported only where tissue covers this share of it: a sliver of
#: tissue at the edge of glass is too few pixels for a meaningful score
WORST_BLOCK_MIN_TISSUE = 0.25


def _worst_block(blocks: np.ndarray, block: int) -> dict[str, Any] | None:
    """The block (``block``² pixels of one level) with the lowest tissue SSIM, among those
    mostly tissue: where the eye should look first. ``blocks``: (rows, cols, 6) sums."""
    n_tissue, n_all = blocks[..., 4], blocks[..., 1]
    measured = (n_tissue >= WORST_BLOCK_MIN_TISSUE * n_all) & (n_tissue > 0)
    if not measured.any():
        return None
    ssim = np.where(measured, blocks[..., 5] / np.maximum(n_tissue, 1), np.inf)
    row, col = np.unravel_index(int(np.argmin(ssim)), ssim.shape)
    return {"ssim_tissue": float(ssim[row, col]), "y": int(row * block),
            "x": int(col * block), "size": block, "blocks_measured": int(measured.sum())}


def _compare_block(ref: np.ndarray, array: zarr.Array, path: str, damage: DamageLog,
                   tissue: TissueMask, step: int, tile: int,
                   block_info: dict | None = None) -> np.ndarray:
    """Per ``tile``² tile of the block: [sq.err all, n all, ssim sum all, sq.err tissue,
    n tissue, ssim sum tissue] (per pixel, channels averaged), as (1, rows, 6 * cols).
    SSIM is computed tile by tile, which also bounds memory. The stored pixels are read
    chunk by chunk: a damaged chunk is logged in ``damage`` and left out of the sums."""
    assert block_info is not None
    (_, _), (y0, y1), (x0, x1) = block_info[0]["array-location"]
    stored, damaged = read_region(array, path, y0, y1, x0, x1, damage)
    _, h, w = ref.shape
    tissue_pixels = in_tissue(tissue, y0, x0, h, w, step) & ~damaged
    err = ((stored.astype(np.float32) - ref.astype(np.float32)) ** 2).mean(axis=0)
    out = np.zeros((1, -(-h // tile), -(-w // tile), 6), np.float64)
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            ssim = ssim_map(stored[:, ty:ty + tile, tx:tx + tile],
                            ref[:, ty:ty + tile, tx:tx + tile])
            e, t = err[ty:ty + tile, tx:tx + tile], tissue_pixels[ty:ty + tile, tx:tx + tile]
            ok = ~damaged[ty:ty + tile, tx:tx + tile]
            out[0, ty // tile, tx // tile] = [e[ok].sum(), ok.sum(), ssim[ok].sum(),
                                              e[t].sum(), t.sum(), ssim[t].sum()]
    return out.reshape(1, out.shape[1], -1)


def _psnr(sq_err_sum: float, n: float) -> float:
    mse = sq_err_sum / max(n, 1)
    return float("inf") if mse == 0 else float(10 * math.log10(255.0**2 / mse))


# ------------------------------------------------------------------------- helpers


def _write_png(path: str, rgb: np.ndarray) -> None:
    from PIL import Image

    try:
        Image.fromarray(rgb).save(path, format="PNG")
    except OSError as exc:
        raise ConvertError(f"--mask-out {path}: {_one_line(exc)}") from None


#: What an interrupted conversion and its --resume must agree on.
RESUME_SETTINGS = ("codec", "codec_config", "ngff", "glass", "chunk", "shard", "mask",
                   "source_sha256", "source_bytes", "jpeg_lattice", "level0")


def _changed_settings(old: Any, new: Any, name: str = "") -> list[str]:
    """``"name was X, now Y"`` for each (nested, dotted) setting that differs, so the
    user sees which option to give (a run started before dlwsi's rate control became the
    default resumes with ``--quality``, for example)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in _changed_settings(old.get(key), new.get(key),
                                                f"{name}.{key}" if name else str(key))]
    if old == new:
        return []
    return [f"{name} was {_short(old)}, now {_short(new)}"]


def _short(value: Any, limit: int = 40) -> str:
    text = "unset" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str)) if value is not None else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
