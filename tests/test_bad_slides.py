"""Bad slides and bad stores: every one gets a one-line error and a non-zero exit status
(or, read through zarr, a clean exception), never a traceback, never made-up pixels,
and never a store that claims to be complete.

Damaged slides are made in ``tmp_path`` from the real ones in ``../shared/data/slides``
(truncated, tile data zeroed or overwritten, directory intact but tiles past the end of
the file); non-slide files get slide extensions. Stores are converted from the tiny
DICOM slide, then given a weights hash of another model or a chunk of a future
bitstream version. Most runs call ``ngff_convert.cli.main`` in-process (the same code
path as the command, minus seconds of start-up); one runs the real command.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from ngff_helpers import assert_one_line_error

from ngff_convert import cli
from numcodecs_dlwsi import ModelNotAvailableError, bitstream

CMU = "aperio/CMU-1-Small-Region.svs"
TCGA = "aperio/TCGA-CR-7395-01A-01-TS1.svs"
SMALL = "dicom/highdicom_sm_image/sm_image.dcm"
NONCONFORMANT = "nonconformant/pathml_small_dicom_TCGA-XK-AAJU.dcm"


def run_main(capsys, monkeypatch, *args: object) -> subprocess.CompletedProcess:
    """``ngff-convert ARGS`` in this process: (returncode, stdout, stderr)."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # cli may silence it
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_not_complete(path: Path) -> None:
    """Nothing there, or a store without multiscales and with ``complete: false``."""
    for meta in list(path.rglob("zarr.json")) + list(path.rglob(".zattrs")):
        attrs = json.loads(meta.read_text())
        attrs = attrs.get("attributes", attrs)
        assert "multiscales" not in attrs and "multiscales" not in attrs.get("ome", {}), meta
        assert attrs.get("ngff_convert", {}).get("complete") in (None, False), meta


# ---------------------------------------------------------------------------- slides


@pytest.mark.parametrize("name, fraction", [(CMU, 0.001), (CMU, 0.4), (CMU, 0.99),
                                            (TCGA, 0.5), (TCGA, 0.9995)])
def test_truncated_svs(slides, tmp_path, capsys, monkeypatch, name, fraction):
    data = (slides / name).read_bytes()
    src = tmp_path / "cut.svs"
    src.write_bytes(data[:int(len(data) * fraction)])
    proc = run_main(capsys, monkeypatch, src, tmp_path / "out.zarr", "--codec", "jpeg",
                    "--no-progress")
    assert_one_line_error(proc, "cut.svs")
    assert_not_complete(tmp_path / "out.zarr")


@pytest.mark.parametrize("damage", ["zeros", "garbage"])
def test_corrupted_tile_data(slides, tmp_path, capsys, monkeypatch, damage):
    """Level-0 JPEG tiles zeroed / overwritten with random bytes (directory intact)."""
    data = bytearray((slides / CMU).read_bytes())
    rng = np.random.default_rng(0)
    for start in range(300_000, 1_200_000, 60_000):
        data[start:start + 4000] = (bytes(4000) if damage == "zeros" else
                                    rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    src = tmp_path / "damaged.svs"
    src.write_bytes(bytes(data))
    proc = run_main(capsys, monkeypatch, src, tmp_path / "out.zarr", "--codec", "jpeg",
                    "--no-progress")
    assert_one_line_error(proc, "damaged.svs", "damaged or truncated")
    assert_not_complete(tmp_path / "out.zarr")


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory, he_image) -> Path:
    """A 4-level tiled JPEG TIFF pyramid of real H&E (generic-tiff for OpenSlide)."""
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tiff"
    image = np.ascontiguousarray(np.tile(he_image, (2, 2, 1))[:1536, :1536])
    with tifffile.TiffWriter(path) as tif:
        for k in range(4):
            level = image[::2**k, ::2**k]
            tif.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                      subfiletype=1 if k else 0)  # OpenSlide wants reduced images marked
    return path


def test_damaged_level0_fails_midway_and_store_stays_incomplete(
        pyramid_tiff, tmp_path, capsys, monkeypatch):
    """The thumbnail (lower levels) reads fine, so the store is created; then level-0
    tiles fail. The error is one line, the store says incomplete, --resume fails again."""
    import tifffile

    data = bytearray(pyramid_tiff.read_bytes())
    with tifffile.TiffFile(pyramid_tiff) as tif:
        page = tif.pages[0]
        for offset, count in list(zip(page.dataoffsets, page.databytecounts,
                                      strict=True))[10:20]:
            data[offset:offset + count] = bytes(count)
    src = tmp_path / "damaged.tiff"
    src.write_bytes(bytes(data))
    out = tmp_path / "out.zarr"
    args = [src, out, "--codec", "jpeg", "--no-progress", "--workers", "1", "--shard", "1"]
    proc = run_main(capsys, monkeypatch, *args)
    assert_one_line_error(proc, "damaged.tiff", "damaged or truncated")
    work = tmp_path / "out.zarr.incomplete"  # written beside the target until complete
    assert (work / "zarr.json").exists()  # it failed after the store was created ...
    assert_not_complete(work)  # ... which does not claim to be an image
    assert not out.exists()  # and nothing takes the target's name
    assert_one_line_error(run_main(capsys, monkeypatch, "info", out), "incomplete")
    assert_one_line_error(run_main(capsys, monkeypatch, *args, "--resume"), "damaged.tiff")
    assert_not_complete(work)
    assert not out.exists()


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, content", [
    ("notes.svs", b"hello, this is not a slide\n" * 20),
    ("empty.ndpi", b""),
    ("noise.ndpi", np.random.default_rng(1).integers(0, 256, 50_000, np.uint8).tobytes()),
    ("picture.svs", None),  # a PNG with a slide extension
    ("tiff-magic-only.svs", b"II*\x00" + bytes(60)),
    ("bigtiff-header.ndpi", b"II+\x00\x08\x00\x00\x00" + (1 << 40).to_bytes(8, "little")),
    ("dicom-preamble.dcm", bytes(128) + b"DICM" + bytes(64)),
])
def test_non_slides_with_slide_extensions(tmp_path, capsys, monkeypatch, name, content):
    src = tmp_path / name
    src.write_bytes(_png_bytes() if content is None else content)
    proc = run_main(capsys, monkeypatch, src, tmp_path / "out.zarr", "--codec", "jpeg")
    assert_one_line_error(proc, name)
    assert not (tmp_path / "out.zarr").exists()


