"""A zero-loss level 0 (``--level0 transcode``): the scanner's own JPEG tiles,
recompressed losslessly as JPEG-XL, on the real Aperio slide CMU-1-Small-Region.

- Level 0 stores one chunk per scanner tile (240²), sharded, ``dlwsi_jpeg_tile`` + crc32c.
- A fresh process with nothing imported but zarr reads level 0 as exactly the pixels
  OpenSlide decodes from the slide (glass tiles: the fill value).
- ``verify`` proves every tile: its JPEG byte for byte, its pixels exactly;
  ``extract`` gives back a tile's JPEG; ``check`` locates a damaged tile.
- The default (``--level0 auto``) never keeps a lossy level 0 larger than the zero-loss one.
- Slides without JPEG tiles, and NGFF 0.4, are refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ngff_helpers import assert_one_line_error

CMU = "aperio/CMU-1-Small-Region.svs"  # 2220 x 2967, 240² JPEG tiles, 10 x 13 of them
TCGA = "aperio/TCGA-CR-7395-01A-01-TS1.svs"  # JPEG 2000 tiles
DICOM = "dicom/highdicom_sm_image/sm_image.dcm"  # uncompressed frames


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ngff_convert", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def source_tiles(slide: Path) -> dict[tuple[int, int], bytes]:
    """Every level-0 tile's complete JPEG (tables merged), read here with tifffile."""
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        columns = -(-page.imagewidth // page.tilewidth)
        tables = page.jpegtables
        out = {}
        for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts,
                                                    strict=True)):
            tif.filehandle.seek(offset)
            tile = tif.filehandle.read(count)
            out[divmod(index, columns)] = tile[:2] + tables[2:-2] + tile[2:]
    return out


