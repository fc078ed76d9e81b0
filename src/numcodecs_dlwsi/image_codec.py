"""The dlwsi image codec: uint8 RGB images to chunks and back. Knows nothing of Zarr.

Encoding: pad to a multiple of 64 -> analysis transform (ONNX, float) -> round the
hyper-latent -> integer hyper-synthesis gives each latent's scale level and mean ->
round the latent -> rANS with integer tables. Decoding mirrors it; everything up to the
decoded latents is integer and bit-exact, only the synthesis transform is float.
Images of the same size are processed as one batch.

A quality rung of a format-2 model multiplies the latent by a per-channel gain before
rounding (and its mean and scale with it, in exact fixed point): a gain below 1 quantizes
more coarsely, so one trained network serves the whole quality ladder. Every chunk names
its rung, so an encoder given a ``target_ssim`` codes each chunk at the lowest rung (up
to the configured quality) that reaches it; a reader accepts any rung of the pinned file.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import numpy as np

from . import runtime
from .bitstream import MAX_PIXELS, MAX_SIDE, ChunkHeader, Layout, pack, unpack
from .entropy_coding import LatentDecoder, encode_latents
from .hyper_synthesis import FRACTION_BITS, scale_levels
from .model_file import GAIN_BITS, PAD_MULTIPLE, ModelFile
from .model_store import ModelNotAvailableError, ModelRef, load, resolve

#: Pixels per ONNX call on a GPU: bounds memory while keeping batches large enough.
GPU_BATCH_PIXELS = 1 << 22
#: Pixels per ONNX call on the CPU: one 512² chunk. Larger batches gain nothing there and
#: cost memory (converting a 50,000² slide with 16 chunks per call peaked at 4.1 GiB,
#: with one at 1.0 GiB: benchmarks/scale.py --codec dlwsi).
CPU_BATCH_PIXELS = 1 << 18
FIXED_ONE = float(1 << FRACTION_BITS)
GAIN_ONE = float(1 << GAIN_BITS)
#: Optional stage timer, ``timer("analysis")`` -> context manager (used by benchmarks).
StageTimer = Callable[[str], AbstractContextManager]


def _untimed(stage: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def as_chw(image: object) -> tuple[np.ndarray, Layout]:
    """Validate an image and return it as (3, H, W) with the layout it came in."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"dlwsi encodes numpy arrays, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"dlwsi encodes uint8 images, got dtype {image.dtype}")
    if image.ndim != 3:
        raise ValueError(f"dlwsi encodes RGB images shaped (3, H, W) or (H, W, 3); "
                         f"got shape {image.shape}")
    if image.shape[0] == 3:
        chw, layout = image, Layout.CHW
    elif image.shape[2] == 3:
        chw, layout = image.transpose(2, 0, 1), Layout.HWC
    else:
        raise ValueError(f"dlwsi encodes 3-channel RGB; shape {image.shape} has no axis "
                         "of length 3 first or last")
    height, width = chw.shape[1:]
    if height == 0 or width == 0:
        raise ValueError(f"dlwsi cannot encode an empty image (shape {image.shape})")
    if height > MAX_SIDE or width > MAX_SIDE or height * width > MAX_PIXELS:
        raise ValueError(f"image of {height}x{width} pixels exceeds the per-chunk limit of "
                         f"{MAX_PIXELS} pixels (max side {MAX_SIDE}); use smaller chunks")
    return chw, layout


