"""``--target-ssim``: a quality for each pyramid level, chosen from a sample of its chunks.

Each level gets the lowest quality whose tissue SSIM against the source, measured as
``verify`` measures it (``fidelity.py``), reaches the target on a sample of the level's
tissue chunks, coded as the conversion will code them (same codec from the registry,
edge chunks padded with the fill value as Zarr pads them). Quality rises with SSIM for
every codec here, so each search is a bisection: about log2(qualities) trial encodes.

Level 0's sample is exact: the chunks the converter writes (glass handled) against the
source pixels. A lower level's chunk covers 4^k times the level-0 area, so its sample is
read through OpenSlide's own pyramid (``slide.read_downsampled``) and coded as read: the
same content at that scale, not the converter's exact pixels. Lower levels hold detail
denser per pixel than level 0 and need a higher rung for the same SSIM (on TCGA-CR-7395
at dlwsi rung 3: 0.957 at level 0, 0.895 at level 2).

Why one quality per slide and not one per chunk: on both Aperio slides, coding every
stored chunk at every dlwsi rung and choosing per chunk showed that a single rung per
slide is already on the best curve; the best per-chunk choice (equal slope) was 1-3%
worse, and the lowest rung reaching a per-chunk SSIM floor 9-13% worse, at equal
level-0 tissue SSIM (docs/benchmarks.md, "Choosing the quality"). The per-chunk floor
stays available for dlwsi as ``--chunk-ssim``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import ConvertError
from .codecs import CodecChoice, image_codec, quality_range
from .fidelity import in_tissue, ssim_map
from .slide import WHITE, SlideInfo, read_downsampled, read_rgb
from .tissue import Glass, TissueMask, apply_glass

#: Level-0 chunks coded per trial quality: a small slide is measured whole, a large one
#: on tissue chunks spread evenly over it (32 chunks of 512² = 8.4 MP per trial).
SAMPLE_CHUNKS = 32


@dataclass(frozen=True)
class Calibration:
    """The outcome of a search: the quality chosen and what each tried quality gave."""

    target_ssim: float
    quality: int
    ssim: float  # sampled level-0 tissue SSIM at ``quality``
    reached: bool  # False: no quality reaches the target, ``quality`` is the highest
    chunks: int  # level-0 chunks in the sample
    tried: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"target_ssim": self.target_ssim, "quality": self.quality,
                "ssim": round(self.ssim, 5), "reached": self.reached, "chunks": self.chunks,
                "tried": {str(q): round(s, 5) for q, s in sorted(self.tried.items())}}


@dataclass(frozen=True)
class _SampleChunk:
    coded: np.ndarray  # (3, h, w) what the converter hands the codec (glass handled)
    source: np.ndarray  # (3, h, w) the slide as scanned: verify's reference
    tissue: np.ndarray  # (h, w) bool, the pixels verify's tissue numbers cover


def sample_positions(shape: tuple[int, int, int], tissue: TissueMask, chunk: int,
                     step: int, limit: int = SAMPLE_CHUNKS) -> list[tuple[int, int]]:
    """(y, x) of up to ``limit`` chunks of a (3, h, w) level ``step`` x below level 0 that
    hold tissue, spread evenly over the level's tissue chunks in raster order."""
    _, height, width = shape
    positions = [(y, x) for y in range(0, height, chunk) for x in range(0, width, chunk)
                 if tissue.has_tissue(y * step, x * step, min(chunk, height - y) * step,
                                      min(chunk, width - x) * step)]
    if len(positions) <= limit:
        return positions
    picks = np.linspace(0, len(positions) - 1, limit).round().astype(int)
    return [positions[i] for i in picks]


def _read_sample(info: SlideInfo, tissue: TissueMask, glass: Glass, chunk: int,
                 shape: tuple[int, int, int], step: int, position: tuple[int, int]
                 ) -> _SampleChunk:
    y, x = position
    h, w = min(chunk, shape[1] - y), min(chunk, shape[2] - x)
    pixels = in_tissue(tissue, y, x, h, w, step)
    if step > 1:  # this scale's content through the slide's pyramid (module docstring)
        source = read_downsampled(info, step, x, y, w, h)
        return _SampleChunk(source, source, pixels)
    source = read_rgb(info, x, y, w, h)
    coded = apply_glass(source, glass, tissue, y, x, chunk) if glass is not Glass.keep \
        else source
    return _SampleChunk(np.ascontiguousarray(coded), source, pixels)


