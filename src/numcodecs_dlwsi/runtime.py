"""onnxruntime sessions for the analysis and synthesis transforms.

The execution provider is a property of the machine, never of the data: it is chosen
here (CUDA when onnxruntime-gpu sees a GPU, else CPU) and can be forced with
``DLWSI_PROVIDER=cpu|cuda``; ``DLWSI_THREADS`` sets onnxruntime's intra-op threads.

One intra-op thread is the default: Zarr decodes (and the converter encodes) chunks in
parallel threads, one core each, which is faster than every call spreading over every
core (and one chunk alone decodes no slower on a 2-core CPU; docs/results/speed.md).
``DLWSI_THREADS=0`` gives onnxruntime's own default, all cores per call.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .environment import count
from .model_store import ModelRef, load, load_file

ENV_PROVIDER = "DLWSI_PROVIDER"
ENV_THREADS = "DLWSI_THREADS"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def execution_providers() -> tuple[str, ...]:
    """Providers to use, most preferred first, honouring ``$DLWSI_PROVIDER``."""
    choice = os.environ.get(ENV_PROVIDER, "auto").strip().lower() or "auto"
    available = ort.get_available_providers()
    if choice == "auto":
        preferred = [_PROVIDERS["cuda"]] if _PROVIDERS["cuda"] in available else []
        return (*preferred, _PROVIDERS["cpu"])
    if choice not in _PROVIDERS:
        raise ValueError(f"${ENV_PROVIDER}={choice!r}: use auto, cpu or cuda")
    if _PROVIDERS[choice] not in available:
        raise ValueError(f"${ENV_PROVIDER}={choice} but onnxruntime offers only "
                         f"{', '.join(available)} (CUDA needs onnxruntime-gpu and a GPU)")
    if choice == "cpu":
        return (_PROVIDERS["cpu"],)
    return (_PROVIDERS["cuda"], _PROVIDERS["cpu"])


#: onnxruntime intra-op threads when ``$DLWSI_THREADS`` is not set
DEFAULT_THREADS = 1


def intra_op_threads() -> int:
    return count(ENV_THREADS, DEFAULT_THREADS, "onnxruntime's default")


def session(ref: ModelRef, graph: str, providers: tuple[str, ...], threads: int
            ) -> ort.InferenceSession:
    """The onnxruntime session of one graph of a model file, shared by all its rungs."""
    load(ref)  # checks the file's hash and that it holds this quality
    return _file_session(ref.path, ref.sha256, graph, providers, threads)


@functools.lru_cache(maxsize=32)
def _file_session(path: Path, sha256: str, graph: str, providers: tuple[str, ...],
                  threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    model = load_file(path, sha256)
    onnx_bytes = model.analysis_onnx if graph == "analysis" else model.synthesis_onnx
    return ort.InferenceSession(onnx_bytes, options, providers=list(providers))


def analysis(ref: ModelRef, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: float32 (B, 3, H, W) in [0, 1] -> y (B, M, H/16, W/16), z (B, N, H/64, W/64)."""
    graph = session(ref, "analysis", execution_providers(), intra_op_threads())
    y, z = graph.run(["y", "z"], {"x": x})
    return y, z


def synthesis(ref: ModelRef, y_hat: np.ndarray) -> np.ndarray:
    """y_hat: float32 (B, M, h, w) -> x_hat float32 (B, 3, 16h, 16w) in [0, 255]."""
    graph = session(ref, "synthesis", execution_providers(), intra_op_threads())
    return graph.run(["x_hat"], {"y_hat": y_hat})[0]


def clear_caches() -> None:
    """Forget loaded model files and sessions (benchmarks time a cold start with it)."""
    load_file.cache_clear()
    _file_session.cache_clear()