def test_nonconformant_dicom_everywhere(slides, tmp_path, capsys, monkeypatch, good_store):
    """Converting it is refused (see test_ngff_bad_input); so is verifying against it,
    under its own name and renamed to .svs."""
    renamed = tmp_path / "renamed.svs"
    shutil.copy(slides / NONCONFORMANT, renamed)
    for src in (slides / NONCONFORMANT, renamed):
        assert_one_line_error(run_main(capsys, monkeypatch, "verify", src, good_store,
                                       "--no-progress"), src.name)
        assert_one_line_error(run_main(capsys, monkeypatch, src, tmp_path / "o.zarr"),
                              src.name)
        assert not (tmp_path / "o.zarr").exists()


# ---------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, slides) -> Path:
    """The tiny DICOM slide in dlwsi, one object per chunk (so chunks can be edited)."""
    out = tmp_path_factory.mktemp("stores") / "good.zarr"
    proc = subprocess.run([sys.executable, "-m", "ngff_convert", slides / SMALL, out,
                           "--shard", "1", "--glass", "keep", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _chunk_objects(store: Path) -> list[Path]:
    return sorted(p for p in (store / "0" / "c").rglob("*") if p.is_file())


def _reseal(chunk: bytes) -> bytes:
    at = 8 + chunk[7] + 20
    crc = zlib.crc32(chunk[at + 4:], zlib.crc32(chunk[:at]))
    return chunk[:at] + struct.pack("<I", crc) + chunk[at + 4:]


def _edit_store(good: Path, tmp_path: Path, kind: str) -> Path:
    store = tmp_path / f"{kind}.zarr"
    shutil.copytree(good, store)
    chunk_path = _chunk_objects(store)[0]
    chunk = bytearray(chunk_path.read_bytes())
    if kind == "other-weights":
        meta = json.loads((store / "0" / "zarr.json").read_text())
        config = meta["codecs"][0]["configuration"]
        config["model_hash"] = "5b0132aea822786573a2be487b673456d35a39bff9090cf27e2fb79deaaa4490" \
            if not config["model_hash"].startswith("5b01") else "0" * 64
        (store / "0" / "zarr.json").write_text(json.dumps(meta))
    elif kind == "future-version":
        chunk[4] = bitstream.FORMAT_VERSION + 1
        chunk_path.write_bytes(_reseal(bytes(chunk)))
    elif kind == "chunk-from-other-weights":
        chunk[8 + chunk[7]] ^= 0xFF  # the weights-hash prefix in the chunk header
        chunk_path.write_bytes(_reseal(bytes(chunk)))
    elif kind == "bit-flip":
        chunk[len(chunk) // 2] ^= 0x10
        chunk_path.write_bytes(bytes(chunk))
    elif kind == "truncated-chunk":
        chunk_path.write_bytes(bytes(chunk[:len(chunk) // 2]))
    elif kind == "not-a-chunk":
        chunk_path.write_bytes(_png_bytes())
    return store


STORE_DAMAGE = {
    "other-weights": "refusing to decode",
    "future-version": f"version {bitstream.FORMAT_VERSION + 1} is not supported",
    "chunk-from-other-weights": "was written by model",
    "bit-flip": "checksum mismatch",
    "truncated-chunk": "truncated",
    "not-a-chunk": "not a dlwsi chunk",
}


@pytest.mark.parametrize("kind", list(STORE_DAMAGE))
def test_bad_stores_give_no_pixels(slides, good_store, tmp_path, capsys, monkeypatch, kind):
    store = _edit_store(good_store, tmp_path, kind)
    words = STORE_DAMAGE[kind]
    # verify decodes every chunk: one line, exit 1
    proc = run_main(capsys, monkeypatch, "verify", slides / SMALL, store, "--no-progress")
    assert_one_line_error(proc, words)
    # zarr (the codec through its entry point): a clean exception, not an array
    array = zarr.open_group(store, mode="r")["0"]
    with pytest.raises(ValueError, match=words) as raised:
        array[:]
    if "weights" in kind:
        assert isinstance(raised.value, ModelNotAvailableError)
    # info reads metadata only and still describes the store
    assert run_main(capsys, monkeypatch, "info", store).returncode == 0


def test_bad_store_through_the_real_command(slides, good_store, tmp_path):
    """The same, as a user runs it: exit status 1, one line, no traceback."""
    store = _edit_store(good_store, tmp_path, "future-version")
    proc = subprocess.run([sys.executable, "-m", "ngff_convert", "verify", slides / SMALL,
                           store, "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert_one_line_error(proc, f"version {bitstream.FORMAT_VERSION + 1} is not supported",
                          "upgrade")
