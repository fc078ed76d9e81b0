"""A quality ladder of latent gains over one network (model file format 2, chunk version 2).

Every rung of he-mshl-v2 lives in one file; a rung is a gain on the latent, applied in
exact fixed point to the entropy parameters (docs/reference/bitstream.md §8.3, §9).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from golden_vectors import GOLDEN

from numcodecs_dlwsi import bitstream, image_codec
from numcodecs_dlwsi.model_file import GAIN_BITS, read_model_file
from numcodecs_dlwsi.model_store import load, qualities, resolve

LADDER = "he-mshl-v2"
SINGLE = "he-mshl-v1"  # format 1: one file per quality, version 1 chunks


def _reseal(data: bytes) -> bytes:
    crc_at = 8 + data[7] + 20
    crc = zlib.crc32(data[crc_at + 4 :], zlib.crc32(data[:crc_at]))
    return data[:crc_at] + struct.pack("<I", crc) + data[crc_at + 4 :]


def test_the_ladder_is_one_file_loaded_once():
    refs = [resolve(LADDER, q) for q in qualities(LADDER)]
    assert len(refs) >= 6
    assert len({(ref.path, ref.sha256) for ref in refs}) == 1
    models = {id(load(ref)) for ref in refs}
    assert len(models) == 1
    model = load(refs[0])
    assert model.format == 2 and model.bitstream_version == 2
    gains = [int(model.rungs[ref.quality][0]) for ref in refs]
    assert gains == sorted(gains) and len(set(gains)) == len(gains)


def test_rate_and_quality_rise_with_the_rung(he_tile):
    sizes, errors = [], []
    for quality in qualities(LADDER):
        ref = resolve(LADDER, quality)
        chunk = image_codec.encode_batch([he_tile], ref)[0]
        header, _ = bitstream.unpack(chunk)
        assert (header.version, header.quality) == (2, quality)
        back = image_codec.decode(chunk)
        sizes.append(len(chunk))
        errors.append(float(np.mean((back.astype(float) - he_tile) ** 2)))
    assert sizes == sorted(sizes), sizes
    assert errors[0] > 2 * errors[-1], errors  # the ladder spans a real range of quality
    assert all(later <= earlier * 1.02 for earlier, later in zip(errors, errors[1:],
                                                                  strict=False)), errors


def test_decoded_latents_sit_on_the_rungs_grid(he_tile):
    """y_hat * gain - mean is an integer: the symbols the entropy coder carried."""
    ref = resolve(LADDER, 2)
    model = load(ref)
    chunk = image_codec.encode_batch([he_tile], ref)[0]
    item = image_codec.decode_latents([chunk])[0]
    _, means = image_codec.entropy_parameters(model, item.z_symbols[None].astype(np.float64),
                                              model.rungs[2])
    gain = (model.rungs[2] / 2.0**GAIN_BITS)[:, None, None]
    symbols = item.y_hat.astype(np.float64) * gain - means[0] / 1024.0
    assert np.abs(symbols - np.rint(symbols)).max() < 1e-3
    assert np.abs(np.rint(symbols)).max() > 0


@pytest.mark.parametrize("name, forged_version", [(f"{LADDER}-q3", 1), (f"{SINGLE}-q2", 2)])
def test_a_chunk_whose_version_does_not_fit_its_model_is_refused(name, forged_version):
    chunk = bytearray((GOLDEN / f"{name}.chunk").read_bytes())
    chunk[4] = forged_version
    with pytest.raises(ValueError, match=f"version {forged_version} cannot come from model"):
        image_codec.decode(_reseal(bytes(chunk)))


def _forged_model_file(tmp_path: Path, **changes: np.ndarray) -> Path:
    ref = resolve(LADDER, 1)
    with np.load(ref.path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays.update(changes)
    path = tmp_path / "forged.dlwsi"
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("field, value, match", [
    ("rung_gains_fixed", lambda g: g * 0 + (1 << 23), "outside 2\\*\\*-6..2\\*\\*6"),
    ("rung_gains_fixed", lambda g: g * 0, "outside"),
    ("rung_gains_fixed", lambda g: g[:, :5], "rung table has shape"),
    ("rung_qualities", lambda q: q * 0 + 1, "distinct"),
    ("rung_qualities", lambda q: q + 300, "1..255"),
])
def test_a_damaged_rung_table_is_refused(tmp_path, field, value, match):
    ref = resolve(LADDER, 1)
    with np.load(ref.path, allow_pickle=False) as archive:
        original = archive[field]
    path = _forged_model_file(tmp_path, **{field: value(original)})
    with pytest.raises(ValueError, match=match):
        read_model_file(path)


def test_a_future_model_file_format_is_refused(tmp_path):
    ref = resolve(LADDER, 1)
    with np.load(ref.path, allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
    meta["format"] = 3
    path = _forged_model_file(tmp_path, meta=np.frombuffer(json.dumps(meta).encode(),
                                                           dtype=np.uint8))
    with pytest.raises(ValueError, match="format 3 is not supported.*upgrade"):
        read_model_file(path)
