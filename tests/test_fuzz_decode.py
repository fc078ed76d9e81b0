"""Property-based fuzzing of the dlwsi decoder (hypothesis): the CI-sized smoke version of
``benchmarks/fuzz_decode.py``.

Real chunks (small crops of held-out H&E, every installed quality) are mutated,
truncated, spliced, concatenated and forged, with and without a recomputed CRC (so the
entropy decoder, the escape and end-marker checks and the hyper-synthesis are reached,
not only the checksum). Every case must end in one of two ways:

- a *clean* error: ``ValueError`` (``ModelNotAvailableError`` is one) or ``TypeError``,
  raised within the wall-clock guard and without a memory blow-up; or
- a *correct* decode: a contiguous uint8 array of exactly the shape the header announces
  (for an unmodified chunk: exactly the original decode).

Anything else (IndexError, OverflowError, MemoryError, a panic from native code, a hang,
a wrong shape) is a bug. Examples are derandomized so CI runs the same cases every time.
"""

from __future__ import annotations

import resource
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from numcodecs_dlwsi import bitstream, image_codec  # noqa: E402
from numcodecs_dlwsi.model_store import qualities, resolve  # noqa: E402

#: What a bad chunk may raise. Everything else is a crash.
CLEAN_ERRORS = (ValueError, TypeError)
#: Seconds one decode may take (a 256x256 chunk decodes in ~0.1 s on 2 cores).
DECODE_LIMIT_S = 20.0
#: Resident-memory growth the whole fuzz run may cause.
RSS_LIMIT_MB = 1500

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class DecodeHang(Exception):
    pass


