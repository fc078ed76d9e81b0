"""What ``ngff-convert`` may replace: only a store it wrote, holding nothing else.

``--overwrite`` deletes. Before it does, the target must prove to be the converter's own
output: a Zarr group whose attributes carry the converter's record (``ngff_convert``), and
every object under it a key of the image hierarchy the converter writes (metadata, level
chunks or shards, ``associated/`` images, zarr's ``*.partial`` temporary files). A folder
or prefix holding anything else, one that is or holds the input slide, and a bucket's root
are refused with one line, and nothing is touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from . import ConvertError

_META = r"(zarr\.json|\.zgroup|\.zattrs|\.zarray|\.zmetadata)"
# v3 default chunk keys (c/0/1/2) and v2 keys with either separator (0/1/2, 0.1.2)
_CHUNK = r"(c(/\d+)+|\d+([./]\d+)*)"
_IMAGE = rf"({_META}|\d+/({_META}|{_CHUNK}))"
# the folders of the image hierarchy: the group, levels, their chunk folders, associated/
_FOLDER = r"((associated/([^/]+/)?)?(\d+/(c/)?(\d+/)*)?)"
_OWN_KEY = re.compile(
    rf"({_IMAGE}|associated/{_META}|associated/[^/]+/{_IMAGE}"
    # zarr's LocalStore writes <key with its suffix replaced by .<uuid hex>.partial> first
    rf"|{_FOLDER}[^/]+\.[0-9a-f]{{32}}\.partial)"
)
#: how many foreign keys a refusal names
SHOWN = 3


def foreign_keys(keys: Iterable[str]) -> list[str]:
    """The keys (relative to the store's root) that are not part of a converted image."""
    return sorted(key for key in keys if not _OWN_KEY.fullmatch(key))


def local_keys(root: Path) -> list[str]:
    """Every file under ``root`` as a store key (``/``-separated, relative)."""
    keys = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            keys.append(Path(dirpath, name).relative_to(root).as_posix())
    return keys


def check_replaceable(url: str, state: dict | None, keys: Iterable[str],
                      local: Path | None, protected: Iterable[Path] = (),
                      bucket_root: bool = False) -> None:
    """Raise a one-line :class:`ConvertError` unless the store at ``url`` may be deleted:
    ``state`` is its ``ngff_convert`` record (None: not a converted image), ``keys`` all
    objects under it, ``protected`` files that must survive (the input slide)."""
    if bucket_root:
        raise ConvertError(f"{url}: refusing to replace a bucket's root; name a store "
                           "inside it (s3://bucket/slide.zarr)")
    if local is not None:
        if local.is_file() or local.is_symlink():
            raise ConvertError(f"{url}: is a file, not a store written by ngff-convert; "
                               "refusing to replace it")
        root = local.resolve()
        for path in protected:
            resolved = Path(path).resolve()
            if resolved == root or root in resolved.parents:
                raise ConvertError(f"{url}: holds the input {path}; refusing to replace it")
    if state is None:
        raise ConvertError(f"{url}: not a store written by ngff-convert (no ngff_convert "
                           "record in its attributes); refusing to replace it")
    foreign = foreign_keys(keys)
    if foreign:
        shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN} more"
                                              if len(foreign) > SHOWN else "")
        raise ConvertError(f"{url}: holds files ngff-convert did not write ({shown}); "
                           "refusing to replace it")
