"""Entropy coding of integer latents with fixed integer frequency tables (rANS).

The coder is constriction's ``AnsCoder`` (64-bit state, 32-bit words, 24-bit
probabilities). Every probability it uses comes from an integer table stored in the
model file, so encoder and decoder agree bit for bit on any machine: no float is
evaluated to build a distribution at coding time. ``docs/reference/bitstream.md`` specifies the
symbol order precisely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import constriction
import numpy as np

#: Probabilities are integers summing to 2**PRECISION (constriction's default ANS preset).
PRECISION = 24
TOTAL = 1 << PRECISION
#: Values outside a table's range are coded as its escape symbol, then as a 32-bit
#: zigzag integer in two 16-bit halves of a uniform distribution.
_ESCAPE_HALF = constriction.stream.model.Uniform(1 << 16)
#: Decoded last: a decoder that read more or fewer symbols than were written (wrong
#: size in a forged header, wrong model) finds something else here. ANS itself cannot
#: tell: popping from an exhausted stream silently yields zeros.
END_MARKER = np.array([0xD1, 0x5C], dtype=np.int32)
#: Symbols per ``decode`` call. Between calls the decoder checks that the stream still
#: holds the information the end marker needs (see ``_decode_checked``).
DECODE_SLICE = 1 << 16


def _marker_bits() -> int:
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(END_MARKER, _ESCAPE_HALF)
    return int(coder.num_valid_bits())


#: Information (``num_valid_bits``) an ANS stream holds when only the end marker is left.
#: Encoding never removes information and decoding never adds any, so in a valid payload
#: the decoder holds at least this much until it reaches the marker.
MARKER_BITS = _marker_bits()


@dataclass(frozen=True)
class FrequencyTable:
    """Integer probabilities for values ``lo .. lo + n - 2`` plus an escape symbol (last)."""

    lo: int
    freqs: np.ndarray
    _model: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        freqs = np.asarray(self.freqs, dtype=np.int64)
        if freqs.ndim != 1 or len(freqs) < 2:
            raise ValueError("a frequency table needs at least two entries")
        if freqs.min() < 1 or int(freqs.sum()) != TOTAL:
            raise ValueError(f"frequency table must be positive and sum to 2**{PRECISION}")
        object.__setattr__(self, "freqs", freqs)
        # constriction quantizes float probabilities as floor(cumsum(p) * scale) + index.
        # Feeding it (f - 1), whose sum is exactly the free weight 2**24 - n, makes scale 1
        # and reproduces our integer table exactly, with no rounding anywhere.
        probabilities = (freqs - 1).astype(np.float64)
        model = constriction.stream.model.Categorical(probabilities, perfect=False)
        object.__setattr__(self, "_model", model)

    @property
    def escape(self) -> int:
        return len(self.freqs) - 1


def quantize_pmf(pmf: np.ndarray, tail_mass: float) -> np.ndarray:
    """Integer frequencies (each >= 1, sum 2**PRECISION) for ``pmf`` plus an escape bin.

    Used when a model is exported; the result is stored, never recomputed by a decoder.
    """
    probs = np.append(np.clip(np.asarray(pmf, np.float64), 0, None), max(tail_mass, 0.0))
    n = len(probs)
    freqs = 1 + np.floor(probs / probs.sum() * (TOTAL - n)).astype(np.int64)
    freqs[np.argmax(freqs)] += TOTAL - int(freqs.sum())
    return freqs


def _zigzag(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.int64)
    if v.size and (v.min() < -(1 << 31) or v.max() >= (1 << 31)):
        raise ValueError("latent value outside the 32-bit range the format can carry")
    return ((v << 1) ^ (v >> 63)).astype(np.uint32)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return ((u >> 1) ^ -(u & 1)).astype(np.int32)


def _groups(table_index: np.ndarray, n_tables: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions sorted by table (stable, so C order within a table) and group bounds."""
    order = np.argsort(table_index, kind="stable")
    bounds = np.searchsorted(table_index[order], np.arange(n_tables + 1))
    return order, bounds


def _encode_section(coder: object, values: np.ndarray, table_index: np.ndarray,
                    tables: list[FrequencyTable]) -> None:
    """Push one section (grouped symbols, then its escapes) so it decodes in order."""
    order, bounds = _groups(table_index, len(tables))
    coded, escaped = [], []
    for t, table in enumerate(tables):
        group = values[order[bounds[t] : bounds[t + 1]]].astype(np.int64) - table.lo
        outside = (group < 0) | (group >= table.escape)
        escaped.append(group[outside] + table.lo)
        coded.append(np.where(outside, table.escape, group).astype(np.int32))
    escapes = _zigzag(np.concatenate(escaped))
    halves = np.stack([escapes >> 16, escapes & 0xFFFF], axis=1).ravel().astype(np.int32)
    # ANS is last-in first-out: push in the reverse of the decoding order.
    if halves.size:
        coder.encode_reverse(halves, _ESCAPE_HALF)
    for t in reversed(range(len(tables))):
        if coded[t].size:
            coder.encode_reverse(coded[t], tables[t]._model)