def _round_trip(choice: CodecChoice, codec: object, chunk: np.ndarray, side: int
                ) -> np.ndarray:
    """``chunk`` coded and decoded as Zarr does it: an edge chunk padded to the full
    chunk shape with the fill value (white) first."""
    _, h, w = chunk.shape
    full = np.pad(chunk, ((0, 0), (0, side - h), (0, side - w)), constant_values=WHITE)
    image = np.ascontiguousarray(full.transpose(1, 2, 0)) if choice.channels_last else full
    decoded = np.asarray(codec.decode(codec.encode(image)))  # type: ignore[attr-defined]
    decoded = decoded.reshape(image.shape)
    decoded = decoded.transpose(2, 0, 1) if choice.channels_last else decoded
    return decoded[:, :h, :w]


def _sample_ssim(choice: CodecChoice, quality: int, sample: list[_SampleChunk], side: int,
                 pool: ThreadPoolExecutor) -> float:
    codec = image_codec(choice, quality)

    def sums(chunk: _SampleChunk) -> tuple[float, int]:
        ssim = ssim_map(_round_trip(choice, codec, chunk.coded, side), chunk.source)
        return float(ssim[chunk.tissue].sum()), int(chunk.tissue.sum())

    totals = list(pool.map(sums, sample))
    pixels = sum(n for _, n in totals)
    return sum(s for s, _ in totals) / pixels if pixels else 1.0


def choose_qualities(info: SlideInfo, tissue: TissueMask, glass: Glass, chunk: int,
                     shapes: list[tuple[int, int, int]], choice: CodecChoice,
                     target_ssim: float, workers: int | None = None,
                     log: Callable[[str], None] = print) -> list[Calibration]:
    """For each level (``shapes``, level 0 first), the lowest quality of ``choice`` whose
    sampled tissue SSIM reaches ``target_ssim`` (the highest quality, with ``reached``
    False, when none does)."""
    if not 0.0 < target_ssim < 1.0:
        raise ConvertError(f"--target-ssim must be between 0 and 1, got {target_ssim}")
    qualities = quality_range(choice)
    log(f"choosing the {choice.name} quality of each level for tissue SSIM {target_ssim}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [_choose(info, tissue, glass, chunk, shape, 2**k, choice, target_ssim,
                        qualities, pool, lambda m, k=k: log(f"  level {k}: {m}"))
                for k, shape in enumerate(shapes)]


def _choose(info: SlideInfo, tissue: TissueMask, glass: Glass, chunk: int,
            shape: tuple[int, int, int], step: int, choice: CodecChoice, target_ssim: float,
            qualities: tuple[int, int], pool: ThreadPoolExecutor,
            log: Callable[[str], None]) -> Calibration:
    low, high = qualities
    positions = sample_positions(shape, tissue, chunk, step)
    if not positions:  # nothing but glass: any quality stores the same (nothing)
        return Calibration(target_ssim, high, 1.0, True, 0)
    sample = list(pool.map(
        lambda p: _read_sample(info, tissue, glass, chunk, shape, step, p), positions))
    tried: dict[int, float] = {}
    chosen = None
    while low <= high:  # bisection for the lowest quality reaching the target
        middle = (low + high) // 2
        tried[middle] = _sample_ssim(choice, middle, sample, chunk, pool)
        if tried[middle] >= target_ssim:
            chosen, high = middle, middle - 1
        else:
            low = middle + 1
    steps = ", ".join(f"q{q} {v:.4f}" for q, v in tried.items())
    if chosen is None:
        top = max(tried)
        log(f"{steps}; none reaches {target_ssim}, using the highest, {top}")
        return Calibration(target_ssim, top, tried[top], False, len(sample), tried)
    log(f"{steps} on {len(sample)} chunks: quality {chosen}")
    return Calibration(target_ssim, chosen, tried[chosen], True, len(sample), tried)
