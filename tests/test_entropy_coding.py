"""The entropy coder's exact behaviour is part of the format: pin it with known words."""

from __future__ import annotations

import constriction
import numpy as np
import pytest

from numcodecs_dlwsi.entropy_coding import (
    TOTAL,
    FrequencyTable,
    LatentDecoder,
    encode_latents,
    quantize_pmf,
)


def test_known_ans_words():
    """docs/reference/bitstream.md section 14.1, worked by hand: one word, 0x09800004."""
    table = FrequencyTable(-1, np.array([1 << 22, 1 << 23, (1 << 22) - 1, 1]))
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.array([1, 2, 0, 1], dtype=np.int32), table._model)
    words = coder.get_compressed()
    assert words.tolist() == [0x09800004]
    decoder = constriction.stream.stack.AnsCoder(words)
    assert decoder.decode(table._model, 4).tolist() == [1, 2, 0, 1]
    assert decoder.is_empty()


@pytest.mark.parametrize("rare", [1, 2, 7])
def test_tables_reach_the_coder_exactly(rare):
    """A symbol of frequency f costs exactly 24 - log2(f) bits: no requantization."""
    table = FrequencyTable(0, np.array([TOTAL - 1 - rare, rare, 1]))
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ones(4000, dtype=np.int32), table._model)
    bits = 32 * len(coder.get_compressed())
    assert abs(bits - 4000 * (24 - np.log2(rare))) <= 64


def test_quantized_pmf_invariants():
    freqs = quantize_pmf(np.array([0.5, 0.25, 1e-12, 0.25]), 1e-9)
    assert len(freqs) == 5 and freqs.min() >= 1 and freqs.sum() == TOTAL


def test_latent_roundtrip_with_escapes():
    rng = np.random.default_rng(0)
    z_tables = [FrequencyTable(-4, quantize_pmf(np.exp(-np.abs(np.arange(-4, 5)) / (c + 1)),
                                                1e-3)) for c in range(3)]
    y_tables = [FrequencyTable(-2 * (s + 1), quantize_pmf(
        np.exp(-0.5 * (np.arange(-2 * (s + 1), 2 * (s + 1) + 1) / (s + 1)) ** 2), 1e-3))
        for s in range(5)]
    z = rng.integers(-9, 10, (3, 2, 3))
    y = np.rint(rng.normal(size=(4, 8, 8)) * 5).astype(np.int64)
    y[0, 0, 0], y[1, 2, 3], y[3, 7, 7] = -(2**31), 2**31 - 1, 123456
    levels = rng.integers(0, 5, y.shape)
    payload = encode_latents(z, z_tables, y, levels, y_tables)
    decoder = LatentDecoder(payload)
    np.testing.assert_array_equal(decoder.decode_z(z.shape, z_tables), z)
    np.testing.assert_array_equal(decoder.decode_y(levels, y_tables), y)


def test_reading_the_wrong_number_of_symbols_is_detected():
    tables = [FrequencyTable(-2, quantize_pmf(np.ones(5), 1e-3))]
    z = np.zeros((1, 1, 1), dtype=np.int64)
    y = np.ones((1, 4, 4), dtype=np.int64)
    payload = encode_latents(z, tables, y, np.zeros_like(y), tables)
    for shape in ((1, 4, 8), (1, 2, 4)):  # what a forged width or height would make us read
        decoder = LatentDecoder(payload)
        decoder.decode_z(z.shape, tables)
        with pytest.raises(ValueError, match="not written by this model"):
            decoder.decode_y(np.zeros(shape, dtype=np.int64), tables)


def test_out_of_range_latent_is_refused():
    tables = [FrequencyTable(-2, quantize_pmf(np.ones(5), 1e-3))]
    y = np.array([[[2**40]]])
    with pytest.raises(ValueError, match="32-bit"):
        encode_latents(np.zeros((1, 1, 1), np.int64), tables, y, np.zeros_like(y), tables)


def test_scale_levels_table_answers_as_the_binary_search():
    """The look-up table must pick the same Gaussian table as the search it replaced, for
    every integer scale, in range or not, and for thresholds too large for a table."""
    from numcodecs_dlwsi.hyper_synthesis import LEVEL_TABLE_LIMIT, scale_levels

    rng = np.random.default_rng(5)
    thresholds = np.unique(rng.integers(100, 300_000, 64))
    scales = np.concatenate([rng.integers(-2**26, 2**26, 20_000), thresholds,
                             thresholds - 1, thresholds + 1, [0, -1]]).astype(np.float64)
    for table in (thresholds, thresholds + LEVEL_TABLE_LIMIT):
        expected = np.searchsorted(table[:-1], scales, side="left")
        assert np.array_equal(scale_levels(scales, table), expected)
        assert scale_levels(scales, table).dtype == np.int64
