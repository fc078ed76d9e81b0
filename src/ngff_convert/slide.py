"""Reading whole slides through OpenSlide (openslide-python + openslide-bin).

Pixels come back as uint8 (3, h, w): OpenSlide's RGBA is composited onto white, so
regions outside the scanned area (transparent in OpenSlide) read as glass.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from . import ConvertError, one_line

WHITE = 255


@dataclass(frozen=True)
class SlideInfo:
    """What the converter needs to know about a slide, picklable for dask workers."""

    path: str
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    vendor: str | None
    properties: dict[str, str] = field(repr=False)
    associated: tuple[str, ...] = ()


def open_slide(path: str | os.PathLike[str]) -> SlideInfo:
    """Open and check a slide; raise :class:`ConvertError` with a one-line reason."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file")
    if p.is_dir():
        raise ConvertError(f"{p}: is a directory, not a slide file")
    try:
        slide = _cached_open(str(p.resolve()))
    except openslide.OpenSlideUnsupportedFormatError:
        raise ConvertError(f"{p}: not a slide format OpenSlide can read") from None
    except openslide.OpenSlideError as exc:
        raise ConvertError(f"{p}: OpenSlide cannot read it: {one_line(exc)}") from None
    except OSError as exc:
        raise ConvertError(f"{p}: cannot open: {one_line(exc)}") from None
    # OpenSlide opens some TIFFs whose pixels it cannot decode (e.g. float samples):
    # read one pixel of the smallest level so such files fail here, not mid-conversion.
    try:
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    except openslide.OpenSlideError as exc:
        _cached_open.cache_clear()
        raise ConvertError(f"{p}: unsupported pixel format: {one_line(exc)}") from None
    props = dict(slide.properties)
    return SlideInfo(
        path=str(p.resolve()),
        width=slide.dimensions[0],
        height=slide.dimensions[1],
        level_dimensions=tuple(slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp_x=_float(props.get(openslide.PROPERTY_NAME_MPP_X)),
        mpp_y=_float(props.get(openslide.PROPERTY_NAME_MPP_Y)),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR),
        properties=props,
        associated=tuple(slide.associated_images),
    )


@functools.lru_cache(maxsize=8)
def _cached_open(path: str) -> openslide.OpenSlide:
    # One handle per process and slide: OpenSlide handles are thread-safe, and dask
    # workers (threads or processes) reopen by path instead of pickling the handle.
    return openslide.OpenSlide(path)


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) premultiplied-composited onto white -> (3, h, w) uint8."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    # OpenSlide returns un-premultiplied RGBA; composite onto white.
    out = (rgb * alpha + WHITE * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8).transpose(2, 0, 1))


def read_rgb(info: SlideInfo, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Level-0 region (x, y, w, h) as uint8 (3, h, w); outside the slide reads white."""
    out = np.full((3, h, w), WHITE, np.uint8)
    x1, y1 = min(x + w, info.width), min(y + h, info.height)
    if x1 <= x or y1 <= y:
        return out
    region = _read_region(info, (x, y), 0, (x1 - x, y1 - y))
    out[:, : y1 - y, : x1 - x] = rgba_to_rgb(np.asarray(region))
    return out


def read_downsampled(info: SlideInfo, downsample: int, x: int, y: int, w: int,
                     h: int) -> np.ndarray:
    """Region (x, y, w, h) in *downsampled* pixels at ``downsample`` as uint8 (3, h, w).

    Reads the best OpenSlide level and resizes the rest of the way (box filter), so
    the memory used is bounded by ``w*h`` times the leftover factor squared.
    """
    slide = _cached_open(info.path)
    level = slide.get_best_level_for_downsample(downsample)
    ds = info.level_downsamples[level]
    lw, lh = info.level_dimensions[level]
    # region at that level, clipped to the level
    lx0, ly0 = x * downsample / ds, y * downsample / ds
    lx1 = min((x + w) * downsample / ds, lw)
    ly1 = min((y + h) * downsample / ds, lh)
    out = np.full((3, h, w), WHITE, np.uint8)
    if lx1 <= lx0 or ly1 <= ly0:
        return out
    rw, rh = max(1, math.ceil(lx1 - lx0)), max(1, math.ceil(ly1 - ly0))
    region = _read_region(info, (round(x * downsample), round(y * downsample)), level,
                          (rw, rh))
    rgb = rgba_to_rgb(np.asarray(region))
    tw = min(w, max(1, round(rw * ds / downsample)))
    th = min(h, max(1, round(rh * ds / downsample)))
    if (rw, rh) != (tw, th):
        image = Image.fromarray(rgb.transpose(1, 2, 0)).resize((tw, th), Image.BOX)
        rgb = np.asarray(image).transpose(2, 0, 1)
    out[:, :th, :tw] = rgb
    return out


def _read_region(info: SlideInfo, location: tuple[int, int], level: int,
                 size: tuple[int, int]) -> Image.Image:
    """OpenSlide's read_region; a damaged or truncated file (a tile that does not decode,
    data past the end of the file) becomes a one-line :class:`ConvertError` naming the
    file and the region, never pixels made up from what could not be read."""
    try:
        return _cached_open(info.path).read_region(location, level, size)
    except openslide.OpenSlideError as exc:
        raise ConvertError(
            f"{Path(info.path).name}: cannot read the pixels at level {level}, "
            f"({location[0]}, {location[1]}) + {size[0]}x{size[1]}; the file is damaged "
            f"or truncated: {one_line(exc)}") from None


def associated_image(info: SlideInfo, name: str) -> np.ndarray:
    """An associated image (label, macro, thumbnail) as uint8 (3, h, w)."""
    image = _cached_open(info.path).associated_images[name]
    return rgba_to_rgb(np.asarray(image.convert("RGBA")))


def _float(value: str | None) -> float | None:
    try:
        f = float(value) if value is not None else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) and f > 0 else None
