"""Encode/decode speed of dlwsi on 512x512 RGB chunks, side by side with JPEG, JPEG-XL, AVIF.

All codecs run on the same tiles in one process: N tissue-rich 512x512 crops, chosen
deterministically from the held-out validation images (``VALIDATION_FILES`` in
``numcodecs_dlwsi.train.data``; never pixels the model was trained on).

dlwsi is timed end to end through ``encode_batch`` / ``decode_batch`` (``--batch`` chunks
per call), and stage by stage through the same functions' stage timer: analysis
transform, integer hyper-synthesis, rANS encoding; rANS decoding of z, hyper-synthesis,
rANS decoding of y, synthesis transform. ``decode_latents`` (entropy decoding including
the hyper-synthesis) is also timed as a whole.

The ONNX execution provider follows ``$DLWSI_PROVIDER`` (auto|cpu|cuda) and
``$DLWSI_THREADS`` exactly as the codec does, so the same command measures CUDA on a GPU
machine. Baselines are libjpeg-turbo, libjxl and libavif through imagecodecs, one chunk per
call (``--baseline-threads`` threads each for JPEG-XL and AVIF; libjpeg-turbo is single
threaded).

Example::

    python benchmarks/speed.py --tiles 16 --repeat 3 --batch 8 --json speed.json
    DLWSI_PROVIDER=cuda python benchmarks/speed.py --batch 16
    python benchmarks/speed.py --tiles 4 --refine 100 --no-avif   # refinement's cost

``--refine STEPS`` adds a row encoded with latent refinement (PyTorch; CUDA when it sees
one), decoded by the same decoder as the plain rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from report import provenance, publish, table

try:
    import imagecodecs
except ImportError:  # pragma: no cover - the bench extra installs it
    sys.exit("benchmarks/speed.py needs imagecodecs: pip install 'numcodecs-dlwsi[bench]'")

from numcodecs_dlwsi import runtime
from numcodecs_dlwsi.bitstream import unpack
from numcodecs_dlwsi.blas_threads import DEFAULT_BLAS_THREADS, ENV_BLAS_THREADS
from numcodecs_dlwsi.image_codec import (
    decode_batch,
    decode_latents,
    encode_batch,
)
from numcodecs_dlwsi.model_store import (
    ModelNotAvailableError,
    ModelRef,
    default_model,
    default_quality,
    load,
    qualities,
    resolve,
)
from numcodecs_dlwsi.train.data import VALIDATION_FILES, default_data_root, read_image

TILE = 512
#: A pixel darker than this (Rec. 601 luma) counts as tissue rather than bright glass.
GLASS_LUMA = 220.0

ENCODE_STAGES = ("prepare", "analysis", "hyper_synthesis", "entropy_encode")
DECODE_STAGES = ("entropy_decode_z", "hyper_synthesis", "entropy_decode_y", "synthesis",
                 "finish")
STAGE_HELP = {
    "prepare": "pad, stack, uint8 -> float32",
    "analysis": "runtime.analysis (ONNX g_a + h_a)",
    "hyper_synthesis": "integer h_s + scale levels (entropy_parameters)",
    "entropy_encode": "rounding, encode_latents (rANS), pack",
    "entropy_decode_z": "unpack, LatentDecoder.decode_z",
    "entropy_decode_y": "LatentDecoder.decode_y, y_hat = y + mean",
    "synthesis": "runtime.synthesis (ONNX g_s)",
    "finish": "stack, round to uint8, crop",
}


# ------------------------------------------------------------------------------ tiles


def _offsets(length: int, size: int) -> list[int]:
    """Crop origins along one axis: about half-overlapping, the last flush with the edge."""
    if length < size:
        return []
    n = -(-(length - size) // (size // 2)) + 1
    if n == 1:
        return [0]
    return sorted({round(i * (length - size) / (n - 1)) for i in range(n)})


def _tissue_fraction(tile: np.ndarray) -> float:
    luma = tile[..., 0] * 0.299 + tile[..., 1] * 0.587 + tile[..., 2] * 0.114
    return float((luma < GLASS_LUMA).mean())


def _ranked_crops(image: np.ndarray, size: int
                  ) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """(y, x, tissue fraction) of mutually non-overlapping crops picked greedily most tissue
    first, then of the remaining (overlapping) crops, most tissue first."""
    crops = []
    for y in _offsets(image.shape[0], size):
        for x in _offsets(image.shape[1], size):
            tile = image[y : y + size, x : x + size]
            crops.append((y, x, _tissue_fraction(tile), float(tile.mean())))
    crops.sort(key=lambda c: (-c[2], c[3], c[0], c[1]))
    first, rest = [], []
    for crop in crops:
        overlaps = any(abs(crop[0] - p[0]) < size and abs(crop[1] - p[1]) < size
                       for p in first)
        (rest if overlaps else first).append(crop)
    return [c[:3] for c in first], [c[:3] for c in rest]


def select_tiles(root: Path, count: int, size: int = TILE
                 ) -> tuple[list[np.ndarray], list[dict]]:
    """``count`` crops (3, size, size) from the validation images.

    Round-robin over the images in the order of ``VALIDATION_FILES``: first each image's
    non-overlapping crops (most tissue first), then, only if more are needed, crops that
    overlap those.
    """
    per_image = []
    for rel in VALIDATION_FILES:
        path = root / rel
        if path.suffix.lower() == ".svs" or not path.exists():
            continue
        image = read_image(path)
        if min(image.shape[:2]) < size:
            continue
        per_image.append((rel, image, _ranked_crops(image, size)))
    tiles, sources = [], []
    for phase in (0, 1):
        rounds = max((len(crops[phase]) for _, _, crops in per_image), default=0)
        for round_ in range(rounds):
            for rel, image, crops in per_image:
                if len(tiles) == count:
                    return tiles, sources
                if round_ < len(crops[phase]):
                    y, x, frac = crops[phase][round_]
                    tiles.append(np.ascontiguousarray(
                        image[y : y + size, x : x + size].transpose(2, 0, 1)))
                    sources.append({"file": rel, "y": y, "x": x,
                                    "tissue_fraction": round(frac, 3), "overlaps": bool(phase)})
    return tiles, sources


# --------------------------------------------------------------------------- metrics


class Stopwatch:
    """Accumulates wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def psnr(originals: list[np.ndarray], decoded: list[np.ndarray]) -> float:
    """PSNR of the whole tile set (pooled MSE), in dB."""
    se = sum(float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))
             for a, b in zip(originals, decoded, strict=True))
    mse = se / sum(a.size for a in originals)
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def bpp(chunks: list[bytes], pixels: int) -> float:
    return 8.0 * sum(len(c) for c in chunks) / pixels