def padded_size(size: int) -> int:
    return -(-size // PAD_MULTIPLE) * PAD_MULTIPLE


def batch_pixels() -> int:
    """Pixels per ONNX call for the execution provider in use."""
    on_gpu = runtime.execution_providers()[0] != "CPUExecutionProvider"
    return GPU_BATCH_PIXELS if on_gpu else CPU_BATCH_PIXELS


def batches(items: list[int], pixels_each: int) -> list[list[int]]:
    step = max(1, batch_pixels() // pixels_each)
    return [items[i : i + step] for i in range(0, len(items), step)]


def entropy_parameters(model: ModelFile, z_symbols: np.ndarray, gain: np.ndarray | None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Integer path: z symbols (B, N, h, w) -> scale levels and means (fixed point)."""
    return rung_parameters(model, *hyper_parameters(model, z_symbols), gain)


def hyper_parameters(model: ModelFile, z_symbols: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact integer h_s: z symbols -> scales and means (fixed point), before any gain."""
    z_fixed = z_symbols * FIXED_ONE + model.z_medians_fixed[None, :, None, None]
    return model.hyper_synthesis(z_fixed)


def rung_parameters(model: ModelFile, scales: np.ndarray, means: np.ndarray,
                    gain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One rung's scale levels and means from :func:`hyper_parameters`' output.

    ``gain`` is the rung's (M,) fixed-point gain, or None (format 1): scales and means of
    the gained latent are ``floor((value * gain + 2**15) / 2**16)``, exact in float64.
    """
    if gain is not None:
        g = gain.astype(np.float64)[None, :, None, None]
        half = GAIN_ONE / 2
        scales = np.floor((scales * g + half) / GAIN_ONE)
        means = np.floor((means * g + half) / GAIN_ONE)
    return scale_levels(scales, model.scale_thresholds_fixed), means


def _gain_float(gain: np.ndarray | None) -> np.ndarray | float:
    """The rung's gain as float64, shaped to multiply (M, h, w) latents (exact: dyadic)."""
    return 1.0 if gain is None else (gain.astype(np.float64) / GAIN_ONE)[:, None, None]


def quantize_latents(y: np.ndarray, means: np.ndarray, gain: np.ndarray | None
                     ) -> np.ndarray:
    """Integer symbols of a latent (..., M, h, w) at one rung: what the chunk stores."""
    return np.rint(y * _gain_float(gain) - means / FIXED_ONE).astype(np.int64)


def dequantize_latents(y_symbols: np.ndarray, means: np.ndarray, gain: np.ndarray | None
                       ) -> np.ndarray:
    """y_hat, float32, the synthesis input: bit-exact wherever it is computed."""
    y_hat = y_symbols + means / FIXED_ONE  # exact in float64
    if gain is not None:
        y_hat = y_hat / _gain_float(gain)  # one IEEE division: deterministic
    return y_hat.astype(np.float32)


def rung_ref(ref: ModelRef, quality: int) -> ModelRef:
    """Another rung of the file ``ref`` pins (format-2 files hold the whole ladder)."""
    return ref if quality == ref.quality else replace(ref, quality=quality)


def ladder_below(ref: ModelRef) -> list[int]:
    """The rungs a rate-controlled encoder may choose: those of ``ref``'s file up to and
    including ``ref.quality``, ascending."""
    model = load(ref)
    if model.rungs.get(ref.quality) is None:
        raise ValueError(f"dlwsi target_ssim needs a model whose file holds a quality ladder; "
                         f"{ref.model} quality {ref.quality} is a single-rung file")
    return [q for q in sorted(model.rungs) if q <= ref.quality]


def _lowest_rungs_reaching(target_ssim: float, images: list[np.ndarray], y: np.ndarray,
                           scales: np.ndarray, means: np.ndarray, ref: ModelRef,
                           ladder: list[int]) -> list[int]:
    """For each image (3, H, W) of a batch, the lowest rung of ``ladder`` whose decoded
    version has SSIM >= target (the top rung where none does), from the batch's latents
    and h_s output.

    Quality rises with the rung (tests/test_quality_ladder.py), so each image is a binary
    search, about log2(rungs) trial decodes. The searches run in lockstep, and the images
    that try the same rung in a round share one synthesis call (large batches on a GPU).
    """
    from .quality_measure import ReferenceSSIM

    references = [ReferenceSSIM(image) for image in images]
    chosen = [ladder[-1]] * len(images)
    low, high = [0] * len(images), [len(ladder) - 1] * len(images)
    while True:
        trying: dict[int, list[int]] = defaultdict(list)
        for k in range(len(images)):
            if low[k] <= high[k]:
                trying[(low[k] + high[k]) // 2].append(k)
        if not trying:
            return chosen
        for position, members in trying.items():
            quality = ladder[position]
            decoded = _decoded_at_rung(ref, quality, y[members], scales[members],
                                       means[members], images[0].shape[1:])
            for k, pixels in zip(members, decoded, strict=True):
                if references[k](pixels) >= target_ssim:
                    chosen[k], high[k] = quality, position - 1
                else:
                    low[k] = position + 1


def _decoded_at_rung(ref: ModelRef, quality: int, y: np.ndarray, scales: np.ndarray,
                     means: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 images (B, 3, H, W) that latents ``y`` with h_s output ``scales``/``means``
    decode to at rung ``quality``: the trial decode of rate control."""
    model = load(ref)
    gain = model.rungs.get(quality)
    _, rung_means = rung_parameters(model, scales, means, gain)
    y_hat = dequantize_latents(quantize_latents(y, rung_means, gain), rung_means, gain)
    height, width = size
    x_hat = runtime.synthesis(rung_ref(ref, quality), y_hat)[:, :, :height, :width]
    return np.clip(np.rint(x_hat), 0, 255).astype(np.uint8)


def _refine_batch(ref: ModelRef, x: np.ndarray, z: np.ndarray,
                  latents: tuple[np.ndarray, ...], qualities: list[int],
                  images: list[np.ndarray], steps: int, target_ssim: float | None
                  ) -> tuple[np.ndarray, ...]:
    """(y, z_symbols, scales, means) of a batch after ``latent_refinement``, from the
    analysis' ``z`` and those four (``latents``). Under rate
    control an image keeps its analysis latents if the refined ones would fall below
    ``target_ssim`` at its rung, so refinement never breaks the promise the rung was
    chosen for."""
    from .latent_refinement import refine_latents

    model = load(ref)
    y = latents[0]
    gains = [None if model.rungs.get(q) is None else model.rungs[q] / GAIN_ONE
             for q in qualities]
    size = images[0].shape[1:]
    y_new, z_new = refine_latents(ref, x, y, z, gains, size, steps)
    z_symbols = np.rint(z_new - model.z_medians_fixed[None, :, None, None] / FIXED_ONE)
    refined = (y_new, z_symbols, *hyper_parameters(model, z_symbols))
    if target_ssim is None:
        return refined
    from .quality_measure import ReferenceSSIM

    for k, quality in enumerate(qualities):
        one = slice(k, k + 1)
        decoded = _decoded_at_rung(ref, quality, y_new[one], refined[2][one], refined[3][one],
                                   size)[0]
        if ReferenceSSIM(images[k])(decoded) < target_ssim:
            for new, old in zip(refined, latents, strict=True):
                new[k] = old[k]
    return refined


def encode_batch(images: Sequence[np.ndarray], ref: ModelRef,
                 timer: StageTimer = _untimed, target_ssim: float | None = None,
                 refine: int = 0) -> list[bytes]:
    """Encode uint8 RGB images, (3, H, W) or (H, W, 3) each, with one pinned model.

    With ``target_ssim``, each image is coded at the lowest rung of the pinned file, up
    to ``ref.quality``, whose decoded image reaches that SSIM (see
    :func:`quality_measure.tissue_ssim`); the rung is recorded in the chunk's header.
    With ``refine`` > 0, the latents get that many steps of :mod:`latent_refinement`
    (needs PyTorch; the chunks decode like any other).
    """
    with timer("prepare"):
        prepared = [as_chw(image) for image in images]
        model = load(ref)
        ladder = ladder_below(ref) if target_ssim is not None else [ref.quality]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (chw, _) in enumerate(prepared):
        by_size[chw.shape[1:]].append(i)
    chunks: list[bytes] = [b""] * len(prepared)
    medians = model.z_medians_fixed / FIXED_ONE
    for (height, width), members in by_size.items():
        ph, pw = padded_size(height), padded_size(width)
        for batch in batches(members, ph * pw):
            with timer("prepare"):
                x = np.stack([np.pad(prepared[i][0], ((0, 0), (0, ph - height),
                                                      (0, pw - width)), mode="edge")
                              for i in batch]).astype(np.float32) / 255.0
            with timer("analysis"):
                y, z = runtime.analysis(ref, x)
            with timer("hyper_synthesis"):
                z_symbols = np.rint(z - medians[None, :, None, None])
                scales, means = hyper_parameters(model, z_symbols)
            qualities = [ref.quality] * len(batch)
            if len(ladder) > 1:
                with timer("rate_control"):
                    qualities = _lowest_rungs_reaching(
                        target_ssim, [prepared[i][0] for i in batch], y, scales, means, ref,
                        ladder)
            if refine:
                with timer("refine"):
                    y, z_symbols, scales, means = _refine_batch(
                        ref, x, z, (y, z_symbols, scales, means), qualities,
                        [prepared[i][0] for i in batch], refine, target_ssim)
            with timer("entropy_encode"):
                for k, i in enumerate(batch):
                    gain = model.rungs.get(qualities[k])
                    levels, rung_means = rung_parameters(model, scales[k : k + 1],
                                                         means[k : k + 1], gain)
                    y_symbols = quantize_latents(y[k], rung_means[0], gain)
                    payload = encode_latents(z_symbols[k].astype(np.int64), model.z_tables,
                                             y_symbols, levels[0], model.y_tables)
                    header = ChunkHeader(quality=qualities[k], model_id=ref.model,
                                         model_hash_prefix=ref.hash_prefix, height=height,
                                         width=width, layout=prepared[i][1],
                                         version=model.bitstream_version)
                    chunks[i] = pack(header, payload)
    return chunks


@dataclass
class DecodedLatents:
    """What the entropy decoder recovers from a chunk: bit-exact on every machine."""

    header: ChunkHeader
    ref: ModelRef
    z_symbols: np.ndarray
    y_hat: np.ndarray | None = None
    _decoder: LatentDecoder | None = None


def _check_pinned(header: ChunkHeader, ref: ModelRef) -> ModelRef:
    """The rung ``header`` names, which must be in the file ``ref`` pins: the configured
    rung, or another of a ladder file (a rate-controlled encoder chose it)."""
    same_file = (header.model_id == ref.model and header.model_hash_prefix == ref.hash_prefix
                 and (header.quality == ref.quality
                      or load(ref).rungs.get(header.quality) is not None))
    if not same_file:
        raise ModelNotAvailableError(
            f"dlwsi chunk was written by model {header.model_id!r} quality {header.quality} "
            f"(hash {header.model_hash_prefix.hex()}), but the codec is configured for "
            f"{ref.model!r} quality {ref.quality} (hash {ref.hash_prefix.hex()})")
    return rung_ref(ref, header.quality)


def ref_for_chunk(header: ChunkHeader) -> ModelRef:
    """The installed model that wrote a chunk, found from its header alone."""
    return resolve(header.model_id, header.quality, hash_prefix=header.model_hash_prefix)


def decode_latents(chunks: Sequence[bytes], ref: ModelRef | None = None,
                   timer: StageTimer = _untimed) -> list[DecodedLatents]:
    """Entropy-decode chunks up to y_hat, float32 (M, h, w), the synthesis input.

    ``ref`` (if given) is the model the caller expects, otherwise each chunk's header
    names it.
    """
    pending: list[DecodedLatents] = []
    found: dict[tuple, ModelRef] = {}  # one manifest look-up per model, not per chunk
    with timer("entropy_decode_z"):
        for chunk in chunks:
            header, payload = unpack(chunk)
            chunk_ref = ref
            if chunk_ref is None:
                key = (header.model_id, header.quality, header.model_hash_prefix)
                if key not in found:
                    found[key] = ref_for_chunk(header)
                chunk_ref = found[key]
            chunk_ref = _check_pinned(header, chunk_ref)
            model = load(chunk_ref)
            if header.version != model.bitstream_version:
                raise ValueError(
                    f"dlwsi chunk: version {header.version} cannot come from model "
                    f"{chunk_ref.model!r}, whose chunks are version {model.bitstream_version}")
            hz, wz = padded_size(header.height) // 64, padded_size(header.width) // 64
            decoder = LatentDecoder(payload)
            z = decoder.decode_z((model.hyper_channels, hz, wz), model.z_tables)
            pending.append(DecodedLatents(header, chunk_ref, z, _decoder=decoder))
    groups: dict[tuple, list[DecodedLatents]] = defaultdict(list)
    for item in pending:
        groups[(item.ref, item.z_symbols.shape)].append(item)
    for (chunk_ref, _), members in groups.items():
        model = load(chunk_ref)
        with timer("hyper_synthesis"):
            z_batch = np.stack([item.z_symbols for item in members]).astype(np.float64)
            gain = model.rungs.get(chunk_ref.quality)
            levels, means = entropy_parameters(model, z_batch, gain)
        with timer("entropy_decode_y"):
            for k, item in enumerate(members):
                y_symbols = item._decoder.decode_y(levels[k], model.y_tables)
                item.y_hat = dequantize_latents(y_symbols, means[k], gain)
                item._decoder = None
    return pending


def decode_batch(chunks: Sequence[bytes], ref: ModelRef | None = None,
                 timer: StageTimer = _untimed) -> list[np.ndarray]:
    """Decode chunks to uint8 images in the shape and layout they were encoded from."""
    latents = decode_latents(chunks, ref, timer)
    images: list[np.ndarray] = [np.empty(0)] * len(latents)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, item in enumerate(latents):
        groups[(item.ref, item.y_hat.shape)].append(i)
    for (chunk_ref, shape), members in groups.items():
        for batch in batches(members, shape[1] * shape[2] * 256):
            y_hat = np.stack([latents[i].y_hat for i in batch])
            with timer("synthesis"):
                x_hat = runtime.synthesis(chunk_ref, y_hat)
            with timer("finish"):
                pixels = np.clip(np.rint(x_hat), 0, 255).astype(np.uint8)
                for k, i in enumerate(batch):
                    header = latents[i].header
                    chw = pixels[k, :, : header.height, : header.width]
                    image = chw if header.layout is Layout.CHW else chw.transpose(1, 2, 0)
                    images[i] = np.ascontiguousarray(image)
    return images


def encode(image: np.ndarray, quality: int | None = None, model: str | None = None) -> bytes:
    """Encode one image with an installed model (defaults: the default model and quality)."""
    return encode_batch([image], resolve(model, quality))[0]


def decode(chunk: bytes) -> np.ndarray:
    """Decode one chunk with the installed model its header names."""
    return decode_batch([chunk])[0]
