"""Decoding paths that must agree: what each costs, and how far apart their results are.

1. Scale levels: the entropy parameters pick each latent's Gaussian table by a look-up
   indexed by the clamped integer scale (``hyper_synthesis.scale_levels``); the binary
   search it replaced must give the same levels, which select the same symbols.
2. An int8 synthesis (``he-mshl-v3-int8``) on onnxruntime's int8 kernels and the same
   graph evaluated in float (``DLWSI_INT8=float``, what CPUs whose int8 kernels could
   saturate run): pixels may differ by at most 1.

Both on held-out 512² tiles coded at the model's default rung, one chunk per call as Zarr
hands them over, one onnxruntime thread.

    python benchmarks/decode_paths.py --json docs/results/decode_paths.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from numcodecs_dlwsi import image_codec, runtime
from numcodecs_dlwsi.hyper_synthesis import scale_levels
from numcodecs_dlwsi.model_store import ModelNotAvailableError, load, resolve
from numcodecs_dlwsi.train.data import default_data_root

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import finish, provenance, table  # noqa: E402
from speed import select_tiles  # noqa: E402  (the speed benchmark's held-out 512² tiles)


def median_ms(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def scale_level_paths(chunks: list[bytes], model: str, repeat: int) -> dict:
    """Look-up against binary search on every chunk's scales: equal, and ms per chunk."""
    ref = resolve(model, None)
    file = load(ref)
    thresholds = file.scale_thresholds_fixed
    # the hyper-synthesis's integer scales of each chunk (at the default rung, gain 1)
    scales = [image_codec.hyper_parameters(file, item.z_symbols[None].astype(np.float64))[0]
              for item in image_codec.decode_latents(chunks, ref)]
    table_ms = median_ms(lambda: [scale_levels(s, thresholds) for s in scales], repeat)
    search_ms = median_ms(lambda: [np.searchsorted(thresholds[:-1], s, side="left")
                                   for s in scales], repeat)
    equal = all(np.array_equal(scale_levels(s, thresholds),
                               np.searchsorted(thresholds[:-1], s, side="left"))
                for s in scales)
    n = len(scales)
    return {"model": model, "look_up_ms": table_ms / n, "binary_search_ms": search_ms / n,
            "identical": bool(equal), "values": int(sum(s.size for s in scales))}


def int8_paths(tiles: list[np.ndarray], model: str, repeat: int) -> dict:
    """The int8 synthesis on int8 kernels and in float: ms per chunk and pixel agreement."""
    ref = resolve(model, None)
    chunks = image_codec.encode_batch(tiles, ref)
    decoded, ms = {}, {}
    for mode in ("int8", "float"):
        os.environ[runtime.ENV_INT8] = mode
        decoded[mode] = np.stack([image_codec.decode(c) for c in chunks]).astype(int)
        ms[mode] = median_ms(lambda: [image_codec.decode(c) for c in chunks],
                             repeat) / len(chunks)
    del os.environ[runtime.ENV_INT8]
    difference = np.abs(decoded["int8"] - decoded["float"])
    return {"model": model, "quality": ref.quality, "int8_kernels_exact":
            runtime.exact_int8_kernels(), "decode_ms": ms,
            "pixels": int(difference.size), "pixels_differing": int((difference > 0).sum()),
            "max_difference": int(difference.max())}


def title(results: dict) -> str:
    return "Decoding paths that must agree"


def render(results: dict) -> str:
    levels, int8 = results["scale_levels"], results["int8_synthesis"]
    share = 100.0 * int8["pixels_differing"] / int8["pixels"]
    return "\n".join([
        f"{results['tiles']} held-out 512² tiles, coded at the default rung, decoded one "
        "chunk per call on one onnxruntime thread; median of "
        f"{results['settings']['repeat']} runs.", "",
        "## Scale levels: look-up against binary search", "",
        f"The Gaussian table of each of {levels['values']:,} latent values of "
        f"`{levels['model']}`, picked both ways.", "",
        table(["path", "ms per chunk", "levels"],
              [["look-up (the decoder's)", f"{levels['look_up_ms']:.2f}",
                "identical" if levels["identical"] else "DIFFERENT"],
               ["binary search", f"{levels['binary_search_ms']:.2f}", ""]]), "",
        f"## `{int8['model']}`: int8 kernels against the same graph in float", "",
        "int8 kernels " + ("sum exactly on this CPU" if int8["int8_kernels_exact"]
                           else "could saturate on this CPU (the float path is the default)")
        + ".", "",
        table(["synthesis", "decode ms per chunk", "pixels differing from the int8 kernels'",
               "largest difference"],
              [["int8 kernels (`DLWSI_INT8=int8`)", f"{int8['decode_ms']['int8']:.1f}", "", ""],
               ["float (`DLWSI_INT8=float`)", f"{int8['decode_ms']['float']:.1f}",
                f"{int8['pixels_differing']:,} of {int8['pixels']:,} ({share:.3f}%)",
                str(int8["max_difference"])]])])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="he-mshl-v3", help="model for the scale levels")
    p.add_argument("--int8-model", default="he-mshl-v3-int8")
    p.add_argument("--tiles", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    try:
        resolve(args.model, None), resolve(args.int8_model, None)
    except ModelNotAvailableError as exc:
        p.error(str(exc))
    tiles, _ = select_tiles(default_data_root(), args.tiles)
    if not tiles:
        p.error(f"no held-out tiles under {default_data_root()}")
    chunks = image_codec.encode_batch(tiles, resolve(args.model, None))
    results = {**provenance("decode_paths"),
               "settings": {k: str(v) for k, v in vars(args).items()},
               "tiles": len(tiles),
               "scale_levels": scale_level_paths(chunks, args.model, args.repeat),
               "int8_synthesis": int8_paths(tiles, args.int8_model, args.repeat)}
    finish(results, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