def _decode_checked(coder: object, model: object, count: int) -> np.ndarray:
    """``count`` symbols, refused as soon as the stream runs dry.

    An exhausted ANS stream does not fail: it keeps yielding (mostly the likeliest)
    symbols at almost no cost. So a header that announces a large image over a tiny
    payload would otherwise make the decoder grind through millions of phantom symbols
    and allocate for all of them before the end-marker check could refuse it. Checking
    the remaining information after every slice bounds that wasted work to one slice.
    """
    parts = []
    for start in range(0, count, DECODE_SLICE):
        parts.append(np.asarray(coder.decode(model, min(DECODE_SLICE, count - start)),
                                dtype=np.int64))
        if coder.num_valid_bits() < MARKER_BITS:
            raise ValueError("dlwsi chunk payload ran out of data before all latents were "
                             "decoded: it is damaged, its size is forged, or it was not "
                             "written by this model")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _decode_section(coder: object, table_index: np.ndarray,
                    tables: list[FrequencyTable]) -> np.ndarray:
    order, bounds = _groups(table_index, len(tables))
    values = np.empty(table_index.size, dtype=np.int64)
    escape_slots = []
    for t, table in enumerate(tables):
        count = int(bounds[t + 1] - bounds[t])
        if not count:
            continue
        symbols = _decode_checked(coder, table._model, count)
        positions = order[bounds[t] : bounds[t + 1]]
        values[positions] = symbols + table.lo
        escape_slots.append(positions[symbols == table.escape])
    slots = np.concatenate(escape_slots) if escape_slots else np.empty(0, np.int64)
    if slots.size:
        halves = _decode_checked(coder, _ESCAPE_HALF, 2 * slots.size).astype(np.uint32)
        values[slots] = _unzigzag((halves[0::2] << 16) | halves[1::2])
        _check_escapes(values, table_index, slots, tables)
    return values.astype(np.int32)


def _check_escapes(values: np.ndarray, table_index: np.ndarray, slots: np.ndarray,
                   tables: list[FrequencyTable]) -> None:
    """An escaped value inside its table's range is never written by an encoder."""
    lo = np.array([t.lo for t in tables], dtype=np.int64)[table_index[slots]]
    hi = lo + np.array([t.escape for t in tables], dtype=np.int64)[table_index[slots]]
    if np.any((values[slots] >= lo) & (values[slots] < hi)):
        raise ValueError("dlwsi chunk payload is invalid: escape carries an in-range value")


def encode_latents(z: np.ndarray, z_tables: list[FrequencyTable], y: np.ndarray,
                   y_levels: np.ndarray, y_tables: list[FrequencyTable]) -> bytes:
    """Code z (table per channel) then y (table per element given by ``y_levels``).

    z: int (N, h, w); y, y_levels: int (M, H, W). Returns little-endian 32-bit words.
    """
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(END_MARKER, _ESCAPE_HALF)
    _encode_section(coder, y.ravel(), y_levels.ravel(), y_tables)
    _encode_section(coder, z.ravel(), _channel_index(z.shape), z_tables)
    return coder.get_compressed().astype("<u4").tobytes()


def _channel_index(shape: tuple[int, ...]) -> np.ndarray:
    return np.repeat(np.arange(shape[0]), int(np.prod(shape[1:]))).astype(np.int64)


class LatentDecoder:
    """Decodes one chunk's payload in two steps, so the hyper-synthesis runs in between."""

    def __init__(self, payload: bytes | memoryview) -> None:
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        if words.size == 0:
            raise ValueError("dlwsi chunk has an empty payload")
        self._coder = constriction.stream.stack.AnsCoder(words)

    def decode_z(self, shape: tuple[int, int, int], tables: list[FrequencyTable]) -> np.ndarray:
        if shape[0] != len(tables):
            raise ValueError("model has a different number of hyper-latent channels")
        return self._guarded(_decode_section, _channel_index(shape), tables).reshape(shape)

    def decode_y(self, levels: np.ndarray, tables: list[FrequencyTable]) -> np.ndarray:
        values = self._guarded(_decode_section, levels.ravel().astype(np.int64), tables)
        marker = np.asarray(self._coder.decode(_ESCAPE_HALF, len(END_MARKER)))
        if not np.array_equal(marker, END_MARKER) or not self._coder.is_empty():
            raise ValueError("dlwsi chunk payload has data left over after decoding: "
                             "it was not written by this model")
        return values.reshape(levels.shape)

    def _guarded(self, fn: object, *args: object) -> np.ndarray:
        try:
            return fn(self._coder, *args)
        except ValueError:
            raise
        except Exception as exc:  # e.g. constriction rejecting an invalid final word
            raise ValueError(f"dlwsi chunk payload cannot be decoded: {exc}") from None
