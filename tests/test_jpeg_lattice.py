"""The JPEG lattice filter: snapping decoded chunks back onto the source's JPEG lattice.

Sources are real H&E images put through real libjpeg-turbo (imagecodecs) in the layouts
scanners use, and the real Aperio slide CMU-1 (RGB JPEG at quality 30); the codecs are
found through the numcodecs and Zarr registries.
"""

from __future__ import annotations

import imagecodecs
import numcodecs
import numpy as np
import pytest
import zarr

from ngff_convert.jpeg_source import (
    MIN_CLOSE,
    close_share,
    lattice_config,
    read_lattice,
)
from ngff_convert.slide import open_slide, read_rgb
from numcodecs_dlwsi.image_codec import decode_batch, encode_batch
from numcodecs_dlwsi.jpeg_lattice import JpegLattice, fit, snap, snap_image
from numcodecs_dlwsi.model_store import resolve

CMU = "aperio/CMU-1-Small-Region.svs"
LAYOUTS = {"rgb": "rgb", "ycbcr444": "ycbcr", "ycbcr420": "ycbcr"}


def jpeg_source(image_hwc: np.ndarray, layout: str, quality: int = 30
                ) -> tuple[bytes, np.ndarray]:
    """(JPEG bytes, decoded (3, H, W)) of an image coded as a scanner would."""
    if layout == "rgb":
        encoded = imagecodecs.jpeg_encode(image_hwc, level=quality, colorspace="RGB",
                                          outcolorspace="RGB")
        decoded = imagecodecs.jpeg_decode(encoded, colorspace="RGB", outcolorspace="RGB")
    else:
        encoded = imagecodecs.jpeg_encode(image_hwc, level=quality, subsampling=layout[-3:])
        decoded = imagecodecs.jpeg_decode(encoded)
    return encoded, np.ascontiguousarray(decoded.transpose(2, 0, 1))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=0, data_range=255))


@pytest.fixture(scope="module")
def sources(he_image) -> dict[str, tuple[JpegLattice, np.ndarray]]:
    crop = np.ascontiguousarray(he_image[:512, :512])
    out = {}
    for layout, color in LAYOUTS.items():
        encoded, decoded = jpeg_source(crop, layout)
        out[layout] = (JpegLattice.from_dict(lattice_config([encoded], color)), decoded)
    return out


def test_tables_are_read_in_natural_order(sources):
    lattice, _ = sources["ycbcr420"]
    # libjpeg's standard tables scaled to quality 30 ((step * 166 + 50) // 100), first rows
    assert lattice.tables[0][:8] == (27, 18, 17, 27, 40, 66, 85, 101)
    assert lattice.tables[1][:8] == (28, 30, 40, 78, 164, 164, 164, 164)
    assert lattice.tables[1] == lattice.tables[2]
    assert lattice.subsampled and lattice.color == "ycbcr"
    rgb, _ = sources["rgb"]
    assert not rgb.subsampled and rgb.tables[0] == rgb.tables[1] == rgb.tables[2]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_jpeg_decode_is_on_its_lattice_and_snapping_keeps_it(sources, he_image, layout):
    lattice, decoded = sources[layout]
    assert fit(decoded, lattice) > 0.95
    original = np.ascontiguousarray(he_image[:512, :512].transpose(2, 0, 1))
    assert fit(original, lattice) < 0.5  # the pixels before JPEG are not
    moved = np.abs(snap(decoded, lattice).astype(int) - decoded)
    assert np.mean(moved <= 1) > 0.95
    if layout == "rgb":  # no colour conversion: only the IDCT's rounding differs
        assert np.mean(moved == 0) > 0.98


@pytest.mark.parametrize("layout", ["rgb", "ycbcr444"])
def test_snapping_brings_a_dlwsi_copy_closer_to_its_jpeg_source(sources, layout):
    lattice, decoded = sources[layout]
    copy = decode_batch(encode_batch([decoded], resolve("he-mshl-v3", 8)))[0]
    snapped = snap(copy, lattice)
    assert ssim(snapped, decoded) > ssim(copy, decoded) + 0.004
    assert np.mean((snapped.astype(float) - decoded) ** 2) < np.mean(
        (copy.astype(float) - decoded) ** 2)