@pytest.fixture(scope="module")
def zero_loss(slides, tmp_path_factory) -> Path:
    """CMU-1 with a zero-loss level 0 (lower levels: JPEG, for speed), glass dropped."""
    out = tmp_path_factory.mktemp("zero") / "cmu.zarr"
    proc = run_cli(slides / CMU, out, "--level0", "transcode", "--codec", "jpeg",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "level 0: zero loss" in proc.stderr
    return out


def test_level0_holds_the_scanner_tiles(zero_loss):
    meta = json.loads((zero_loss / "0" / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    assert sharding["configuration"]["chunk_shape"] == [3, 240, 240]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 2160, 2160]  # 9x9 tiles
    assert sharding["configuration"]["codecs"] == [
        {"name": "dlwsi_jpeg_tile", "configuration": {"colorspace": "rgb"}},
        {"name": "crc32c"}]
    attrs = json.loads((zero_loss / "zarr.json").read_text())["attributes"]
    level0 = attrs["ngff_convert"]["settings"]["level0"]
    assert level0["mode"] == "transcode" and level0["requested"] == "transcode"
    tiles = level0["tiles"]
    assert tiles["transcoded"] + tiles["not_stored"] == 130 and tiles["kept_as_jpeg"] == 0
    assert 0 < tiles["not_stored"] < 130  # glass tiles are not stored


READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import zarr
    level0 = zarr.open_group(sys.argv[1], mode="r")["0"][:]
    np.save(sys.argv[2], level0)
    print(json.dumps(sorted(m for m in sys.modules
                            if m.split(".")[0] in ("ngff_convert", "numcodecs_dlwsi"))))
""")


def test_fresh_process_reads_the_source_pixels(slides, zero_loss, tmp_path):
    import openslide

    proc = subprocess.run([sys.executable, "-c", READER, zero_loss, tmp_path / "l0.npy"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    level0 = np.load(tmp_path / "l0.npy")
    source = np.asarray(openslide.OpenSlide(slides / CMU).read_region(
        (0, 0), 0, (2220, 2967)).convert("RGB")).transpose(2, 0, 1)
    attrs = json.loads((zero_loss / "zarr.json").read_text())["attributes"]
    glass = 0
    for row in range(13):
        for column in range(10):
            ys, xs = slice(row * 240, row * 240 + 240), slice(column * 240, column * 240 + 240)
            if np.array_equal(level0[:, ys, xs], source[:, ys, xs]):
                continue
            assert (level0[:, ys, xs] == 255).all(), (row, column)  # a glass tile
            glass += 1
    assert glass == attrs["ngff_convert"]["settings"]["level0"]["tiles"]["not_stored"]


def test_verify_extract_and_check(slides, zero_loss, tmp_path):
    proc = run_cli("verify", slides / CMU, zero_loss, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    tiles = report["level0_tiles"]
    assert tiles["stored"] == tiles["jpeg_identical"] == tiles["pixels_identical"] > 0
    assert tiles["differing"] == []
    assert report["levels"][0]["psnr_tissue"] == float("inf")
    # extract gives back a tile's JPEG, byte for byte
    wanted = source_tiles(slides / CMU)
    out = tmp_path / "tile.jpg"
    proc = run_cli("extract", zero_loss, 6, 4, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(wanted[6, 4]).digest()
    assert_one_line_error(run_cli("extract", zero_loss, 6, 4, "-o", out), "already exists")
    assert_one_line_error(run_cli("extract", zero_loss, 13, 0, "-o", tmp_path / "x.jpg"),
                          "outside")
    assert_one_line_error(run_cli("extract", zero_loss, 0, 0, "-o", tmp_path / "x.jpg"),
                          "not stored")
    # check decodes every tile; a damaged one is located
    assert run_cli("check", zero_loss, "--no-progress").returncode == 0
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(zero_loss, damaged)
    shard = damaged / "0" / "c" / "0" / "0" / "0"
    index = np.frombuffer(shard.read_bytes()[-(81 * 16 + 4):-4], "<u8").reshape(9, 9, 2)
    offset, length = (int(v) for v in index[6, 4])
    data = bytearray(shard.read_bytes())
    data[offset + length // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("check", damaged, "--json", "--no-progress")
    assert proc.returncode == 1
    assert [(d["level"], d["chunk"]) for d in json.loads(proc.stdout)["damaged"]] == \
        [("0", [6, 4])]
    assert_one_line_error(run_cli("extract", damaged, 6, 4, "-o", tmp_path / "y.jpg"),
                          "damaged")


def test_glass_keep_and_unsharded(slides, tmp_path):
    """--glass keep stores every tile: level 0 is the slide, pixel for pixel; --shard 1
    stores one object per tile."""
    import openslide
    import zarr

    out = tmp_path / "keep.zarr"
    proc = run_cli(slides / CMU, out, "--level0", "transcode", "--codec", "jpeg",
                   "--glass", "keep", "--shard", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "0" / "c").rglob("*"))) - len(
        [p for p in (out / "0" / "c").rglob("*") if p.is_dir()]) == 130
    level0 = zarr.open_group(out, mode="r")["0"][:]
    source = np.asarray(openslide.OpenSlide(slides / CMU).read_region(
        (0, 0), 0, (2220, 2967)).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(level0, source)


def test_auto_plan_on_the_real_tiles(slides):
    """The default's rule, on CMU-1's own tiles: zero loss when it is not larger than the
    lossy estimate, or when no lossy quality reaches the target."""
    from ngff_convert.jpeg_tiles import find_jpeg_tiles
    from ngff_convert.slide import open_slide
    from ngff_convert.transcode import plan_level0

    tiles = find_jpeg_tiles(open_slide(slides / CMU))
    boxes = [(960, 720, 480, 480)]
    cheap = plan_level0("auto", tiles, 3, 0.3, boxes, "dlwsi")
    assert cheap.mode == "lossy" and cheap.zero_loss_bpp > 0.3
    costly = plan_level0("auto", tiles, 3, 8.0, boxes, "dlwsi")
    assert costly.mode == "transcode" and costly.zero_loss_bpp < 8.0
    unreached = plan_level0("auto", tiles, 3, 0.3, boxes, "dlwsi", target_reached=False)
    assert unreached.mode == "transcode"
    assert plan_level0("auto", tiles, 3, None, boxes, "dlwsi").mode == "lossy"  # --quality
    assert plan_level0("auto", tiles, 2, 8.0, boxes, "dlwsi").mode == "lossy"  # NGFF 0.4


@pytest.mark.parametrize("slide, words", [(TCGA, "not JPEG"), (DICOM, "not JPEG baseline")])
def test_slides_without_jpeg_tiles_are_refused(slides, tmp_path, slide, words):
    out = tmp_path / "out.zarr"
    proc = run_cli(slides / slide, out, "--level0", "transcode", "--quality", "3",
                   "--no-progress")
    assert_one_line_error(proc, "--level0 transcode", words)
    assert not out.exists() and not (tmp_path / "out.zarr.incomplete").exists()


def test_dicom_jpeg_frames_are_kept(slides, tmp_path):
    """A DICOM WSI's JPEG baseline frames (OpenSlide's own fixture: a 16x16 crop of CMU-1
    in one 64x64 frame) are kept like TIFF tiles: verify proves the JPEG and the pixels."""
    import pydicom

    slide = slides / "tiny_fixtures/boxes_dicom/boxes_0.dcm"
    out = tmp_path / "dicom.zarr"
    proc = run_cli(slide, out, "--level0", "transcode", "--codec", "jpeg", "--glass", "keep",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(run_cli("verify", slide, out, "--json", "--no-progress").stdout)
    tiles = report["level0_tiles"]
    assert tiles["stored"] == tiles["jpeg_identical"] == tiles["pixels_identical"] == 1
    frame = pydicom.encaps.generate_frames(pydicom.dcmread(slide).PixelData,
                                           number_of_frames=1)
    extracted = tmp_path / "frame.jpg"
    assert run_cli("extract", out, 0, 0, "-o", extracted).returncode == 0
    assert extracted.read_bytes() == next(frame)


def test_ngff_04_is_refused(slides, tmp_path):
    proc = run_cli(slides / CMU, tmp_path / "out.zarr", "--level0", "transcode",
                   "--ngff", "0.4", "--quality", "3", "--no-progress")
    assert_one_line_error(proc, "--level0 transcode", "--ngff 0.5")


@pytest.mark.parametrize("kind", ["lossless", "12-bit"])
def test_jpeg_that_jpegxl_cannot_take_is_kept_as_is(kind):
    """A tile libjxl refuses (lossless or 12-bit JPEG) is stored as the JPEG itself:
    still zero loss, decoded as a JPEG decoder decodes it."""
    import imagecodecs
    import numcodecs

    pixels = (np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)
    if kind == "lossless":
        jpeg = bytes(imagecodecs.jpeg8_encode(pixels, lossless=True))
        expected = imagecodecs.jpeg8_decode(jpeg)
    else:
        jpeg = bytes(imagecodecs.jpeg8_encode(pixels.astype(np.uint16) * 16, level=90,
                                              bitspersample=12))
        expected = None
    codec = numcodecs.get_codec({"id": "dlwsi_jpeg_tile",
                                 "colorspace": "rgb" if kind == "lossless" else "ycbcr"})
    chunk = bytes(codec.encode(np.frombuffer(jpeg, np.uint8)))
    assert chunk == jpeg  # kept as it is
    assert codec.jpeg(chunk) == jpeg
    if expected is not None:
        assert np.array_equal(codec.decode(chunk), expected.transpose(2, 0, 1))
    else:  # not 8-bit RGB: a clear error, never made-up pixels
        with pytest.raises(ValueError, match="not 8-bit RGB"):
            codec.decode(chunk)
    with pytest.raises(TypeError, match="not pixels"):
        codec.encode(pixels)


@pytest.mark.parametrize("codec", ["jpegxl", "avif"])
def test_classical_codec_stores_open_with_nothing_but_zarr(slides, tmp_path, codec):
    """A store written with a classical codec opens in a fresh process that imports
    nothing but zarr (the codecs come in through the package's entry points)."""
    out = tmp_path / f"{codec}.zarr"
    proc = run_cli(slides / CMU, out, "--codec", codec, "--quality", "80", "--level0",
                   "lossy", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", READER, out, tmp_path / "l0.npy"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    level0 = np.load(tmp_path / "l0.npy")
    assert level0.shape == (3, 2967, 2220) and 0 < level0.mean() < 255


def test_killed_zero_loss_conversion_resumes(slides, zero_loss, tmp_path):
    """Killed after some tiles were stored, --resume finishes level 0, reports every
    tile (the interrupted run's too) and the result holds the source's tiles exactly."""
    from ngff_helpers import kill_once_written

    out = tmp_path / "killed.zarr"
    args = [slides / CMU, out, "--level0", "transcode", "--codec", "jpeg", "--shard", "1",
            "--workers", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "ngff_convert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tiles = tmp_path / "killed.zarr.incomplete" / "0" / "c"
    kill_once_written(proc, lambda: sum(p.is_file() for p in tiles.rglob("*"))
                      if tiles.exists() else 0, at_least=10)
    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    whole = json.loads((zero_loss / "zarr.json").read_text())["attributes"]
    assert attrs["ngff_convert"]["settings"]["level0"]["tiles"] == \
        whole["ngff_convert"]["settings"]["level0"]["tiles"]
    report = json.loads(run_cli("verify", slides / CMU, out, "--json", "--no-progress").stdout)
    tiles_report = report["level0_tiles"]
    assert tiles_report["differing"] == [] and tiles_report["stored"] == \
        tiles_report["jpeg_identical"] == tiles_report["pixels_identical"] > 0
