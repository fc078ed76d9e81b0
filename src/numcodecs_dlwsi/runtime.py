"""onnxruntime sessions for the analysis and synthesis transforms.

The execution provider is a property of the machine, never of the data: it is chosen
here (CUDA when onnxruntime-gpu sees a GPU, else CPU) and can be forced with
``DLWSI_PROVIDER=cpu|cuda``; ``DLWSI_THREADS`` sets onnxruntime's intra-op threads.

One intra-op thread is the default: Zarr decodes (and the converter encodes) chunks in
parallel threads, one core each, which is faster than every call spreading over every
core (and one chunk alone decodes no slower on a 2-core CPU; docs/results/speed.md).
``DLWSI_THREADS=0`` gives onnxruntime's own default, all cores per call.

A model whose synthesis is int8 (``meta["synthesis"]``) runs it on the CPU provider. Its
int8 kernels accumulate exactly where the CPU multiplies bytes into 32-bit sums (x86 with
AVX-512 VNNI, AVX-VNNI or AMX; ARM64 with the dot-product instructions). Elsewhere x86
kernels add pairs of products in 16 bits, which can saturate, so onnxruntime is told to run
the same graph in float instead (``session.disable_quant_qdq``): slower than the int8
kernels, pixels within the +-1 allowed between devices (docs/results/decode_paths.md).
``DLWSI_INT8=int8|float`` overrides the choice.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .environment import count
from .model_store import ModelRef, load, load_file

ENV_PROVIDER = "DLWSI_PROVIDER"
ENV_THREADS = "DLWSI_THREADS"
ENV_INT8 = "DLWSI_INT8"
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


#: CPU flags (Linux ``/proc/cpuinfo`` names) of x86 int8 instructions that multiply bytes
#: into 32-bit sums without a saturating 16-bit step
_EXACT_INT8_X86 = ("avx512_vnni", "avx_vnni", "amx_int8")


def linux_cpu_flags() -> set[str]:
    """The CPU's flags as Linux names them in ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


@functools.lru_cache(maxsize=1)
def exact_int8_kernels() -> bool:
    """Whether onnxruntime's int8 convolutions accumulate exactly on this CPU (unknown: no)."""
    machine = platform.machine().lower()
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    if machine in ("arm64", "aarch64"):
        return bool(features.get("ASIMDDP"))
    if machine not in ("x86_64", "amd64"):
        return False
    return bool(features.get("AVX512VNNI")) or bool(linux_cpu_flags() & set(_EXACT_INT8_X86))


def int8_in_integers() -> bool:
    """Whether an int8 synthesis runs on int8 kernels here (else in float), by
    ``$DLWSI_INT8`` (auto, int8, float)."""
    choice = os.environ.get(ENV_INT8, "auto").strip().lower() or "auto"
    if choice not in ("auto", "int8", "float"):
        raise ValueError(f"${ENV_INT8}={choice!r}: use auto, int8 or float")
    return exact_int8_kernels() if choice == "auto" else choice == "int8"


def session(ref: ModelRef, graph: str, providers: tuple[str, ...], threads: int
            ) -> ort.InferenceSession:
    """The onnxruntime session of one graph of a model file, shared by all its rungs."""
    model = load(ref)  # checks the file's hash and that it holds this quality
    in_float = False
    if graph == "synthesis" and model.int8_synthesis:
        providers, in_float = (_PROVIDERS["cpu"],), not int8_in_integers()
    return _file_session(ref.path, ref.sha256, graph, providers, threads, in_float)


@functools.lru_cache(maxsize=32)
def _file_session(path: Path, sha256: str, graph: str, providers: tuple[str, ...],
                  threads: int, int8_in_float: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if int8_in_float:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
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
