"""The tissue mask and what the three glass modes do with it.

The mask follows the established low-resolution recipe (CLAM, TIAToolbox, HistoQC):
from a thumbnail at ``downsample`` x (a power of two, ~8-16 um per mask pixel), a pixel
is tissue when its HSV saturation is above a threshold (fixed, or Otsu's) or it is
darker than a brightness threshold (pale-but-dark tissue, ink); a median filter and
morphology (small objects removed, holes filled, a safety margin dilated) clean it up.
Transparent areas, which OpenSlide composites onto white, have zero saturation and
read as glass. Every pyramid level takes its decisions from this one level-0 mask.

Glass modes (the paper's three variants):

- ``keep``: pixels untouched.
- ``drop``: chunks without tissue become exactly the fill value (255); Zarr writes
  nothing for them. Glass next to tissue keeps its scanned off-white (~244 on CMU-1).
- ``fill``: as ``drop``, and glass inside kept chunks is blended to 255 with a soft
  (feathered) edge outside the dilated tissue, so dropped and kept glass are the same
  white and no chunk seams show. This is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .slide import WHITE, SlideInfo, read_downsampled


class Glass(str, Enum):
    keep = "keep"
    fill = "fill"
    drop = "drop"


@dataclass(frozen=True)
class MaskParams:
    """Thresholds of the tissue mask (saturation 0-1, brightness 0-255 grey level)."""

    saturation: float | None = 0.07  # None: Otsu's threshold on the thumbnail
    brightness: int = 220  # darker than this is tissue even when unsaturated
    min_area: int = 16  # mask pixels; smaller specks are dropped
    dilate: int = 2  # mask pixels of safety margin around tissue
    feather: float = 1.0  # mask pixels; width of the fill blend into white


@dataclass(frozen=True)
class TissueMask:
    """A boolean level-0 mask stored at ``downsample`` x, and its soft version."""

    mask: np.ndarray  # bool (h, w), True = tissue (dilated)
    soft: np.ndarray  # uint8 (h, w), the feathered blend weight x 255
    downsample: int
    saturation_threshold: float

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def has_tissue(self, y: int, x: int, h: int, w: int) -> bool:
        """Whether the level-0 box (y, x, h, w) touches tissue."""
        d = self.downsample
        return bool(self.mask[y // d: math.ceil((y + h) / d),
                              x // d: math.ceil((x + w) / d)].any())

    def weight(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Blend weight (h, w) of the level-0 box (y, x, h, w): bilinear samples of the
        soft mask at pixel centres."""
        cy = (np.arange(y, y + h) + 0.5) / self.downsample - 0.5
        cx = (np.arange(x, x + w) + 0.5) / self.downsample - 0.5
        (y0, y1), (x0, x1) = _span(cy, self.soft.shape[0]), _span(cx, self.soft.shape[1])
        crop = self.soft[y0:y1, x0:x1].astype(np.float32) / 255
        wy = _interp_matrix(cy - y0, y1 - y0)
        wx = _interp_matrix(cx - x0, x1 - x0)
        return (wy @ crop @ wx.T).astype(np.float32)


def mask_downsample(info: SlideInfo, max_pixels: int = 16_000_000) -> int:
    """The power of two >= 16 whose thumbnail has at most ``max_pixels`` pixels."""
    d = 16
    while math.ceil(info.width / d) * math.ceil(info.height / d) > max_pixels:
        d *= 2
    return d


def thumbnail(info: SlideInfo, downsample: int) -> np.ndarray:
    """The slide at ``downsample`` x as uint8 (3, h, w), read in bounded tiles."""
    h, w = math.ceil(info.height / downsample), math.ceil(info.width / downsample)
    out = np.empty((3, h, w), np.uint8)
    tile = 256
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            th, tw = min(tile, h - ty), min(tile, w - tx)
            out[:, ty:ty + th, tx:tx + tw] = read_downsampled(info, downsample, tx, ty, tw, th)
    return out


def tissue_mask(thumb: np.ndarray, downsample: int,
                params: MaskParams | None = None) -> TissueMask:
    """Tissue mask of a (3, h, w) uint8 thumbnail taken at ``downsample`` x."""
    from scipy import ndimage
    from skimage import filters, morphology

    params = params or MaskParams()
    saturation = ndimage.median_filter(hsv_saturation(thumb), size=3)
    grey = ndimage.median_filter(_grey(thumb), size=3)
    if params.saturation is None:
        threshold = float(filters.threshold_otsu(saturation)) if np.ptp(saturation) else 1.0
    else:
        threshold = float(params.saturation)
    mask = (saturation > threshold) | (grey < params.brightness)
    if params.min_area > 1:
        mask = morphology.remove_small_objects(mask, max_size=params.min_area - 1)
        # fill small holes only: background that does not reach the border, unlike
        # skimage's remove_small_holes, which also fills a small all-glass slide
        holes = ndimage.binary_fill_holes(mask) & ~mask
        large = morphology.remove_small_objects(holes, max_size=params.min_area * 16)
        mask = mask | (holes & ~large)
    if params.dilate > 0:
        mask = ndimage.binary_dilation(mask, structure=morphology.disk(params.dilate))
    soft = mask.astype(np.float32)
    if params.feather > 0:
        # blend only outward: tissue (and its margin) keeps weight 1
        soft = np.maximum(soft, ndimage.gaussian_filter(soft, params.feather))
        soft = np.clip(soft * 1.5, 0.0, 1.0) * (soft > 0.02)
    return TissueMask(mask=mask, soft=np.rint(soft * 255).astype(np.uint8), downsample=downsample,
                      saturation_threshold=threshold)


