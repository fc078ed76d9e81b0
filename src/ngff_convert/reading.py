"""Opening a converted image: ``info``, ``check``, ``extract``."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from . import ConvertError, ngff, one_line
from .check import check_store
from .codecs import (
    describe_v3,
    register_image_codecs,
)
from .destination import work_sibling
from .options import Options
from .store import (
    PROGRESS_KEY,
    Output,
    check_range_support,
    open_output,
)
from .transcode import (
    StoredTiles,
    tile_codec,
)


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
        raise ConvertError(f"{target}: not a Zarr group: {one_line(exc)}") from None
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
    settings = state.get("settings", {})
    total_stored, total_objects = out.size()
    raw_total = sum(level["raw_bytes"] for level in levels)
    return {
        "store": out.url, "ngff": version, "zarr_format": group.metadata.zarr_format,
        "name": ms.get("name"), "unit": unit, "levels": levels,
        "stored_bytes": total_stored, "objects": total_objects, "raw_bytes": raw_total,
        "source_bytes": settings.get("source_bytes"), "glass": settings.get("glass"),
        "tissue": state.get("tissue"), "quality_choice": settings.get("quality_choice"),
        "jpeg_lattice": settings.get("jpeg_lattice_note"), "level0": settings.get("level0"),
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
    data = StoredTiles(out.store, array, path).chunk(row, column)
    if data is None:
        raise ConvertError(f"tile {row},{column} is not stored (glass)")
    config = array.metadata.codecs[0].to_dict()
    config = config.get("configuration", {}).get("codecs", [config])[0]
    try:
        return tile_codec(config["configuration"]["colorspace"]).jpeg(data)
    except ValueError as exc:
        raise ConvertError(f"tile {row},{column}: {one_line(exc)}") from None
