"""What widening a transform costs: onnxruntime time of g_a and g_s per 512² chunk.

Speed does not depend on the weights, so each variant is built untrained, exported to ONNX
the way `dlwsi-train export` does (opset 17, float32) and run on the CPU provider with
the same session options as the codec. Widths are those of `LiteMeanScaleHyperprior`:
``first`` is g_s's 1/8-resolution stage, ``analysis`` g_a's hidden width.

    python benchmarks/transform_speed.py --json docs/results/transform_speed.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior
from numcodecs_dlwsi.runtime import intra_op_threads

#: (label, model arguments) for the variants timed; N=64, M=192, last=32 as in v2c.
VARIANTS = (
    ("v2c: N=64, last=32", {}),
    ("g_s first stage 128", {"first": 128}),
    ("g_a hidden 128", {"analysis": 128}),
    ("g_a hidden 96", {"analysis": 96}),
)


def _session(module: nn.Module, example: torch.Tensor) -> ort.InferenceSession:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), example, buffer, input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(buffer.getvalue(), options,
                                providers=["CPUExecutionProvider"])


def _median_ms(session: ort.InferenceSession, x: np.ndarray, repeat: int) -> float:
    session.run(None, {"x": x})  # warm-up: onnxruntime plans memory on the first call
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the timings here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for label, widths in VARIANTS:
        model = LiteMeanScaleHyperprior(N=64, M=192, last=32, hyper=96, **widths)
        side = args.chunk // 16
        image = rng.random((1, 3, args.chunk, args.chunk), dtype=np.float32)
        latent = rng.standard_normal((1, 192, side, side), dtype=np.float32)
        with torch.no_grad():
            g_a = _session(model.g_a, torch.from_numpy(image))
            g_s = _session(model.g_s, torch.from_numpy(latent))
        row = {"variant": label, "widths": widths,
               "g_a_ms": round(_median_ms(g_a, image, args.repeat), 1),
               "g_s_ms": round(_median_ms(g_s, latent, args.repeat), 1),
               "g_a_params": sum(p.numel() for p in model.g_a.parameters()),
               "g_s_params": sum(p.numel() for p in model.g_s.parameters())}
        rows.append(row)
        print(f"{label:24s} g_a {row['g_a_ms']:6.1f} ms   g_s {row['g_s_ms']:6.1f} ms "
              f"per {args.chunk}² chunk")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "transform cost per chunk, onnxruntime CPU, untrained weights",
            "chunk": args.chunk, "repeat": args.repeat, "stat": "median",
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "onnxruntime": ort.__version__},
            "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