def hsv_saturation(thumb: np.ndarray, band: int = 256) -> np.ndarray:
    """HSV saturation (max - min) / max of a (3, h, w) uint8 image as float32 (h, w).

    The same values as ``skimage.color.rgb2hsv(...)[..., 1]``, computed in row bands so a
    large thumbnail never has float64 copies of all three channels (that made the mask
    step the peak of a whole conversion's memory).
    """
    _, h, w = thumb.shape
    out = np.zeros((h, w), np.float32)  # black pixels keep saturation 0, as in skimage
    for y in range(0, h, band):
        rows = thumb[:, y:y + band]
        high = rows.max(axis=0).astype(np.float32)
        np.divide(high - rows.min(axis=0), high, out=out[y:y + band], where=high > 0)
    return out


def _grey(thumb: np.ndarray) -> np.ndarray:
    """Mean of the three channels as float32 (h, w)."""
    grey = thumb[0].astype(np.float32)
    grey += thumb[1]
    grey += thumb[2]
    grey /= 3
    return grey


def apply_glass(block: np.ndarray, mode: Glass, tissue: TissueMask, y: int, x: int,
                chunk: int) -> np.ndarray:
    """Apply a glass mode to a level-0 (3, h, w) block at (y, x), chunk by chunk.

    Chunk decisions use the chunk grid of ``chunk`` pixels (the block must be aligned to
    it). Lower levels are downsampled from the result, so a chunk there is all-white
    exactly when its whole level-0 footprint was dropped.
    """
    if mode is Glass.keep:
        return block
    _, h, w = block.shape
    out = block
    for cy in range(0, h, chunk):
        for cx in range(0, w, chunk):
            ch, cw = min(chunk, h - cy), min(chunk, w - cx)
            if not tissue.has_tissue(y + cy, x + cx, ch, cw):
                if out is block:
                    out = block.copy()
                out[:, cy:cy + ch, cx:cx + cw] = WHITE
    if mode is Glass.drop:
        return out
    weight = tissue.weight(y, x, h, w)
    if weight.min() >= 0.999:
        return out
    blended = out.astype(np.float32) * weight + WHITE * (1.0 - weight)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def preview(thumb: np.ndarray, tissue: TissueMask, chunk: int, mode: Glass) -> np.ndarray:
    """An RGB (h, w, 3) picture for ``--mask-out``: glass tinted blue, level-0 chunks
    that will be stored outlined in green (all of them for ``keep``)."""
    rgb = thumb.transpose(1, 2, 0).astype(np.float32)
    glass = ~tissue.mask
    rgb[glass] = rgb[glass] * 0.6 + np.array([40, 90, 255], np.float32) * 0.4
    step = chunk / tissue.downsample
    h, w = tissue.mask.shape
    for cy in range(math.ceil(h / step)):
        for cx in range(math.ceil(w / step)):
            y0, x0 = int(cy * step), int(cx * step)
            y1, x1 = min(h, int((cy + 1) * step)), min(w, int((cx + 1) * step))
            if mode is not Glass.keep and not tissue.mask[y0:y1, x0:x1].any():
                continue
            rgb[y0:y1, x0] = rgb[y0:y1, x1 - 1] = (0, 200, 0)
            rgb[y0, x0:x1] = rgb[y1 - 1, x0:x1] = (0, 200, 0)
    return rgb.clip(0, 255).astype(np.uint8)


def _span(coords: np.ndarray, n: int) -> tuple[int, int]:
    """The index range [lo, hi) of a length-``n`` axis that ``coords`` interpolate from."""
    lo = int(np.clip(np.floor(coords.min()), 0, n - 1))
    hi = int(np.clip(np.floor(coords.max()) + 2, lo + 1, n))
    return lo, hi


def _interp_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """Dense linear-interpolation weights (len(coords), n), clamped at the borders."""
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (c - i0).astype(np.float32)
    m = np.zeros((len(c), n), np.float32)
    rows = np.arange(len(c))
    np.add.at(m, (rows, i0), 1 - f)
    np.add.at(m, (rows, i1), f)
    return m
