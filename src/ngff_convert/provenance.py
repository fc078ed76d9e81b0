"""What a store records about its source slide.

Stores leave the hospital, so by default a store keeps only what is needed to use the
image and trace it back to its source: OpenSlide's standard properties for vendor, pixel
size, objective power and level geometry, the source's size and SHA-256, and the
converter's own settings. File names, vendor properties (``aperio.Filename``,
``aperio.User``, ``aperio.Date``, scanner IDs, ``tiff.ImageDescription``...) and the
label/macro images are kept only when asked for (``--keep-properties``,
``--associated``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .slide import SlideInfo

#: OpenSlide's standard properties that describe the image, never who or when
KEPT_PROPERTY = re.compile(
    r"openslide\.(vendor|mpp-x|mpp-y|objective-power|quickhash-1|level-count"
    r"|level\[\d+\]\.(width|height|downsample|tile-width|tile-height)"
    r"|bounds-(x|y|width|height))")
#: the image's name in the NGFF metadata (and napari's layer names) unless asked for
#: the source's file name
ANONYMOUS_NAME = "image"
HASH_BLOCK = 1 << 22


def source_files(path: str) -> list[Path]:
    """The files a slide is made of: the file, plus MIRAX's companion folder's files."""
    p = Path(path)
    files = [p]
    companion = p.with_suffix("")
    if p.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted(f for f in companion.rglob("*") if f.is_file())
    return files


def source_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in source_files(path))


def source_sha256(path: str, log: Callable[[str], None] | None = None) -> str:
    """SHA-256 of the slide's bytes (its files in order), to trace a store to its source
    without naming it."""
    files = source_files(path)
    total = sum(f.stat().st_size for f in files)
    if log is not None and total > 1 << 30:
        log(f"hashing the source ({total / 2**30:.1f} GiB) to record its SHA-256")
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as stream:
            while block := stream.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def image_name(info: SlideInfo, keep_properties: bool) -> str:
    return Path(info.path).name if keep_properties else ANONYMOUS_NAME


def properties(info: SlideInfo, keep_properties: bool) -> dict[str, Any]:
    """The OpenSlide properties a store keeps: all of them only when asked for."""
    if keep_properties:
        return dict(info.properties)
    return {k: v for k, v in info.properties.items() if KEPT_PROPERTY.fullmatch(k)}