def summarize(samples: list[float], stat: str) -> float:
    return min(samples) if stat == "best" else statistics.median(samples)


# ----------------------------------------------------------------------------- dlwsi


def encode_stages(tiles: list[np.ndarray], ref: ModelRef, batch: int, watch: Stopwatch
                  ) -> list[bytes]:
    """``image_codec.encode_batch`` (``batch`` tiles per call), timed stage by stage."""
    chunks: list[bytes] = []
    for start in range(0, len(tiles), batch):
        chunks += encode_batch(tiles[start : start + batch], ref, timer=watch)
    return chunks


def decode_stages(chunks: list[bytes], ref: ModelRef, batch: int, watch: Stopwatch
                  ) -> list[np.ndarray]:
    """``image_codec.decode_batch`` (``batch`` chunks per call), timed stage by stage."""
    images: list[np.ndarray] = []
    for start in range(0, len(chunks), batch):
        images += decode_batch(chunks[start : start + batch], ref, timer=watch)
    return images


def _in_batches(fn: Callable[[list, ModelRef], list], items: list, ref: ModelRef,
                batch: int) -> list:
    out: list = []
    for start in range(0, len(items), batch):
        out += fn(items[start : start + batch], ref)
    return out


def _timed(fn: Callable, *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def _time_round_trip(encode: Callable[[list, ModelRef], list], tiles: list[np.ndarray],
                     ref: ModelRef, batch: int, samples: dict[str, list[float]]
                     ) -> tuple[list[bytes], list[np.ndarray]]:
    """One timed encode and decode of every tile, appended to ``samples``."""
    seconds, chunks = _timed(_in_batches, encode, tiles, ref, batch)
    samples["encode"].append(seconds)
    seconds, images = _timed(_in_batches, decode_batch, chunks, ref, batch)
    samples["decode"].append(seconds)
    return chunks, images


def bench_dlwsi(tiles: list[np.ndarray], ref: ModelRef, batch: int, repeat: int, stat: str
                ) -> dict:
    pixels = sum(t.shape[1] * t.shape[2] for t in tiles)
    megapixels = pixels / 1e6
    # Cold start: reading + hashing the model file, building the ONNX sessions.
    runtime.clear_caches()
    cold_encode, warm_chunks = _timed(encode_batch, tiles[:batch], ref)
    cold_decode, _ = _timed(decode_batch, warm_chunks, ref)
    if len(tiles) % batch:  # warm the last, smaller batch shape too (cuDNN tunes per shape)
        decode_batch(encode_batch(tiles[-(len(tiles) % batch) :], ref), ref)

    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        chunks, images = _time_round_trip(encode_batch, tiles, ref, batch, samples)
        seconds, _ = _timed(_in_batches, decode_latents, chunks, ref, batch)
        samples["decode_latents"].append(seconds)

        watch = Stopwatch()
        stage_chunks = encode_stages(tiles, ref, batch, watch)
        for stage in ENCODE_STAGES:
            samples["encode." + stage].append(watch.seconds[stage])
        watch = Stopwatch()
        stage_images = decode_stages(chunks, ref, batch, watch)
        for stage in DECODE_STAGES:
            samples["decode." + stage].append(watch.seconds[stage])

    # The stage-by-stage run must reproduce the package's output exactly.
    consistent = stage_chunks == chunks and all(
        np.array_equal(a, b) for a, b in zip(stage_images, images, strict=True))
    seconds = {name: summarize(values, stat) for name, values in samples.items()}
    return {
        "codec": f"dlwsi q{ref.quality}",
        "model": ref.model,
        "quality": ref.quality,
        "sha256": ref.sha256,
        "batch": batch,
        "encode_mps": megapixels / seconds["encode"],
        "decode_mps": megapixels / seconds["decode"],
        "bpp": bpp(chunks, pixels),
        "psnr_db": psnr(tiles, images),
        "seconds": seconds,
        "samples": dict(samples),
        "cold_start_s": {"first_encode_batch": cold_encode, "first_decode_batch": cold_decode},
        "stages_match_end_to_end": bool(consistent),
        "decoder_kflop_per_pixel": decoder_kflop_per_pixel(ref),
    }


def bench_encoder_option(tiles: list[np.ndarray], ref: ModelRef, batch: int, repeat: int,
                         stat: str, target_ssim: float | None = None, refine: int = 0) -> dict:
    """dlwsi encoding with an encoder option, end to end, and decoding what it wrote:
    ``target_ssim`` (each tile's rung chosen up to ``ref.quality``) or ``refine`` (that many
    steps of latent refinement per chunk, on CUDA when PyTorch sees one)."""
    pixels = sum(t.shape[1] * t.shape[2] for t in tiles)

    def encode(items: list, r: ModelRef) -> list[bytes]:
        return encode_batch(items, r, target_ssim=target_ssim, refine=refine)

    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        chunks, images = _time_round_trip(encode, tiles, ref, batch, samples)
    seconds = {name: summarize(values, stat) for name, values in samples.items()}
    rungs = [unpack(chunk)[0].quality for chunk in chunks]
    if target_ssim is not None:
        label = f"dlwsi ssim{target_ssim:g}<=q{ref.quality}"
    else:
        label = f"dlwsi q{ref.quality} refine {refine}"
    row = {
        "codec": label,
        "model": ref.model, "quality_cap": ref.quality, "target_ssim": target_ssim,
        "refine": refine, "batch": batch,
        "encode_mps": pixels / 1e6 / seconds["encode"],
        "decode_mps": pixels / 1e6 / seconds["decode"],
        "bpp": bpp(chunks, pixels), "psnr_db": psnr(tiles, images),
        "rungs": {str(q): rungs.count(q) for q in sorted(set(rungs))},
        "seconds": seconds, "samples": dict(samples),
    }
    if refine:
        import torch  # refinement already needed it

        row["refine_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() \
            else f"cpu ({torch.get_num_threads()} torch threads)"
    return row


# ------------------------------------------------------------------------- FLOPs


def decoder_kflop_per_pixel(ref: ModelRef, side: int = TILE) -> dict[str, float] | None:
    """Multiply-adds x 2 per output pixel of the decoder's convolutions for a ``side``²
    chunk: the synthesis (from its ONNX graph, shapes inferred) and the integer
    hyper-synthesis (from its layers); None without the onnx package."""
    try:
        import onnx
    except ImportError:
        return None
    model_file = load(ref)
    graph_model = onnx.load_from_string(model_file.synthesis_onnx)
    (latent,) = graph_model.graph.input
    dims = latent.type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, dims[1].dim_value, side // 16, side // 16), strict=True):
        dim.Clear()
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(graph_model, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input,
                        *inferred.graph.output]}
    macs = macs_int8 = 0
    dequantized = {node.output[0] for node in inferred.graph.node
                   if node.op_type == "DequantizeLinear"}
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        kernel = next(a.ints for a in node.attribute if a.name == "kernel_shape")
        group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        source, result = shapes[node.input[0]], shapes[node.output[0]]
        taps = int(np.prod(kernel)) * source[1] * result[1] // group
        node_macs = taps * (int(np.prod(result[2:])) if node.op_type == "Conv"
                            else int(np.prod(source[2:])))
        macs += node_macs
        if node.input[1] in dequantized:  # int8 weights (QDQ): onnxruntime runs it in int8
            macs_int8 += node_macs
    hyper, size = 0, side // 64  # z is at 1/64 of the chunk, each deconv doubles it
    for layer in model_file.hyper_synthesis.layers:
        taps = int(np.prod(layer.weight.shape))
        hyper += taps * size * size
        size *= layer.stride if layer.kind == "deconv" else 1
    pixels = side * side
    return {"synthesis": 2 * macs / pixels / 1e3, "synthesis_int8": 2 * macs_int8 / pixels / 1e3,
            "hyper_synthesis": 2 * hyper / pixels / 1e3}


# ------------------------------------------------------------------- through zarr


REGION_TILES = 4  # a 2048x2048 region: 4x4 tiles, one shard of 4x4 chunks


def mosaic(tiles: list[np.ndarray], side: int = REGION_TILES) -> np.ndarray:
    """(3, side*512, side*512) of the tiles in raster order, reused cyclically."""
    rows = [np.concatenate([tiles[(r * side + c) % len(tiles)] for c in range(side)], axis=2)
            for r in range(side)]
    return np.ascontiguousarray(np.concatenate(rows, axis=1))


def zarr_codecs(refs: list[ModelRef], args: argparse.Namespace) -> dict[str, dict]:
    """name -> the array's codecs, for each dlwsi model and rung and each baseline at its
    benchmark settings, as ngff-convert writes them (the baselines behind a transpose, with
    crc32c)."""
    from ngff_convert.codecs import register_image_codecs

    register_image_codecs()
    transpose = [{"name": "transpose", "configuration": {"order": [1, 2, 0]}}]
    threads = args.baseline_threads
    several = len({ref.model for ref in refs}) > 1
    configs = {f"dlwsi q{ref.quality}" + (f" `{ref.model}`" if several else ""): {
        "filters": None, "compressors": None,
        "serializer": {"name": "dlwsi", "configuration": {"model": ref.model,
                                                          "quality": ref.quality}}}
        for ref in refs}
    image_codecs = {
        f"JPEG-XL d{args.jxl_distance:g}": ("imagecodecs_jpegxl", {
            "distance": args.jxl_distance, "effort": args.jxl_effort, "lossless": False,
            "numthreads": threads}),
        f"AVIF q{args.avif_quality}": ("imagecodecs_avif", {
            "level": args.avif_quality, "speed": args.avif_speed, "numthreads": threads}),
    }
    if args.no_avif:
        image_codecs = {k: v for k, v in image_codecs.items() if not k.startswith("AVIF")}
    for name, (codec_id, config) in image_codecs.items():
        configs[name] = {"filters": transpose, "compressors": [{"name": "crc32c"}],
                         "serializer": {"name": f"numcodecs.{codec_id}",
                                        "configuration": config}}
    return configs


def bench_zarr_region(tiles: list[np.ndarray], refs: list[ModelRef],
                      args: argparse.Namespace) -> list[dict]:
    """Read a whole 2048² region through zarr-python (its own chunk concurrency, one chunk
    per codec call) from a sharded in-memory array per codec, in interleaved rounds."""
    import zarr

    image = mosaic(tiles)
    arrays = {}
    for name, codecs in zarr_codecs(refs, args).items():
        array = zarr.create_array(zarr.storage.MemoryStore(), shape=image.shape,
                                  chunks=(3, TILE, TILE), shards=image.shape, dtype="uint8",
                                  fill_value=255, **codecs)
        array[:] = image
        arrays[name] = array
    samples: dict[str, list[float]] = defaultdict(list)
    decoded = {}
    for _ in range(args.repeat):
        for name, array in arrays.items():
            seconds, decoded[name] = _timed(lambda a: a[:], array)
            samples[name].append(seconds)
    megapixels = image.shape[1] * image.shape[2] / 1e6
    return [{"codec": name, "region": list(image.shape),
             "read_mps": megapixels / summarize(samples[name], args.stat),
             "psnr_db": psnr([image], [decoded[name]]), "samples": samples[name]}
            for name in arrays]


# ------------------------------------------------------------------------- baselines


def baseline_codecs(args: argparse.Namespace) -> dict[str, tuple[Callable, Callable, dict]]:
    """name -> (encode(hwc) -> bytes, decode(bytes) -> hwc, settings)."""
    codecs: dict[str, tuple[Callable, Callable, dict]] = {}
    threads = args.baseline_threads
    if imagecodecs.JPEG8.available:
        jpeg = {"level": args.jpeg_quality}
        if args.jpeg_subsampling:
            jpeg["subsampling"] = args.jpeg_subsampling
        codecs[f"JPEG q{args.jpeg_quality}"] = (
            lambda a: imagecodecs.jpeg_encode(a, **jpeg), imagecodecs.jpeg_decode,
            {"library": "libjpeg-turbo", **jpeg})
    if imagecodecs.JPEGXL.available:
        jxl = {"distance": args.jxl_distance, "effort": args.jxl_effort, "numthreads": threads}
        codecs[f"JPEG-XL d{args.jxl_distance:g}"] = (
            lambda a: imagecodecs.jpegxl_encode(a, **jxl),
            lambda b: imagecodecs.jpegxl_decode(b, numthreads=threads),
            {"library": "libjxl", **jxl})
    if imagecodecs.AVIF.available and not args.no_avif:
        avif = {"level": args.avif_quality, "speed": args.avif_speed, "numthreads": threads}
        codecs[f"AVIF q{args.avif_quality}"] = (
            lambda a: imagecodecs.avif_encode(a, **avif),
            lambda b: imagecodecs.avif_decode(b, numthreads=threads),
            {"library": "libavif", **avif})
    return codecs


def _encode_all(encode: Callable, tiles: list[np.ndarray]) -> list[bytes]:
    return [bytes(encode(t)) for t in tiles]


def _decode_all(decode: Callable, chunks: list[bytes]) -> list[np.ndarray]:
    return [decode(c) for c in chunks]


def bench_baseline(name: str, encode: Callable, decode: Callable, settings: dict,
                   tiles_hwc: list[np.ndarray], repeat: int, stat: str) -> dict:
    pixels = sum(t.shape[0] * t.shape[1] for t in tiles_hwc)
    decode(encode(tiles_hwc[0]))  # warm-up
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        seconds, chunks = _timed(_encode_all, encode, tiles_hwc)
        samples["encode"].append(seconds)
        seconds, images = _timed(_decode_all, decode, chunks)
        samples["decode"].append(seconds)
    for tile, image in zip(tiles_hwc, images, strict=True):
        if image.shape != tile.shape or image.dtype != np.uint8:
            raise RuntimeError(f"{name} decoded {image.shape} {image.dtype}, "
                               f"expected {tile.shape} uint8")
    seconds = {k: summarize(v, stat) for k, v in samples.items()}
    return {
        "codec": name,
        "settings": settings,
        "encode_mps": pixels / 1e6 / seconds["encode"],
        "decode_mps": pixels / 1e6 / seconds["decode"],
        "bpp": bpp(chunks, pixels),
        "psnr_db": psnr(tiles_hwc, images),
        "seconds": seconds,
        "samples": dict(samples),
    }


# ---------------------------------------------------------------------------- device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def device_info(ref: ModelRef) -> dict:
    import onnxruntime as ort

    providers, threads = runtime.execution_providers(), runtime.intra_op_threads()
    used = {graph: runtime.session(ref, graph, providers, threads).get_providers()
            for graph in ("analysis", "synthesis")}
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers_requested": list(providers),
        "providers_used": used,
        "int8_in_integers": runtime.int8_in_integers(),
        "DLWSI_PROVIDER": os.environ.get(runtime.ENV_PROVIDER, "auto"),
        "DLWSI_THREADS": os.environ.get(runtime.ENV_THREADS,
                                        f"{runtime.DEFAULT_THREADS} (default)"),
        "DLWSI_BLAS_THREADS": os.environ.get(ENV_BLAS_THREADS,
                                             f"{DEFAULT_BLAS_THREADS} (default)"),
        "imagecodecs": imagecodecs.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if any("CUDAExecutionProvider" in p for p in used.values()):
        info["gpu"] = gpu_names()
    return info


# ------------------------------------------------------------------------------- CLI


DEFAULT = " (default: %(default)s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="speed.py",
        description="Benchmark dlwsi encode/decode speed on 512x512 RGB chunks against "
                    "JPEG (libjpeg-turbo), JPEG-XL and AVIF, on the same held-out tiles.",
        epilog="Environment: DLWSI_PROVIDER=auto|cpu|cuda and DLWSI_THREADS=N choose the "
               "ONNX execution provider and its intra-op threads (as for the codec); "
               "DLWSI_WEIGHTS adds weights folders; DLWSI_DATA overrides ../shared/data. "
               "Speeds are megapixels per second (MP/s), bigger is faster; a ratio "
               "dlwsi/X > 1 means dlwsi is faster than X.",
    )
    parser.add_argument("--model", action="append", default=None,
                        help="dlwsi model id (default: the installed default model); repeat "
                             "it to time several models in the same run")
    parser.add_argument("--quality", nargs="+", default=None, metavar="Q",
                        help="dlwsi quality level(s), or 'all' for every installed one "
                             "(default: the model's default quality)")
    parser.add_argument("--tiles", type=int, default=16, metavar="N",
                        help="number of 512x512 tiles from the validation images" + DEFAULT)
    parser.add_argument("--repeat", type=int, default=3, metavar="R",
                        help="timed repetitions of every measurement" + DEFAULT)
    parser.add_argument("--stat", choices=("median", "best"), default="median",
                        help="which of the R timings to report" + DEFAULT)
    parser.add_argument("--batch", type=int, default=8, metavar="B",
                        help="chunks per dlwsi encode_batch/decode_batch call" + DEFAULT)
    parser.add_argument("--target-ssim", type=float, default=None, metavar="S",
                        help="also time rate-controlled dlwsi encoding (each tile's rung "
                             "chosen for SSIM S, up to the timed quality), as ngff-convert "
                             "--chunk-ssim S does")
    parser.add_argument("--refine", type=int, default=0, metavar="STEPS",
                        help="also time encoding with STEPS of latent refinement per chunk "
                             "(ngff-convert --refine; PyTorch, on CUDA when it sees one)")
    parser.add_argument("--refine-repeat", type=int, default=1, metavar="R",
                        help="timed runs of the refined encoding (it is slow on CPU)"
                             + DEFAULT)
    parser.add_argument("--single", action="store_true",
                        help="also time dlwsi with one chunk per call, to show what "
                             "batching buys")
    parser.add_argument("--jpeg-quality", type=int, default=90,
                        help="JPEG quality 1..100" + DEFAULT)
    parser.add_argument("--jpeg-subsampling", choices=("444", "422", "420"), default=None,
                        help="JPEG chroma subsampling (default: libjpeg-turbo's, 4:2:0)")
    parser.add_argument("--jxl-distance", type=float, default=1.0,
                        help="JPEG-XL Butteraugli distance, 0 = lossless, 1 = visually "
                             "lossless (default: %(default)s)")
    parser.add_argument("--jxl-effort", type=int, default=7,
                        help="JPEG-XL encoder effort 1..9 (default: %(default)s, as libjxl)")
    parser.add_argument("--avif-quality", type=int, default=80,
                        help="AVIF quality 0..100, imagecodecs' level (default: %(default)s)")
    parser.add_argument("--avif-speed", type=int, default=6,
                        help="AVIF encoder speed 0 (slowest) .. 10 (fastest)" + DEFAULT)
    parser.add_argument("--no-avif", action="store_true", help="skip AVIF")
    parser.add_argument("--baseline-threads", type=int, default=1, metavar="T",
                        help="threads per JPEG-XL/AVIF call (libjpeg-turbo is single "
                             "threaded; dlwsi uses DLWSI_THREADS) (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="data root holding he/... (default: ../shared/data beside the "
                             "repository, or $DLWSI_DATA)")
    parser.add_argument("--zarr-region", action="store_true",
                        help="also read a 2048x2048 region (a 4x4 mosaic of the tiles) "
                             "whole through zarr-python from a sharded array per codec")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write all settings, timings and results to PATH")
    args = parser.parse_args(argv)
    for name in ("tiles", "repeat", "batch", "baseline_threads", "refine_repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.refine < 0:
        parser.error("--refine must be 0 (off) or a number of steps")
    return args


def resolve_refs(model: str | None, requested: list[str] | None) -> list[ModelRef]:
    model = model or default_model()
    if requested is None:
        levels = [default_quality(model)]
    elif [q.lower() for q in requested] == ["all"]:
        levels = qualities(model)
    else:
        try:
            levels = [int(q) for q in requested]
        except ValueError:
            raise ModelNotAvailableError(f"--quality takes integers or 'all', not "
                                         f"{' '.join(requested)}") from None
    return [resolve(model, q) for q in levels]


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "inf"


def print_report(device: dict, sources: list[dict], dlwsi: list[dict], baselines: list[dict],
                 ratios: list[dict], args: argparse.Namespace,
                 controlled: list[dict] = ()) -> None:
    print("device")
    print(f"  cpu            {device['cpu']} ({device['logical_cpus']} logical CPUs, "
          f"{device['usable_cpus']} usable)")
    if "gpu" in device:
        print(f"  gpu            {'; '.join(device['gpu']) or 'nvidia-smi unavailable'}")
    used = device["providers_used"]
    print(f"  onnxruntime    {device['onnxruntime']}: analysis {used['analysis']}, "
          f"synthesis {used['synthesis']}")
    print(f"  environment    DLWSI_PROVIDER={device['DLWSI_PROVIDER']} "
          f"DLWSI_THREADS={device['DLWSI_THREADS']} "
          f"DLWSI_BLAS_THREADS={device['DLWSI_BLAS_THREADS']}")
    files = sorted({s["file"] for s in sources})
    overlapping = sum(s["overlaps"] for s in sources)
    overlap = f", {overlapping} overlapping others" if overlapping else ""
    print(f"tiles            {len(sources)} x {TILE}x{TILE} RGB from {len(files)} validation "
          f"image(s){overlap}; {args.stat} of {args.repeat} run(s); dlwsi batch {args.batch}")
    print()
    print(f"{'codec':<26}{'enc MP/s':>10}{'dec MP/s':>10}{'bpp':>8}{'PSNR dB':>9}"
          f"{'enc ms/tile':>13}{'dec ms/tile':>13}")
    n = len(sources)
    for row in [*dlwsi, *controlled, *baselines]:
        name = row["codec"] + (f" (b{row['batch']})" if "batch" in row else "")
        print(f"{name:<26}{row['encode_mps']:>10.2f}{row['decode_mps']:>10.2f}"
              f"{row['bpp']:>8.3f}{_fmt(row['psnr_db']):>9}"
              f"{1e3 * row['seconds']['encode'] / n:>13.1f}"
              f"{1e3 * row['seconds']['decode'] / n:>13.1f}")
    for row in dlwsi:
        s = row["seconds"]
        print()
        print(f"{row['codec']} (b{row['batch']}) stages, ms per tile "
              f"[{'match' if row['stages_match_end_to_end'] else 'MISMATCH'} with "
              f"end to end]")
        for phase, stages in (("encode", ENCODE_STAGES), ("decode", DECODE_STAGES)):
            total = sum(s[f"{phase}.{stage}"] for stage in stages)
            print(f"  {phase:<20}{1e3 * s[phase] / n:>9.1f}   end to end "
                  f"(stages sum to {1e3 * total / n:.1f})")
            for stage in stages:
                value = s[f"{phase}.{stage}"]
                print(f"    {stage:<18}{1e3 * value / n:>9.1f}  {100 * value / total:>5.1f}%  "
                      f"{STAGE_HELP[stage]}")
        print(f"  {'decode_latents':<20}{1e3 * s['decode_latents'] / n:>9.1f}   package "
              "function: entropy decoding incl. hyper-synthesis")
        flops = row.get("decoder_kflop_per_pixel")
        if flops:
            print(f"  decoder work        synthesis {flops['synthesis']:.1f} kFLOP per pixel, "
                  f"hyper-synthesis {flops['hyper_synthesis']:.2f} (integer)")
        cold = row["cold_start_s"]
        print(f"  cold start          first encode_batch {cold['first_encode_batch']:.2f} s, "
              f"first decode_batch {cold['first_decode_batch']:.2f} s (load, ONNX sessions)")
    for row in controlled:
        if row["target_ssim"] is not None:
            print(f"\n{row['codec']}: rungs chosen (quality: tiles) {row['rungs']}")
        if row["refine"]:
            print(f"\n{row['codec']}: refinement ran on {row['refine_device']}")
    if ratios:
        print()
        print("speed ratios dlwsi / baseline (>1: dlwsi faster)")
        for r in ratios:
            print(f"  {r['dlwsi']:<26} vs {r['baseline']:<16} encode {r['encode']:>7.3f}x"
                  f"   decode {r['decode']:>7.3f}x")


def title(results: dict) -> str:
    return f"Encode and decode speed, {TILE}x{TILE} RGB chunks"


def _per_tile_ms(row: dict, phase: str, tiles: int) -> str:
    return f"{1e3 * row['seconds'][phase] / tiles:.1f}"


def render(results: dict) -> str:
    """The page body: the run's conditions, every codec's speed and size, dlwsi's stages,
    the decoder's work per pixel and the region read through zarr."""
    device, settings = results["device"], results["settings"]
    tiles = len(results["tiles"])
    files = len({t["file"] for t in results["tiles"]})
    dlwsi = [*results["dlwsi"], *results.get("dlwsi_rate_control", [])]
    jxl = next((b for b in results["baselines"] if b["codec"].startswith("JPEG-XL")), None)
    environment = ", ".join(f"{key}={device[key]}" for key in
                            ("DLWSI_PROVIDER", "DLWSI_THREADS", "DLWSI_BLAS_THREADS")
                            if key in device)
    out = [
        f"{tiles} tiles of {TILE}x{TILE} RGB from {files} held-out H&E image(s), every codec "
        f"on the same tiles in one run, the {settings['stat']} of {settings['repeat']} "
        f"timed run(s); dlwsi codes {settings['batch']} chunk(s) per call (1: as Zarr hands "
        f"them over). {device['cpu']}, {device['usable_cpus']} usable CPUs; onnxruntime "
        f"{device['onnxruntime']} ({', '.join(device['providers_used']['synthesis'])}), "
        f"imagecodecs {device['imagecodecs']}; {environment}"
        + (("; int8 syntheses on int8 kernels" if device["int8_in_integers"]
            else "; int8 syntheses run in float (DLWSI_INT8, or int8 kernels that could "
                 "saturate)")
           if any((row.get("decoder_kflop_per_pixel") or {}).get("synthesis_int8")
                  for row in results["dlwsi"]) else "")
        + ". MP/s are megapixels per "
        "second of wall time; bpp counts every byte of each chunk.", "",
        table(["codec", "encode MP/s", "decode MP/s", "bpp", "PSNR dB", "decode vs JPEG-XL"],
              [[row["codec"] + (f" (`{row['model']}`)" if "model" in row else ""),
                f"{row['encode_mps']:.2f}", f"{row['decode_mps']:.2f}", f"{row['bpp']:.3f}",
                _fmt(row["psnr_db"]),
                f"{row['decode_mps'] / jxl['decode_mps']:.3f}x" if jxl else ""]
               for row in [*dlwsi, *results["baselines"]]])]
    several = len({row.get("model") for row in results["dlwsi"]}) > 1
    for row in results["dlwsi"]:
        s = row["seconds"]
        stages = [(phase, stage) for phase, names in (("encode", ENCODE_STAGES),
                                                       ("decode", DECODE_STAGES))
                  for stage in names if f"{phase}.{stage}" in s]
        if not stages:
            continue
        out += ["", f"## Where {row['codec']}"
                + (f" (`{row['model']}`)" if several else "") + "'s time goes", "",
                f"Milliseconds per tile, each stage timed on its own (end to end: encode "
                f"{_per_tile_ms(row, 'encode', tiles)}, decode "
                f"{_per_tile_ms(row, 'decode', tiles)}).", "",
                table(["stage", "ms per tile", "what it is"],
                      [[f"{phase}: {stage}", _per_tile_ms(row, f"{phase}.{stage}", tiles),
                        STAGE_HELP[stage]] for phase, stage in stages])]
        flops = row.get("decoder_kflop_per_pixel")
        if flops:
            int8 = flops.get("synthesis_int8", 0.0)
            out += ["", f"Decoder work: synthesis {flops['synthesis']:.1f} kFLOP per output "
                        "pixel" + (f" ({int8:.1f} of them in int8)" if int8 else "")
                        + f", integer hyper-synthesis {flops['hyper_synthesis']:.2f}."]
    for row in results.get("dlwsi_rate_control", []):
        if row.get("target_ssim") is not None:
            out += ["", f"{row['codec']}: rungs chosen (rung: tiles) {row['rungs']}."]
        if row.get("refine"):
            out += ["", f"{row['codec']}: refinement ran on {row['refine_device']}."]
    region = results.get("zarr_region") or []
    if region:
        reference = next((r for r in region if r["codec"].startswith("JPEG-XL")), region[0])
        out += ["", "## A 2048x2048 region read through zarr", "",
                "A 4x4 mosaic of the tiles stored as one sharded array per codec, read whole "
                "with `zarr.open(...)[:]` (Zarr's own chunk concurrency).", "",
                table(["codec", "read MP/s", "PSNR dB", "vs JPEG-XL"],
                      [[r["codec"], f"{r['read_mps']:.2f}", _fmt(r["psnr_db"]),
                        f"{r['read_mps'] / reference['read_mps']:.3f}x"] for r in region])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.data or default_data_root()
    if not (root / "he").is_dir():
        print(f"speed.py: no validation data at {root} (expected {root / 'he'}); put the "
              "shared data beside the repository, set $DLWSI_DATA or pass --data",
              file=sys.stderr)
        return 2
    try:
        refs = [ref for model in (args.model or [None])
                for ref in resolve_refs(model, args.quality)]
        runtime.execution_providers()
        runtime.int8_in_integers()
    except (ModelNotAvailableError, ValueError) as exc:
        print(f"speed.py: {exc}", file=sys.stderr)
        return 2

    tiles, sources = select_tiles(root, args.tiles)
    if not tiles:
        print(f"speed.py: no validation image of at least {TILE}x{TILE} under {root}",
              file=sys.stderr)
        return 2
    if len(tiles) < args.tiles:
        print(f"speed.py: only {len(tiles)} distinct tiles available, using those",
              file=sys.stderr)
    tiles_hwc = [np.ascontiguousarray(t.transpose(1, 2, 0)) for t in tiles]

    dlwsi = []
    for ref in refs:
        batches = [args.batch] + ([1] if args.single and args.batch != 1 else [])
        for batch in batches:
            print(f"timing dlwsi {ref.model} q{ref.quality} batch {batch} ...", file=sys.stderr)
            dlwsi.append(bench_dlwsi(tiles, ref, batch, args.repeat, args.stat))
    controlled = []
    if args.target_ssim is not None:
        for ref in refs:
            print(f"timing dlwsi {ref.model} target SSIM {args.target_ssim} up to "
                  f"q{ref.quality} ...", file=sys.stderr)
            controlled.append(bench_encoder_option(tiles, ref, args.batch, args.repeat,
                                                   args.stat, target_ssim=args.target_ssim))
    if args.refine:
        for ref in refs:
            print(f"timing dlwsi {ref.model} q{ref.quality} refine {args.refine} ...",
                  file=sys.stderr)
            controlled.append(bench_encoder_option(tiles, ref, args.batch, args.refine_repeat,
                                                   args.stat, refine=args.refine))
    device = device_info(refs[0])

    baselines = []
    for name, (encode, decode, settings) in baseline_codecs(args).items():
        print(f"timing {name} ...", file=sys.stderr)
        baselines.append(bench_baseline(name, encode, decode, settings, tiles_hwc,
                                        args.repeat, args.stat))

    ratios = [{"dlwsi": f"{d['codec']} (b{d['batch']})", "baseline": b["codec"],
               "encode": d["encode_mps"] / b["encode_mps"],
               "decode": d["decode_mps"] / b["decode_mps"]}
              for d in dlwsi + controlled for b in baselines]
    print_report(device, sources, dlwsi, baselines, ratios, args, controlled)
    region = []
    if args.zarr_region:
        print("timing a 2048x2048 region read through zarr ...", file=sys.stderr)
        region = bench_zarr_region(tiles, refs, args)
        print()
        print(f"{'2048x2048 region through zarr':<30}{'MP/s':>8}{'PSNR dB':>9}"
              f"{'vs first baseline':>19}")
        reference = next((row for row in region if not row["codec"].startswith("dlwsi")),
                         region[0])["read_mps"]
        for row in region:
            print(f"{row['codec']:<30}{row['read_mps']:>8.2f}{_fmt(row['psnr_db']):>9}"
                  f"{row['read_mps'] / reference:>18.3f}x")

    if args.json:
        results = {
            **provenance("speed", argv),
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()},
            "device": device,
            "tiles": sources,
            "megapixels": sum(t.shape[1] * t.shape[2] for t in tiles) / 1e6,
            "stage_help": STAGE_HELP,
            "dlwsi": dlwsi,
            "dlwsi_rate_control": controlled,
            "baselines": baselines,
            "ratios": ratios,
            "zarr_region": region,
        }
        print(f"\nwrote {publish(args.json, results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
