"""The released model file: one ``.npz`` archive per trained network.

Arrays only (loaded with ``allow_pickle=False``): ONNX graphs as bytes, integer
hyper-synthesis layers, integer frequency tables, and a JSON description. Format 1 holds
one quality; format 2 holds a quality ladder of latent gains over the same network, so a
ladder costs one network's bytes, not one per rung (docs/reference/bitstream.md §8.3, §10).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .entropy_coding import FrequencyTable
from .hyper_synthesis import FRACTION_BITS, IntegerHyperSynthesis, IntegerLayer

#: Written by the exporter; format 1 files (one quality, no gain) stay readable.
MODEL_FILE_FORMAT = 2
SUPPORTED_MODEL_FILE_FORMATS = (1, 2)
#: Rung gains are integers at 2**-GAIN_BITS ...
GAIN_BITS = 16
#: ... within these bounds (1/64 to 64), which keep every gained scale and mean an exact
#: float64 integer: |value| <= 2**26 (the activation limit) times a gain below 2**22.
GAIN_FIXED_MIN, GAIN_FIXED_MAX = 1 << (GAIN_BITS - 6), 1 << (GAIN_BITS + 6)
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
                     y_tables: list[tuple[int, np.ndarray]],
                     rung_gains_fixed: dict[int, np.ndarray]) -> None:
    """Write a format-2 file; ``rung_gains_fixed`` maps each quality to its (M,) gains."""
    meta = dict(meta, format=MODEL_FILE_FORMAT,
                hyper_layers=[{k: layer[k] for k in _LAYER_FIELDS} for layer in hyper_layers])
    qualities = sorted(rung_gains_fixed)
    arrays = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        "analysis_onnx": np.frombuffer(analysis_onnx, dtype=np.uint8),
        "synthesis_onnx": np.frombuffer(synthesis_onnx, dtype=np.uint8),
        "z_medians_fixed": z_medians_fixed,
        "scale_thresholds_fixed": scale_thresholds_fixed,
        "rung_qualities": np.array(qualities, dtype=np.int64),
        "rung_gains_fixed": np.stack([np.asarray(rung_gains_fixed[q], dtype=np.int64)
                                      for q in qualities]),
    }
    for i, layer in enumerate(hyper_layers):
        arrays[f"hs{i}_weight"] = layer["weight"]
        arrays[f"hs{i}_bias"] = layer["bias"]
    for prefix, tables in (("z", z_tables), ("y", y_tables)):
        arrays.update({f"{prefix}_{k}": v for k, v in _pack_tables(tables).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


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
    #: quality -> (M,) latent gains at 2**-GAIN_BITS; None for a format-1 file (no gain)
    rungs: dict[int, np.ndarray | None]

    @property
    def format(self) -> int:
        return int(self.meta["format"])

    @property
    def bitstream_version(self) -> int:
        """The chunk format version this file's chunks carry (docs/reference/bitstream.md §2)."""
        return 1 if self.format == 1 else 2

    @property
    def latent_channels(self) -> int:
        return int(self.meta["M"])

    @property
    def hyper_channels(self) -> int:
        return int(self.meta["N"])

    @property
    def int8_synthesis(self) -> bool:
        """Whether the synthesis graph is int8 (QDQ; ``meta["synthesis"]``, bitstream §9)."""
        return "weight_bits" in self.meta.get("synthesis", {})


def read_model_file(path: Path) -> ModelFile:
    """Load and validate a model file (raises ValueError if it is not a usable one)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        meta = json.loads(arrays["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a dlwsi model file: {exc}") from None
    if meta.get("format") not in SUPPORTED_MODEL_FILE_FORMATS:
        raise ValueError(f"{path}: model file format {meta.get('format')} is not supported "
                         "by this decoder; upgrade numcodecs-dlwsi")
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
        rungs=_read_rungs(path, meta, arrays),
    )
    if len(model.z_tables) != model.hyper_channels or len(model.z_medians_fixed) != len(
            model.z_tables):
        raise ValueError(f"{path}: hyper-latent tables do not match N={model.hyper_channels}")
    if len(model.y_tables) != len(model.scale_thresholds_fixed):
        raise ValueError(f"{path}: scale table and Gaussian tables differ in length")
    return model


def _read_rungs(path: Path, meta: dict, arrays: dict[str, np.ndarray]
                ) -> dict[int, np.ndarray | None]:
    if meta["format"] == 1:
        return {int(meta["quality"]): None}
    try:
        qualities, gains = arrays["rung_qualities"], arrays["rung_gains_fixed"]
    except KeyError as exc:
        raise ValueError(f"{path}: format 2 model file lacks {exc}") from None
    if (qualities.ndim != 1 or not len(qualities) or gains.shape != (len(qualities),
                                                                     int(meta["M"]))):
        raise ValueError(f"{path}: rung table has shape {gains.shape}, expected "
                         f"({len(qualities)}, {meta['M']})")
    if len(set(qualities.tolist())) != len(qualities) or not np.all(
            (qualities >= 1) & (qualities <= 255)):
        raise ValueError(f"{path}: rung qualities must be distinct integers in 1..255")
    if not np.all((gains >= GAIN_FIXED_MIN) & (gains <= GAIN_FIXED_MAX)):
        raise ValueError(f"{path}: a rung gain is outside 2**-6..2**6")
    return {int(q): gains[i].astype(np.int64) for i, q in enumerate(qualities)}
