"""The released model file: one ``.npz`` archive per model id and quality.

Arrays only (loaded with ``allow_pickle=False``): ONNX graphs as bytes, integer
hyper-synthesis layers, integer frequency tables, and a JSON description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .entropy_coding import FrequencyTable
from .hyper_synthesis import FRACTION_BITS, IntegerHyperSynthesis, IntegerLayer

MODEL_FILE_FORMAT = 1
#: Images are padded (edge-replicated) to a multiple of the total downsampling, 2**6.
PAD_MULTIPLE = 64
_LAYER_FIELDS = ("kind", "shift", "stride", "padding", "output_padding", "leaky_relu")


def _pack_tables(tables: list[tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        "lo": np.array([lo for lo, _ in tables], dtype=np.int64),
        "lengths": np.array([len(f) for _, f in tables], dtype=np.int64),
        "freqs": np.concatenate([np.asarray(f, dtype=np.int64) for _, f in tables]),
    }


def _unpack_tables(lo: np.ndarray, lengths: np.ndarray, freqs: np.ndarray
                   ) -> list[FrequencyTable]:
    if len(lo) != len(lengths) or int(lengths.sum()) != len(freqs):
        raise ValueError("model file: inconsistent frequency tables")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [FrequencyTable(int(lo[i]), freqs[bounds[i] : bounds[i + 1]])
            for i in range(len(lo))]


def write_model_file(path: Path, *, meta: dict, analysis_onnx: bytes, synthesis_onnx: bytes,
                     hyper_layers: list[dict], z_medians_fixed: np.ndarray,
                     z_tables: list[tuple[int, np.ndarray]], scale_thresholds_fixed: np.ndarray,
                     y_tables: list[tuple[int, np.ndarray]]) -> None:
    meta = dict(meta, hyper_layers=[{k: layer[k] for k in _LAYER_FIELDS}
                                    for layer in hyper_layers])
    arrays = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        "analysis_onnx": np.frombuffer(analysis_onnx, dtype=np.uint8),
        "synthesis_onnx": np.frombuffer(synthesis_onnx, dtype=np.uint8),
        "z_medians_fixed": z_medians_fixed,
        "scale_thresholds_fixed": scale_thresholds_fixed,
    }
    for i, layer in enumerate(hyper_layers):
        arrays[f"hs{i}_weight"] = layer["weight"]
        arrays[f"hs{i}_bias"] = layer["bias"]
    for prefix, tables in (("z", z_tables), ("y", y_tables)):
        arrays.update({f"{prefix}_{k}": v for k, v in _pack_tables(tables).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)


@dataclass(frozen=True)
class ModelFile:
    meta: dict
    analysis_onnx: bytes
    synthesis_onnx: bytes
    hyper_synthesis: IntegerHyperSynthesis
    z_medians_fixed: np.ndarray
    z_tables: list[FrequencyTable]
    scale_thresholds_fixed: np.ndarray
    y_tables: list[FrequencyTable]

    @property
    def latent_channels(self) -> int:
        return int(self.meta["M"])

    @property
    def hyper_channels(self) -> int:
        return int(self.meta["N"])


def read_model_file(path: Path) -> ModelFile:
    """Load and validate a model file (raises ValueError if it is not a usable one)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        meta = json.loads(arrays["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a dlwsi model file: {exc}") from None
    if meta.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(f"{path}: model file format {meta.get('format')} is not supported")
    if meta.get("fraction_bits") != FRACTION_BITS or meta.get("pad_multiple") != PAD_MULTIPLE:
        raise ValueError(f"{path}: fixed-point format differs from this decoder's")
    layers = tuple(
        IntegerLayer(weight=arrays[f"hs{i}_weight"], bias=arrays[f"hs{i}_bias"], **spec)
        for i, spec in enumerate(meta["hyper_layers"])
    )
    thresholds = arrays["scale_thresholds_fixed"]
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError(f"{path}: scale thresholds are not strictly increasing")
    model = ModelFile(
        meta=meta,
        analysis_onnx=arrays["analysis_onnx"].tobytes(),
        synthesis_onnx=arrays["synthesis_onnx"].tobytes(),
        hyper_synthesis=IntegerHyperSynthesis(layers),
        z_medians_fixed=arrays["z_medians_fixed"].astype(np.int64),
        z_tables=_unpack_tables(arrays["z_lo"], arrays["z_lengths"], arrays["z_freqs"]),
        scale_thresholds_fixed=arrays["scale_thresholds_fixed"].astype(np.int64),
        y_tables=_unpack_tables(arrays["y_lo"], arrays["y_lengths"], arrays["y_freqs"]),
    )
    if len(model.z_tables) != model.hyper_channels or len(model.z_medians_fixed) != len(
            model.z_tables):
        raise ValueError(f"{path}: hyper-latent tables do not match N={model.hyper_channels}")
    if len(model.y_tables) != len(model.scale_thresholds_fixed):
        raise ValueError(f"{path}: scale table and Gaussian tables differ in length")
    return model
