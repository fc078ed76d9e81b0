"""``--target-ssim``: the slide's quality, chosen from a sample of its level-0 chunks.

The chosen quality is the lowest whose level-0 tissue SSIM against the source, measured
as ``verify`` measures it (``fidelity.py``), reaches the target on a sample of level-0
tissue chunks coded exactly as the conversion codes them (glass handled, edge chunks
padded with the fill value as Zarr pads them, the same codec from the registry). Every
level is then written at that quality. Quality rises with SSIM for every codec here, so
the search is a bisection: about log2(qualities) trial encodes of the sample.

With dlwsi's latent refinement (``--refine``), the bisection runs on plain trials (cheap),
then refined trials walk down from its answer while they still reach the target (a
refined rung codes better than a plain one, so the rung below may do), and up if the
refined answer itself misses (refinement trades quality for bytes at the lowest rungs).
The recorded SSIM is always that of what the store will hold.

Why one quality for the slide: on both Aperio slides, every stored chunk coded at every
dlwsi rung (``benchmarks/rung_choice.py``) showed one rung for the slide already on the
best curve; the best per-chunk choice (equal slope, even with verify's own mask) was
0.4-2.7% worse, and the lowest rung reaching a per-chunk SSIM floor 13-16% worse, at
equal level-0 tissue SSIM. A rung per pyramid level, each chosen for the target, was
tried too: lower levels hold denser detail and most reach no rung's 0.95, so they went
to the top rung and cost 5-7 BD-rate points at level 0's quality for +0.03 SSIM where
they are viewed zoomed out (docs/results/slides_rd_per_level.md). The per-chunk
floor stays available for dlwsi as ``--chunk-ssim``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import ConvertError
from .codecs import CodecChoice, image_codec, quality_range
from .fidelity import in_tissue, ssim_map
from .slide import WHITE, SlideInfo, read_rgb
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
    refine: int = 0  # dlwsi latent refinement steps of the store (and of tried_refined)
    tried_refined: dict[int, float] = field(default_factory=dict)
    #: stored bits per level-0 pixel of the sample at ``quality`` (None: not measured)
    bits_per_pixel: float | None = None

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "target_ssim": self.target_ssim, "quality": self.quality,
            "ssim": round(self.ssim, 5), "reached": self.reached, "chunks": self.chunks,
            "tried": {str(q): round(s, 5) for q, s in sorted(self.tried.items())}}
        if self.refine:
            d["refine"] = self.refine
            d["tried_refined"] = {str(q): round(s, 5)
                                  for q, s in sorted(self.tried_refined.items())}
        if self.bits_per_pixel is not None:
            d["bits_per_pixel"] = round(self.bits_per_pixel, 4)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Calibration:
        """The inverse of :meth:`as_dict` (a store's ``settings.quality_choice``)."""
        return cls(float(d["target_ssim"]), int(d["quality"]), float(d["ssim"]),
                   bool(d["reached"]), int(d["chunks"]),
                   {int(q): float(v) for q, v in dict(d.get("tried", {})).items()},
                   int(d.get("refine", 0)),
                   {int(q): float(v) for q, v in dict(d.get("tried_refined", {})).items()},
                   float(d["bits_per_pixel"]) if d.get("bits_per_pixel") is not None
                   else None)


@dataclass(frozen=True)
class _SampleChunk:
    coded: np.ndarray  # (3, h, w) what the converter hands the codec (glass handled)
    source: np.ndarray  # (3, h, w) the slide as scanned: verify's reference
    tissue: np.ndarray  # (h, w) bool, the pixels verify's tissue numbers cover


def sample_positions(info: SlideInfo, tissue: TissueMask, chunk: int,
                     limit: int = SAMPLE_CHUNKS) -> list[tuple[int, int]]:
    """(y, x) of up to ``limit`` level-0 chunks that hold tissue, spread evenly over the
    slide's tissue chunks in raster order (all of them when there are few)."""
    positions = [(y, x) for y in range(0, info.height, chunk)
                 for x in range(0, info.width, chunk)
                 if tissue.has_tissue(y, x, min(chunk, info.height - y),
                                      min(chunk, info.width - x))]
    if len(positions) <= limit:
        return positions
    picks = np.linspace(0, len(positions) - 1, limit).round().astype(int)
    return [positions[i] for i in picks]


def _read_sample(info: SlideInfo, tissue: TissueMask, glass: Glass, chunk: int,
                 position: tuple[int, int]) -> _SampleChunk:
    y, x = position
    h, w = min(chunk, info.height - y), min(chunk, info.width - x)
    source = read_rgb(info, x, y, w, h)
    coded = apply_glass(source, glass, tissue, y, x, chunk) if glass is not Glass.keep \
        else source
    return _SampleChunk(np.ascontiguousarray(coded), source, in_tissue(tissue, y, x, h, w))


def _round_trip(choice: CodecChoice, codec: object, chunk: np.ndarray, side: int,
                restore: object | None = None) -> tuple[np.ndarray, int]:
    """``chunk`` coded and decoded as Zarr does it: an edge chunk padded to the full
    chunk shape with the fill value (white) first, and the decoded chunk passed through
    ``restore`` (level 0's JPEG lattice filter, if any)."""
    _, h, w = chunk.shape
    full = np.pad(chunk, ((0, 0), (0, side - h), (0, side - w)), constant_values=WHITE)
    image = np.ascontiguousarray(full.transpose(1, 2, 0)) if choice.channels_last else full
    encoded = codec.encode(image)  # type: ignore[attr-defined]
    decoded = np.asarray(codec.decode(encoded)).reshape(image.shape)  # type: ignore[attr-defined]
    decoded = decoded.transpose(2, 0, 1) if choice.channels_last else decoded
    if restore is not None:
        decoded = np.asarray(restore.decode(np.ascontiguousarray(decoded)))  # type: ignore[attr-defined]
    return decoded[:, :h, :w], len(encoded)


class _TrialProgress:
    """A progress bar over the trial encodes (or nothing): a bisection's trial count is
    known up front, a refined walk's grows as it goes."""

    def __init__(self, enabled: bool, chunks: int, trials: int) -> None:
        self.chunks = chunks
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=chunks * trials, desc="choosing the quality",
                            unit="chunk", leave=False)

    def chunk_done(self) -> None:
        if self.bar is not None:
            if self.bar.n >= self.bar.total:
                self.bar.total += self.chunks
            self.bar.update()

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` printing above the bar instead of through it."""
        if self.bar is None:
            return log

        def above(message: str) -> None:
            with self.bar.external_write_mode():
                log(message)
        return above

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sample_ssim(choice: CodecChoice, quality: int, sample: list[_SampleChunk], side: int,
                 pool: ThreadPoolExecutor, restore: object | None = None,
                 refine: int = 0, progress: _TrialProgress | None = None
                 ) -> tuple[float, float]:
    """(tissue SSIM, stored bits per pixel) of the sample coded at ``quality``."""
    codec = image_codec(choice, quality, refine)

    def sums(chunk: _SampleChunk) -> tuple[float, int, int]:
        decoded, nbytes = _round_trip(choice, codec, chunk.coded, side, restore)
        ssim = ssim_map(decoded, chunk.source)
        if progress is not None:
            progress.chunk_done()
        return float(ssim[chunk.tissue].sum()), int(chunk.tissue.sum()), nbytes

    totals = list(pool.map(sums, sample))
    pixels = sum(n for _, n, _ in totals)
    area = sum(chunk.source.shape[1] * chunk.source.shape[2] for chunk in sample)
    bits = 8.0 * sum(b for _, _, b in totals) / area if area else 0.0
    return (sum(s for s, _, _ in totals) / pixels if pixels else 1.0), bits


def choose_quality(info: SlideInfo, tissue: TissueMask, glass: Glass, chunk: int,
                   choice: CodecChoice, target_ssim: float, workers: int | None = None,
                   log: Callable[[str], None] = print, restore: object | None = None,
                   refine: int = 0, progress: bool = False) -> Calibration:
    """The lowest quality of ``choice`` whose sampled level-0 tissue SSIM reaches
    ``target_ssim`` (the highest quality, with ``reached`` False, when none does).
    ``restore``: level 0's JPEG lattice filter, applied to every decoded chunk as the
    store's reader will. ``refine``: dlwsi's latent refinement steps the store is
    written with (see the module's docstring). ``progress``: a progress bar over the
    trial encodes."""
    if not 0.0 < target_ssim < 1.0:
        raise ConvertError(f"--target-ssim must be between 0 and 1, got {target_ssim}")
    lowest, highest = low, high = quality_range(choice)
    positions = sample_positions(info, tissue, chunk)
    if not positions:  # nothing but glass: any quality stores the same (nothing)
        return Calibration(target_ssim, high, 1.0, True, 0)
    tried: dict[int, float] = {}
    bits: dict[int, float] = {}
    chosen = None
    # one trial encode per core, as the conversion runs them: more would only add
    # onnxruntime arenas (6 concurrent dlwsi encodes peaked 1 GiB above the conversion)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        sample = list(pool.map(lambda p: _read_sample(info, tissue, glass, chunk, p),
                                positions))
        trials = (high - low + 1).bit_length()  # a bisection's trial encodes
        log(f"choosing the {choice.name} quality for level-0 tissue SSIM {target_ssim} on "
            f"{len(sample)} chunks (about {trials} trial encodes of each)")
        bar = _TrialProgress(progress, len(sample), trials + (2 if refine else 0))
        log = bar.log(log)
        try:
            while low <= high:  # bisection for the lowest quality reaching the target
                middle = (low + high) // 2
                tried[middle], bits[middle] = _sample_ssim(choice, middle, sample, chunk,
                                                           pool, restore, progress=bar)
                log(f"  quality {middle}: tissue SSIM {tried[middle]:.4f}")
                if tried[middle] >= target_ssim:
                    chosen, high = middle, middle - 1
                else:
                    low = middle + 1
            if refine:
                return _with_refinement(choice, target_ssim, sample, chunk, pool, restore,
                                        refine, tried,
                                        chosen if chosen is not None else max(tried),
                                        (lowest, highest), log, bar)
        finally:
            bar.close()
    if chosen is None:
        top = max(tried)
        log(f"no {choice.name} quality reaches tissue SSIM {target_ssim}; using the highest, "
            f"{top}")
        return Calibration(target_ssim, top, tried[top], False, len(sample), tried,
                           bits_per_pixel=bits[top])
    log(f"  chose quality {chosen}")
    return Calibration(target_ssim, chosen, tried[chosen], True, len(sample), tried,
                       bits_per_pixel=bits[chosen])


def _with_refinement(choice: CodecChoice, target_ssim: float, sample: list[_SampleChunk],
                     side: int, pool: ThreadPoolExecutor, restore: object | None,
                     refine: int, tried: dict[int, float], start: int,
                     qualities: tuple[int, int], log: Callable[[str], None],
                     progress: _TrialProgress | None = None) -> Calibration:
    """From the plain search's answer ``start``, the lowest quality (of ``qualities``, the
    codec's range) whose *refined* trial reaches the target: down while the one below
    does, up while the current one misses."""
    low, high = qualities
    refined: dict[int, float] = {}
    bits: dict[int, float] = {}

    def trial(quality: int) -> bool:
        refined[quality], bits[quality] = _sample_ssim(choice, quality, sample, side, pool,
                                                       restore, refine, progress)
        log(f"  quality {quality} with {refine} refinement steps: tissue SSIM "
            f"{refined[quality]:.4f}")
        return refined[quality] >= target_ssim

    quality = start
    if trial(quality):
        while quality > low and trial(quality - 1):
            quality -= 1
        reached = True
    else:
        while quality < high and not trial(quality + 1):
            quality += 1
        reached = quality < high or refined[quality] >= target_ssim
        quality = min(quality + 1, high) if reached else quality
    if not reached:
        log(f"no {choice.name} quality reaches tissue SSIM {target_ssim} refined; using the "
            f"highest, {quality}")
    else:
        log(f"  chose quality {quality} (refined)")
    return Calibration(target_ssim, quality, refined[quality], reached, len(sample), tried,
                       refine, refined, bits[quality])
