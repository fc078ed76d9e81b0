"""Bad input: clear ValueError/TypeError, never a crash, hang or oversized allocation."""

from __future__ import annotations

import struct
import zlib

import numcodecs
import numpy as np
import pytest

from numcodecs_dlwsi import ModelNotAvailableError, bitstream, decode, encode
from numcodecs_dlwsi.codec_config import CodecConfig


@pytest.fixture(scope="module")
def chunk(he_image):
    return encode(np.ascontiguousarray(he_image[:128, :192]))


def _reseal(data: bytes) -> bytes:
    """Recompute the CRC after editing a header field, to reach the checks behind it."""
    id_len = data[7]
    crc_at = 8 + id_len + 20
    crc = zlib.crc32(data[crc_at + 4 :], zlib.crc32(data[:crc_at]))
    return data[:crc_at] + struct.pack("<I", crc) + data[crc_at + 4 :]


@pytest.mark.parametrize("image, error, match", [
    (np.zeros((3, 8, 8), np.float32), TypeError, "uint8"),
    (np.zeros((3, 8, 8), np.uint16), TypeError, "uint8"),
    (np.zeros((4, 8, 8), np.uint8), ValueError, "3-channel"),
    (np.zeros((8, 8), np.uint8), ValueError, "shape"),
    (np.zeros((3, 0, 8), np.uint8), ValueError, "empty"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
    (np.zeros((3, 70000, 1), np.uint8), ValueError, "limit"),
    ([[1, 2, 3]], TypeError, "numpy"),
])
def test_encode_rejects_bad_images(image, error, match):
    with pytest.raises(error, match=match):
        encode(image)


def test_encode_rejects_huge_chunk():
    image = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (3, 10000, 10000), (0, 0, 0))
    with pytest.raises(ValueError, match="limit"):
        encode(image)


def test_truncated_chunks(chunk):
    for cut in (0, 3, 7, 12, 30, len(chunk) // 2, len(chunk) - 1):
        with pytest.raises(ValueError, match="short|truncated"):
            decode(chunk[:cut])


def test_trailing_bytes(chunk):
    with pytest.raises(ValueError, match="trailing"):
        decode(chunk + b"\0\0\0\0")


def test_every_corrupted_byte_is_detected(chunk):
    rng = np.random.default_rng(0)
    for position in rng.choice(len(chunk), size=min(len(chunk), 200), replace=False):
        damaged = bytearray(chunk)
        damaged[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(ValueError):
            decode(bytes(damaged))


def test_not_a_chunk():
    with pytest.raises(ValueError, match="magic"):
        decode(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_unknown_format_version(chunk):
    future = bytearray(chunk)
    future[4] = bitstream.FORMAT_VERSION + 1
    expected = f"version {bitstream.FORMAT_VERSION + 1} is not supported"
    with pytest.raises(ValueError, match=expected):
        decode(_reseal(bytes(future)))


def test_unknown_flags(chunk):
    flagged = bytearray(chunk)
    flagged[5] |= 0x80
    with pytest.raises(ValueError, match="flags"):
        decode(_reseal(bytes(flagged)))


def test_header_announcing_huge_shape_is_refused_before_allocating(chunk):
    id_len = chunk[7]
    at = 8 + id_len + 8
    for height, width in ((65535, 65535), (0, 10), (1 << 20, 1)):
        forged = bytearray(chunk)
        forged[at : at + 8] = struct.pack("<II", height, width)
        with pytest.raises(ValueError, match="limit|outside"):
            decode(_reseal(bytes(forged)))


def test_chunk_of_another_model_is_refused(chunk):
    forged = bytearray(chunk)
    id_len = forged[7]
    forged[8 + id_len] ^= 0xFF  # first byte of the weights hash prefix
    with pytest.raises(ModelNotAvailableError, match="written by model.*refusing"):
        decode(_reseal(bytes(forged)))


def test_codec_pinned_to_other_weights_refuses_to_decode(chunk):
    config = numcodecs.get_codec({"id": "dlwsi"}).get_config()
    config["model_hash"] = "0" * 64
    codec = numcodecs.get_codec(config)  # metadata stays readable ...
    with pytest.raises(ModelNotAvailableError, match="refusing to decode"):
        codec.decode(chunk)  # ... but no pixel comes out of the wrong weights


def test_missing_model_names_what_is_needed(chunk):
    codec = numcodecs.get_codec({"id": "dlwsi", "quality": 1, "model": "he-future-v9",
                                 "model_hash": "ab" * 32})
    with pytest.raises(ModelNotAvailableError, match="he-future-v9.*not installed"):
        codec.decode(chunk)


@pytest.mark.parametrize("config, match", [
    ({"quality": 0}, "quality"),
    ({"quality": "4"}, "quality"),
    ({"quality": True}, "quality"),
    ({"quality": 99}, "no quality 99"),
    ({"model": "../../etc/passwd"}, "model id"),
    ({"model_hash": "xyz"}, "hex"),
])
def test_bad_codec_configuration(config, match):
    with pytest.raises(ValueError, match=match):
        CodecConfig.create(**config)