def test_partial_blocks_at_the_edges_pass_through(sources):
    lattice, decoded = sources["rgb"]
    noisy = np.ascontiguousarray(decoded[:, :101, :77])
    noisy[:, ::3, ::2] ^= 1
    out = snap(noisy, lattice)
    assert np.array_equal(out[:, 96:, :], noisy[:, 96:, :])
    assert np.array_equal(out[:, :, 72:], noisy[:, :, 72:])
    assert not np.array_equal(out[:, :96, :72], noisy[:, :96, :72])
    tiny = np.ascontiguousarray(decoded[:, :5, :7])
    assert np.array_equal(snap(tiny, lattice), tiny)


def test_either_axis_order(sources):
    lattice, decoded = sources["rgb"]
    hwc = np.ascontiguousarray(decoded.transpose(1, 2, 0))
    assert np.array_equal(snap_image(hwc, lattice).transpose(2, 0, 1),
                          snap_image(decoded, lattice))


@pytest.mark.parametrize("bad, message", [
    ({"color": "rgb", "tables": [[1] * 64] * 2}, "three quantization tables"),
    ({"color": "rgb", "tables": [[0] * 64] * 3}, "1..65535"),
    ({"color": "cmyk", "tables": [[1] * 64] * 3}, "color must be one of"),
    ({"color": "rgb", "subsampled": True, "tables": [[1] * 64] * 3}, "only YCbCr"),
    ({"color": "rgb", "tolerance": 0.7, "tables": [[1] * 64] * 3}, "tolerance"),
    ({"color": "rgb", "tables": [[1] * 64] * 3, "extra": 1}, "not a JPEG lattice"),
    ({"tables": [[1] * 64] * 3}, "not a JPEG lattice"),
])
def test_bad_configurations_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        JpegLattice.from_dict(bad)


def test_bad_chunks_are_refused(sources):
    lattice, decoded = sources["rgb"]
    with pytest.raises(ValueError, match="uint8"):
        snap(decoded.astype(np.float32), lattice)
    with pytest.raises(ValueError, match="RGB chunk"):
        snap_image(decoded[:2], lattice)


@pytest.mark.parametrize("data, message", [
    (b"GIF89a", "not a JPEG"),
    (b"\xff\xd8\xff\xdb\x00\x10" + bytes(14), "DQT segment is malformed"),
    (b"\xff\xd8\xff\xe0\x00\x03\x00\xff\xd9", "no frame"),
])
def test_unusable_jpeg_headers_are_named(data, message):
    with pytest.raises(ValueError, match=message):
        lattice_config([data], "rgb")


def test_grey_jpeg_has_no_rgb_lattice(he_image):
    grey = np.ascontiguousarray(he_image[:64, :64, 1])
    with pytest.raises(ValueError, match="1 components"):
        lattice_config([imagecodecs.jpeg_encode(grey, level=50)], "ycbcr")


def test_the_filter_through_both_registries(sources):
    lattice, decoded = sources["rgb"]
    config = {"id": "dlwsi_jpeg_lattice", **lattice.as_dict()}
    codec = numcodecs.get_codec(config)
    assert numcodecs.get_codec(codec.get_config()).get_config() == codec.get_config()
    assert codec.encode(decoded) is decoded
    assert np.array_equal(codec.decode(decoded), snap(decoded, lattice))

    # the stores below name no model: the installed default codes them
    copy = decode_batch(encode_batch([decoded], resolve(None, 8)))[0]
    expected = snap(copy, lattice)
    v3 = zarr.create_array(zarr.storage.MemoryStore(), shape=decoded.shape,
                           chunks=(3, 256, 256), shards=(3, 512, 512), dtype="uint8",
                           fill_value=255,
                           filters=[{"name": "dlwsi_jpeg_lattice",
                                     "configuration": lattice.as_dict()}],
                           serializer={"name": "dlwsi", "configuration": {"quality": 8}},
                           compressors=None)
    v3[:] = decoded
    plain = zarr.create_array(zarr.storage.MemoryStore(), shape=decoded.shape,
                              chunks=(3, 256, 256), dtype="uint8", fill_value=255,
                              serializer={"name": "dlwsi", "configuration": {"quality": 8}},
                              compressors=None)
    plain[:] = decoded
    chunk = plain[:, :256, :256]
    assert np.array_equal(v3[:, :256, :256], snap(chunk, lattice))
    assert ssim(v3[:], decoded) > ssim(plain[:], decoded)
    store = zarr.storage.MemoryStore()
    v2 = zarr.create_array(store, shape=decoded.shape, chunks=(3, 512, 512), dtype="uint8",
                           fill_value=255, zarr_format=2, filters=[codec],
                           compressors={"id": "dlwsi", "quality": 8})
    v2[:] = decoded
    assert np.array_equal(zarr.open_array(store, mode="r")[:], expected)


