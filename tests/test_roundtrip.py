"""Round trips on real H&E through the core codec and the numcodecs adapter."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
from conftest import psnr

from numcodecs_dlwsi import decode, encode
from numcodecs_dlwsi.model_store import default_model, qualities


@pytest.mark.parametrize("size", [(1, 1), (65, 1000), (512, 512), (1000, 777)])
@pytest.mark.parametrize("layout", ["chw", "hwc"])
def test_roundtrip_shapes_and_layouts(he_image, size, layout):
    h, w = size
    hwc = np.ascontiguousarray(he_image[:h, :w])
    image = hwc if layout == "hwc" else np.ascontiguousarray(hwc.transpose(2, 0, 1))
    chunk = encode(image)
    back = decode(chunk)
    assert back.shape == image.shape and back.dtype == np.uint8
    if h * w >= 4096:  # a single pixel has no meaningful PSNR
        assert psnr(back, image) > 26


def test_numcodecs_registry_roundtrip(he_tile):
    codec = numcodecs.get_codec({"id": "dlwsi"})
    blob = codec.encode(he_tile)
    assert isinstance(blob, bytes) and len(blob) < he_tile.nbytes / 4
    back = codec.decode(blob)
    assert back.shape == he_tile.shape
    out = np.empty_like(he_tile)
    assert codec.decode(blob, out=out) is out
    np.testing.assert_array_equal(out, back)


def test_config_roundtrip_pins_the_weights():
    codec = numcodecs.get_codec({"id": "dlwsi"})
    config = codec.get_config()
    assert set(config) == {"id", "quality", "model", "model_hash"}
    assert config["model"] == default_model() and len(config["model_hash"]) == 64
    again = numcodecs.get_codec(config)
    assert again.get_config() == config


def test_quality_ladder_is_monotone(data_root):
    """Higher quality: more bytes and higher PSNR, over held-out tiles of several images."""
    from numcodecs_dlwsi.train.data import validation_tiles

    tiles = list(validation_tiles(data_root, size=256, per_image=1))
    levels = qualities(default_model())
    assert len(levels) >= 2, "a release ships at least two qualities"
    sizes, scores = [], []
    for quality in levels:
        chunks = [encode(tile, quality=quality) for tile in tiles]
        sizes.append(sum(len(c) for c in chunks))
        decoded = [decode(c) for c in chunks]
        scores.append(float(np.mean([psnr(d, t) for d, t in zip(decoded, tiles, strict=True)])))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert scores == sorted(scores), scores


def test_decoding_does_not_import_torch(tmp_path, he_tile):
    import subprocess
    import sys

    chunk_file = tmp_path / "chunk.bin"
    chunk_file.write_bytes(encode(he_tile))
    code = (
        "import sys, numcodecs\n"
        f"data = open({str(chunk_file)!r}, 'rb').read()\n"
        "img = numcodecs.get_codec({'id': 'dlwsi'}).decode(data)\n"
        "assert img.shape == (3, 512, 512)\n"
        "assert 'torch' not in sys.modules and 'compressai' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
