"""The dlwsi chunk format: a small self-describing header, then the entropy-coded payload.

Every field is validated before anything is allocated from it. The layout is specified
in ``docs/reference/bitstream.md``; any change to it needs a new ``FORMAT_VERSION``.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"DLWS"
#: The version written by models with a quality ladder of latent gains (model file format
#: 2). Version 1 chunks, from single-rung model files, differ only in the entropy
#: parameters and reconstruction having no gain (docs/reference/bitstream.md §8.3, §9); their bytes
#: never change and they stay readable.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

#: Largest chunk a decoder accepts (8192 x 8192 pixels): headers cannot make us allocate more.
MAX_PIXELS = 1 << 26
MAX_SIDE = 1 << 16
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
HASH_PREFIX_BYTES = 8

_FIXED_HEAD = struct.Struct("<4sBBBB")  # magic, version, flags, quality, model id length
_FIXED_TAIL = struct.Struct("<8sIII")  # model hash prefix, height, width, payload length
_CRC = struct.Struct("<I")


class Layout(IntEnum):
    """Axis order of the image the chunk was made from; decoding restores it."""

    CHW = 0
    HWC = 1


_FLAG_HWC = 0x01
_KNOWN_FLAGS = _FLAG_HWC


@dataclass(frozen=True)
class ChunkHeader:
    quality: int
    model_id: str
    model_hash_prefix: bytes
    height: int
    width: int
    layout: Layout
    version: int = FORMAT_VERSION

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.layout is Layout.CHW:
            return (3, self.height, self.width)
        return (self.height, self.width, 3)


def _check_header_values(header: ChunkHeader) -> None:
    if header.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"dlwsi chunk: version {header.version} is not one of "
                         f"{SUPPORTED_VERSIONS}")
    if not 1 <= header.quality <= 255:
        raise ValueError(f"dlwsi chunk: quality {header.quality} is outside 1..255")
    if not MODEL_ID_PATTERN.fullmatch(header.model_id):
        raise ValueError(f"dlwsi chunk: invalid model id {header.model_id!r}")
    if len(header.model_hash_prefix) != HASH_PREFIX_BYTES:
        raise ValueError("dlwsi chunk: model hash prefix must be 8 bytes")
    if not (1 <= header.height <= MAX_SIDE and 1 <= header.width <= MAX_SIDE):
        raise ValueError(
            f"dlwsi chunk: image size {header.height}x{header.width} is outside 1..{MAX_SIDE}"
        )
    if header.height * header.width > MAX_PIXELS:
        raise ValueError(
            f"dlwsi chunk: image of {header.height}x{header.width} pixels exceeds the "
            f"limit of {MAX_PIXELS} pixels per chunk"
        )


def pack(header: ChunkHeader, payload: bytes) -> bytes:
    """Serialize a header and its payload into one chunk."""
    _check_header_values(header)
    if len(payload) % 4 or not payload:
        raise ValueError("dlwsi payload must be a non-empty sequence of 32-bit words")
    model_id = header.model_id.encode("ascii")
    flags = _FLAG_HWC if header.layout is Layout.HWC else 0
    head = (
        _FIXED_HEAD.pack(MAGIC, header.version, flags, header.quality, len(model_id))
        + model_id
        + _FIXED_TAIL.pack(header.model_hash_prefix, header.height, header.width, len(payload))
    )
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + _CRC.pack(crc) + payload


def unpack(chunk: bytes | bytearray | memoryview) -> tuple[ChunkHeader, memoryview]:
    """Validate a chunk and split it into header and payload.

    Raises ``ValueError`` naming the problem for anything that is not an intact chunk of
    a supported version: wrong magic, unknown version or flags, impossible sizes,
    truncation, trailing bytes or a checksum mismatch.
    """
    data = memoryview(chunk).cast("B")
    if len(data) < _FIXED_HEAD.size:
        raise ValueError(f"dlwsi chunk: {len(data)} bytes is too short to be a chunk")
    magic, version, flags, quality, id_len = _FIXED_HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise ValueError(f"not a dlwsi chunk: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"dlwsi chunk format version {version} is not supported by this decoder "
            f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade numcodecs-dlwsi"
        )
    if flags & ~_KNOWN_FLAGS:
        raise ValueError(f"dlwsi chunk: unknown flags 0x{flags:02x}")
    fixed_end = _FIXED_HEAD.size + id_len + _FIXED_TAIL.size
    if len(data) < fixed_end + _CRC.size:
        raise ValueError(f"dlwsi chunk truncated: {len(data)} bytes, header alone needs "
                         f"{fixed_end + _CRC.size}")
    try:
        model_id = bytes(data[_FIXED_HEAD.size : _FIXED_HEAD.size + id_len]).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("dlwsi chunk: model id is not ASCII") from None
    hash_prefix, height, width, payload_len = _FIXED_TAIL.unpack_from(
        data, _FIXED_HEAD.size + id_len
    )
    header = ChunkHeader(
        quality=quality,
        model_id=model_id,
        model_hash_prefix=bytes(hash_prefix),
        height=height,
        width=width,
        layout=Layout.HWC if flags & _FLAG_HWC else Layout.CHW,
        version=version,
    )
    _check_header_values(header)
    payload_start = fixed_end + _CRC.size
    actual = len(data) - payload_start
    if actual < payload_len:
        raise ValueError(f"dlwsi chunk truncated: payload has {actual} of {payload_len} bytes")
    if actual > payload_len:
        raise ValueError(f"dlwsi chunk has {actual - payload_len} unexpected trailing bytes")
    if payload_len % 4:
        raise ValueError(f"dlwsi chunk: payload length {payload_len} is not a multiple of 4")
    (crc,) = _CRC.unpack_from(data, fixed_end)
    payload = data[payload_start:]
    if zlib.crc32(payload, zlib.crc32(data[:fixed_end])) != crc:
        raise ValueError("dlwsi chunk is corrupted: checksum mismatch")
    return header, payload