def test_slide_headers_give_the_lattice_only_for_jpeg_levels(slides):
    cmu = open_slide(slides / CMU)
    found = read_lattice(cmu.path, cmu.vendor, cmu.width, cmu.height)
    assert found.config is not None and found.config["color"] == "rgb"
    assert found.config["tables"][0][:4] == [27, 18, 17, 27]  # Aperio's "Q=30"
    for rel, reason in [("aperio/TCGA-CR-7395-01A-01-TS1.svs", "not JPEG"),
                        ("tiny_fixtures/boxes.tiff", "not JPEG"),
                        ("dicom/highdicom_sm_image/sm_image.dcm", "not read")]:
        info = open_slide(slides / rel)
        other = read_lattice(info.path, info.vendor, info.width, info.height)
        assert other.config is None and reason in other.reason


def test_the_pixel_check_accepts_the_slide_and_refuses_it_off_grid(slides):
    cmu = open_slide(slides / CMU)
    found = read_lattice(cmu.path, cmu.vendor, cmu.width, cmu.height)
    codec = numcodecs.get_codec({"id": "dlwsi_jpeg_lattice", **found.config})
    on_grid = [read_rgb(cmu, x, y, 256, 256) for x, y in [(512, 512), (1024, 2048)]]
    off_grid = [read_rgb(cmu, x + 3, y + 5, 256, 256) for x, y in [(512, 512), (1024, 2048)]]
    assert close_share(codec, on_grid) > 0.97
    assert close_share(codec, off_grid) < MIN_CLOSE - 0.1
    tcga = open_slide(slides / "aperio/TCGA-CR-7395-01A-01-TS1.svs")  # JPEG 2000 pixels
    assert close_share(codec, [read_rgb(tcga, 1024, 1024, 256, 256)]) < MIN_CLOSE - 0.1


def test_generic_tiled_jpeg_tiff_in_ycbcr(he_image, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "ycbcr.tiff"
    tifffile.imwrite(path, he_image[:768, :768], tile=(256, 256), compression="jpeg",
                     compressionargs={"level": 60}, photometric="ycbcr",
                     subsampling=(2, 2))
    info = open_slide(path)
    found = read_lattice(info.path, info.vendor, info.width, info.height)
    assert found.config is not None and found.config["subsampled"], found.reason
    codec = numcodecs.get_codec({"id": "dlwsi_jpeg_lattice", **found.config})
    assert close_share(codec, [read_rgb(info, 0, 0, 512, 512)]) > MIN_CLOSE



#: The filter's output for a fixed input, pinned: stored chunks are read through it for
#: years, so its arithmetic must never drift (docs/reference/codec.md specifies it).
GOLDEN_SNAP = {
    ("rgb", False): "a93b15d6ee08bae6f802c03e8d3a39e08b8db4ea1861d50e04e79d9ca56489eb",
    ("ycbcr", False): "f8d08a943e6a94ccc7006ce5a3a6585aaa6c48155963ee8a2fb6f87363ba2d7c",
    ("ycbcr", True): "b3c4a8081babcb7ad742e9d36b22c01dcd2235b55d0947a1db0d421606e58455",
}
GOLDEN_PROGRAM = """
import hashlib, json
import numpy as np
from numcodecs_dlwsi.jpeg_lattice import JpegLattice, snap
tables = (tuple(range(1, 65)), tuple(range(2, 130, 2)), tuple(range(3, 195, 3)))
x = np.random.default_rng(2026).integers(0, 256, (3, 64, 72), dtype=np.uint8)
print(json.dumps({f"{c} {s}": hashlib.sha256(snap(x, JpegLattice(tables, c, s)).tobytes())
                  .hexdigest() for c, s in (("rgb", False), ("ycbcr", False), ("ycbcr", True))}))
"""


@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_filter_is_bit_identical_whatever_the_blas_threads(threads):
    """Exact integer arithmetic in float64: the same pixels with one BLAS thread or two
    (a float32 version was not), and the same as when the format was fixed."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads}
    proc = subprocess.run([sys.executable, "-c", GOLDEN_PROGRAM], capture_output=True,
                          text=True, env=env, timeout=120, check=True)
    got = json.loads(proc.stdout)
    assert got == {f"{c} {s}": digest for (c, s), digest in GOLDEN_SNAP.items()}