@contextmanager
def wall_clock_guard(seconds: float):
    """Interrupt (SIGALRM) a decode that takes longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise DecodeHang(f"decode took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def crc_offset(chunk: bytes) -> int:
    return 8 + chunk[7] + 20


def reseal(data: bytes) -> bytes:
    """Recompute the CRC of a (possibly edited) chunk, so the checks behind it are reached.
    Data too short to hold a CRC is returned unchanged."""
    if len(data) < 8 or len(data) < crc_offset(data) + 4:
        return data
    at = crc_offset(data)
    crc = zlib.crc32(data[at + 4:], zlib.crc32(data[:at]))
    return data[:at] + struct.pack("<I", crc) + data[at + 4:]


def check_decode(data: bytes, expected: np.ndarray | None = None) -> str:
    """Decode ``data``: a clean error or a correct image, else the test fails."""
    try:
        with wall_clock_guard(DECODE_LIMIT_S):
            image = image_codec.decode(data)
    except CLEAN_ERRORS as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return type(exc).__name__
    header, _ = bitstream.unpack(data)  # decoded, so the header must be intact
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.shape == header.shape and image.flags.c_contiguous
    if expected is not None:
        np.testing.assert_array_equal(image, expected)
    return "decoded"


@pytest.fixture(scope="module")
def seeds(he_image):
    """Real chunks: three small crops, at every installed quality of the default model."""
    model = resolve(None, None).model
    crops = [he_image[:64, :64], he_image[300:364, 500:596].transpose(2, 0, 1),
             he_image[700:780, 100:148]]
    out = []
    for q in qualities(model):
        ref = resolve(model, q)
        out += image_codec.encode_batch([np.ascontiguousarray(c) for c in crops], ref)
    return out


@pytest.fixture(scope="module")
def decoded_seeds(seeds):
    return [image_codec.decode(c) for c in seeds]


@pytest.fixture(scope="module", autouse=True)
def rss_budget():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < RSS_LIMIT_MB, f"fuzzing grew peak RSS by {grown_mb:.0f} MB"


def test_seeds_decode_exactly_as_before(seeds, decoded_seeds):
    for chunk, image in zip(seeds, decoded_seeds, strict=True):
        assert check_decode(chunk, image) == "decoded"


@FUZZ
@given(data=st.data())
def test_bit_flips_and_byte_edits(seeds, decoded_seeds, data):
    i = data.draw(st.integers(0, len(seeds) - 1))
    chunk = bytearray(seeds[i])
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(chunk) - 1), st.integers(1, 255)),
                               min_size=1, max_size=8))
    for position, xor in edits:
        chunk[position] ^= xor
    unchanged = bytes(chunk) == seeds[i]  # edits at one position can cancel out
    sealed = data.draw(st.booleans())
    result = check_decode(reseal(bytes(chunk)) if sealed else bytes(chunk),
                          decoded_seeds[i] if unchanged else None)
    if not sealed and not unchanged:
        assert result == "ValueError"  # the CRC (or a header check) catches every edit


@FUZZ
@given(data=st.data())
def test_payload_edits_behind_a_valid_crc(seeds, data):
    """Reach the entropy decoder: edit only the payload, then recompute the CRC."""
    chunk = bytearray(data.draw(st.sampled_from(seeds)))
    start = crc_offset(chunk) + 4
    words = (len(chunk) - start) // 4
    kind = data.draw(st.sampled_from(["flip", "word", "zero-tail", "random", "shuffle"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            chunk[data.draw(st.integers(start, len(chunk) - 1))] ^= 1 << data.draw(
                st.integers(0, 7))
    elif kind == "word":
        at = start + 4 * data.draw(st.integers(0, words - 1))
        chunk[at:at + 4] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
    elif kind == "zero-tail":
        k = data.draw(st.integers(1, words))
        chunk[len(chunk) - 4 * k:] = bytes(4 * k)
    elif kind == "random":
        chunk[start:] = data.draw(st.binary(min_size=4 * words, max_size=4 * words))
    else:
        order = data.draw(st.permutations(range(min(words, 12))))
        head = [bytes(chunk[start + 4 * i:start + 4 * i + 4]) for i in order]
        chunk[start:start + 4 * len(order)] = b"".join(head)
    check_decode(reseal(bytes(chunk)))


@FUZZ
@given(data=st.data())
def test_forged_header_fields(seeds, data):
    """Every header field set to an arbitrary value, CRC recomputed."""
    chunk = bytearray(data.draw(st.sampled_from(seeds)))
    id_len = chunk[7]
    tail = 8 + id_len
    field = data.draw(st.sampled_from(["version", "flags", "quality", "id_len", "model_id",
                                       "hash", "height", "width", "payload_len"]))
    if field in ("version", "flags", "quality", "id_len"):
        chunk[{"version": 4, "flags": 5, "quality": 6, "id_len": 7}[field]] = data.draw(
            st.integers(0, 255))
    elif field == "model_id":
        chunk[8:tail] = data.draw(st.binary(min_size=id_len, max_size=id_len))
    elif field == "hash":
        chunk[tail:tail + 8] = data.draw(st.binary(min_size=8, max_size=8))
    else:
        at = tail + 8 + 4 * ["height", "width", "payload_len"].index(field)
        value = data.draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(1, 8192),
                                    st.sampled_from([1, 63, 64, 65, 8192, 65535, 65536])))
        chunk[at:at + 4] = struct.pack("<I", value)
    check_decode(reseal(bytes(chunk)))


@FUZZ
@given(data=st.data())
def test_truncations_splices_and_concatenations(seeds, decoded_seeds, data):
    i = data.draw(st.integers(0, len(seeds) - 1))
    j = data.draw(st.integers(0, len(seeds) - 1))
    a, b = seeds[i], seeds[j]
    kind = data.draw(st.sampled_from(["prefix", "suffix", "concat", "splice", "pad",
                                      "garbage-front", "insert", "delete"]))
    if kind == "prefix":
        case = a[:data.draw(st.integers(0, len(a) - 1))]
    elif kind == "suffix":
        case = a[data.draw(st.integers(1, len(a) - 1)):]
    elif kind == "concat":
        case = a + b
    elif kind == "splice":  # a's header, b's payload
        case = a[:crc_offset(a) + 4] + b[crc_offset(b) + 4:]
    elif kind == "pad":
        case = a + data.draw(st.binary(min_size=1, max_size=64))
    elif kind == "garbage-front":
        case = data.draw(st.binary(min_size=1, max_size=64)) + a
    elif kind == "insert":
        at = data.draw(st.integers(0, len(a)))
        case = a[:at] + data.draw(st.binary(min_size=1, max_size=16)) + a[at:]
    else:
        at = data.draw(st.integers(0, len(a) - 1))
        case = a[:at] + a[at + data.draw(st.integers(1, 16)):]
    if data.draw(st.booleans()):
        case = reseal(case)
    # only an unchanged chunk may decode, and then to exactly its image
    check_decode(case, decoded_seeds[i] if case == a else None)


@FUZZ
@given(blob=st.binary(max_size=512))
def test_arbitrary_bytes(blob):
    assert check_decode(blob) == "ValueError"
    assert check_decode(bitstream.MAGIC + blob) == "ValueError"


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1024, 8192), width=st.integers(1024, 8192),
       payload=st.one_of(st.none(), st.binary(min_size=4, max_size=64)))
@example(height=8192, width=8192, payload=None)
@example(height=4096, width=8192, payload=None)
def test_forged_size_over_small_payload_is_cheap(seeds, height, width, payload):
    """A header announcing a big image over a few bytes (a real chunk's payload, or random
    words) must fail fast and small: the decoder stops when the ANS stream runs dry
    instead of decoding millions of phantom symbols. (Before this was fixed, 8192x8192
    over a real 64x64 chunk's payload took 80 s and 4 GB to be refused.)"""
    header, real_payload = bitstream.unpack(seeds[0])
    if height * width > bitstream.MAX_PIXELS:
        height = bitstream.MAX_PIXELS // width
    payload = bytes(real_payload) if payload is None else payload[:len(payload) // 4 * 4]
    if payload.endswith(b"\0\0\0\0"):
        payload = payload[:-4] + b"\1\0\0\0"
    forged = bitstream.pack(bitstream.ChunkHeader(
        header.quality, header.model_id, header.model_hash_prefix, height, width,
        header.layout), payload)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with wall_clock_guard(5.0):
        with pytest.raises(ValueError):
            image_codec.decode_latents([forged])
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 600


def test_numcodecs_and_zarr_paths_stay_clean(seeds):
    """The codec adapters pass the same clean errors through."""
    import numcodecs

    codec = numcodecs.get_codec({"id": "dlwsi", **_config_of(seeds[0])})
    damaged = bytearray(seeds[0])
    damaged[-1] ^= 0x40
    for bad in (bytes(damaged), seeds[0][:40], seeds[0] + b"x", reseal(bytes(damaged))):
        with pytest.raises(CLEAN_ERRORS), wall_clock_guard(DECODE_LIMIT_S):
            codec.decode(bad)


def _config_of(chunk: bytes) -> dict:
    header, _ = bitstream.unpack(chunk)
    ref = image_codec.ref_for_chunk(header)
    return {"quality": ref.quality, "model": ref.model, "model_hash": ref.sha256}
