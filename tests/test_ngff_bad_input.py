"""ngff-convert on bad input: one clear line on stderr, exit status != 0, no traceback,
and nothing left behind that looks like a valid image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ngff_helpers import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"
SMALL = "dicom/highdicom_sm_image/sm_image.dcm"  # a tiny valid slide: fast conversions



def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ngff_convert", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())


def assert_not_an_image(path: Path) -> None:
    """Nothing there, or a store without the multiscales metadata that marks completion."""
    for meta in list(path.rglob("zarr.json")) + list(path.rglob(".zattrs")):
        attrs = json.loads(meta.read_text())
        attrs = attrs.get("attributes", attrs)
        assert "multiscales" not in attrs and "multiscales" not in attrs.get("ome", {}), meta


def test_missing_file(tmp_path):
    proc = run_cli(tmp_path / "nope.svs", tmp_path / "out.zarr")
    assert_one_line_error(proc, "no such file")
    assert not (tmp_path / "out.zarr").exists()


def test_nonconformant_dicom_is_refused(slides, tmp_path):
    src = slides / "nonconformant" / "pathml_small_dicom_TCGA-XK-AAJU.dcm"
    proc = run_cli(src, tmp_path / "out.zarr")
    assert_one_line_error(proc, "OpenSlide cannot read it", "image flavor")
    assert not (tmp_path / "out.zarr").exists()


def test_not_a_slide(slides, tmp_path):
    png = tmp_path / "picture.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    proc = run_cli(png, tmp_path / "out.zarr")
    assert_one_line_error(proc, "not a slide format OpenSlide can read")
    assert not (tmp_path / "out.zarr").exists()


def test_unsupported_pixel_format(tmp_path):
    """A tiled TIFF OpenSlide opens but cannot decode (32-bit float samples)."""
    tifffile = pytest.importorskip("tifffile")
    src = tmp_path / "float.tiff"
    tifffile.imwrite(src, np.zeros((512, 512), np.float32), tile=(256, 256))
    proc = run_cli(src, tmp_path / "out.zarr")
    assert_one_line_error(proc, "unsupported pixel format")
    assert not (tmp_path / "out.zarr").exists()


def test_existing_output_refused_unless_overwrite(slides, tmp_path):
    out = tmp_path / "out.zarr"
    assert run_cli(slides / SMALL, out, "--codec", "jpeg", "--no-progress").returncode == 0
    before = sorted(p.name for p in out.rglob("*"))
    proc = run_cli(slides / SMALL, out, "--codec", "jpeg")
    assert_one_line_error(proc, "already exists", "--overwrite")
    assert sorted(p.name for p in out.rglob("*")) == before
    # an unrelated directory is refused too
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli(slides / SMALL, other, "--codec", "jpeg"), "already exists")
    assert (other / "keep.txt").read_text() == "mine"
    proc = run_cli(slides / SMALL, out, "--codec", "jpeg", "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr


def test_unwritable_destination(slides, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_cli(slides / SMALL, blocker / "out.zarr", "--codec", "jpeg")
    assert_one_line_error(proc, "cannot write there")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(slides, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_one_line_error(run_cli(slides / SMALL, ro / "out.zarr", "--codec", "jpeg"),
                              "cannot write there")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("args, words", [
    (["--quality", "250"], ["codec dlwsi", "quality"]),
    (["--ngff", "0.4", "--codec", "jpeg"], ["needs --ngff 0.5"]),
    (["--saturation-threshold", "high"], ["--saturation-threshold"]),
    (["--overwrite", "--resume"], ["contradict"]),
    (["--chunk", "500"], ["--chunk"]),
    (["--codec", "jpeg", "--chunk-ssim", "0.95"], ["--chunk-ssim", "dlwsi"]),
    (["--chunk-ssim", "1.5"], ["codec dlwsi", "target_ssim"]),
    (["--target-ssim", "1.5"], ["--target-ssim", "between 0 and 1"]),
    (["--quality", "5", "--target-ssim", "0.9"], ["--quality", "--target-ssim", "one of"]),
    (["--chunk-ssim", "0.9", "--target-ssim", "0.9"], ["--chunk-ssim", "one of"]),
    (["--codec", "jpeg", "--model", "he-mshl-v3"], ["--model", "--codec jpeg"]),
    (["--model", "he-mshl-v9"], ["he-mshl-v9"]),
])
def test_bad_options(slides, tmp_path, args, words):
    proc = run_cli(slides / SMALL, tmp_path / "out.zarr", *args)
    assert_one_line_error(proc, *words)
    assert_not_an_image(tmp_path / "out.zarr")


def test_unknown_codec_is_a_usage_error(slides, tmp_path):
    proc = run_cli(slides / SMALL, tmp_path / "out.zarr", "--codec", "webp")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_and_verify_on_bad_stores(slides, tmp_path):
    assert_one_line_error(run_cli("info", tmp_path / "missing.zarr"), "no such store")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.txt").write_text("x")
    assert_one_line_error(run_cli("info", plain), "not")
    assert_one_line_error(run_cli("verify", tmp_path / "nope.svs", plain), "not")
