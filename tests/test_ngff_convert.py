"""ngff-convert on the real slides in ../shared/data/slides, read back in fresh processes.

Every conversion runs the command in its own process (``python -m ngff_convert``), and
every result is opened by a second process with ``zarr.open``, ``ome_zarr.reader`` and
``ome-zarr-models``, as a user's tools would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"

CMU = "aperio/CMU-1-Small-Region.svs"
TCGA = "aperio/TCGA-CR-7395-01A-01-TS1.svs"
DICOM = "dicom/highdicom_sm_image/sm_image.dcm"
TIFF = "tiny_fixtures/boxes.tiff"
# (relative path, level-0 width x height, micrometres per pixel or None)
REAL_SLIDES = {CMU: ((2220, 2967), 0.499), TCGA: ((4443, 3567), None),
               DICOM: ((50, 50), 0.499), TIFF: ((300, 250), 352.77777983377013)}



def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ngff-convert in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "ngff_convert", *map(str, args)],
                          capture_output=True, text=True, timeout=900, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"ngff-convert {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ngff_convert.codecs import register_image_codecs
    register_image_codecs()  # baseline codecs only; dlwsi comes through its entry point
    path = sys.argv[1]
    group = zarr.open_group(path, mode="r")
    attrs = dict(group.attrs)
    fmt = group.metadata.zarr_format
    if fmt == 3:
        from ome_zarr_models.v05 import Image
    else:
        from ome_zarr_models.v04 import Image
    Image.from_zarr(group)  # raises if the metadata does not validate
    ms = attrs["ome"]["multiscales"][0] if fmt == 3 else attrs["multiscales"][0]
    omero = attrs["ome"]["omero"] if fmt == 3 else attrs["omero"]
    nodes = list(Reader(parse_url(path))())
    node = nodes[0]
    top = np.asarray(node.data[-1])
    arrays = {d["path"]: zarr.open_array(path, path=d["path"], mode="r")
              for d in ms["datasets"]}
    print(json.dumps({
        "zarr_format": fmt,
        "shapes": [list(a.shape) for a in arrays.values()],
        "chunks": [list(a.chunks) for a in arrays.values()],
        "shards": [list(a.shards) if fmt == 3 and a.shards else None
                   for a in arrays.values()],
        "scales": [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]],
        "axes": ms["axes"],
        "colors": [c["color"] for c in omero["channels"]],
        "windows": [c["window"] for c in omero["channels"]],
        "reader_shapes": [list(d.shape) for d in node.data],
        "reader_channels": node.metadata.get("channel_names"),
        "top_mean": float(top.mean()),
        "openslide_vendor": attrs.get("openslide", {}).get("openslide.vendor"),
        "state": attrs.get("ngff_convert"),
        "groups": sorted(k for k, _ in group.groups()),
        "dlwsi_loaded": "numcodecs_dlwsi" in sys.modules,
    }))
""")


def read_back(path: Path) -> dict:
    """Open a converted store in a fresh process; validate it and describe it."""
    proc = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_shapes(width: int, height: int, chunk: int = 512) -> list[list[int]]:
    shapes = [[3, height, width]]
    while max(shapes[-1][1:]) > chunk:
        shapes.append([3, math.ceil(shapes[-1][1] / 2), math.ceil(shapes[-1][2] / 2)])
    return shapes


@pytest.fixture(scope="module")
def default_stores(slides, tmp_path_factory) -> dict[str, Path]:
    """Each real slide converted with the defaults (dlwsi, NGFF 0.5, glass fill)."""
    out = tmp_path_factory.mktemp("default")
    stores = {}
    for rel in REAL_SLIDES:
        stores[rel] = out / (Path(rel).stem + ".zarr")
        run_cli(slides / rel, stores[rel], "--no-progress")
    return stores


def test_default_keeps_no_lossy_level0_larger_than_zero_loss(slides, default_stores,
                                                             tmp_path):
    """CMU-1 at SSIM 0.95: dlwsi's lossy level 0 is the smaller one, so the default keeps
    it and says why; the zero-loss level 0 (the same whatever codes the levels below)
    is larger."""
    store = default_stores[CMU]
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    level0 = attrs["ngff_convert"]["settings"]["level0"]
    assert level0["requested"] == "auto" and level0["mode"] == "lossy"
    assert level0["lossy_bpp"] < level0["zero_loss_bpp"]
    zero_loss = tmp_path / "zero.zarr"
    run_cli(slides / CMU, zero_loss, "--level0", "transcode", "--codec", "jpeg",
            "--no-progress")
    lossy = sum(p.stat().st_size for p in (store / "0").rglob("*") if p.is_file())
    lossless = sum(p.stat().st_size for p in (zero_loss / "0").rglob("*") if p.is_file())
    assert lossy < lossless
    assert "level 0: lossy" in run_cli("info", store).stdout


@pytest.mark.parametrize("rel", list(REAL_SLIDES))
def test_default_conversion_reads_everywhere(default_stores, rel):
    (width, height), mpp = REAL_SLIDES[rel]
    d = read_back(default_stores[rel])
    assert d["zarr_format"] == 3
    shapes = expected_shapes(width, height)
    assert d["shapes"] == shapes
    assert d["reader_shapes"] == shapes
    assert d["dlwsi_loaded"]  # found by zarr's codec registry in the reading process
    # a level per factor of 2, down to a level that fits one chunk
    assert max(shapes[-1][1:]) <= 512
    assert [a["name"] for a in d["axes"]] == ["c", "y", "x"]
    for k, scale in enumerate(d["scales"]):
        expected = [1.0, (mpp or 1.0) * 2**k, (mpp or 1.0) * 2**k]
        assert scale == pytest.approx(expected)
    units = [a.get("unit") for a in d["axes"][1:]]
    assert units == (["micrometer"] * 2 if mpp else [None, None])
    assert d["colors"] == ["FF0000", "00FF00", "0000FF"]
    assert d["reader_channels"] == ["red", "green", "blue"]
    assert all(w["start"] == 0 and w["end"] == 255 for w in d["windows"])
    assert d["openslide_vendor"] in ("aperio", "dicom", "generic-tiff")
    assert d["state"]["complete"] is True and d["state"]["settings"]["glass"] == "fill"
    # sharded by default, shards of whole 512-pixel chunks
    for chunks, shards in zip(d["chunks"], d["shards"], strict=True):
        assert chunks == [3, 512, 512]
        assert shards is not None and shards[1] % 512 == 0 and shards[2] % 512 == 0
    # label and macro can carry patient identifiers: not stored unless asked for
    assert "associated" not in d["groups"]


def _verify(slides, rel, store) -> dict:
    proc = run_cli("verify", slides / rel, store, "--json", "--no-progress")
    return json.loads(proc.stdout)


@pytest.mark.parametrize("rel", [CMU, TCGA])
def test_verify_default_quality_ssim(slides, default_stores, rel):
    """The requirement: SSIM >= 0.95 vs the source at the default settings (tissue), and
    a store smaller than the source file. The default chooses the slide's rung for that
    SSIM, and the store records the choice."""
    report = _verify(slides, rel, default_stores[rel])
    level0 = report["levels"][0]
    assert report["stored_bytes"] < report["source_bytes"]
    assert level0["ssim_tissue"] >= 0.95, level0
    settings = json.loads((default_stores[rel] / "zarr.json").read_text())[
        "attributes"]["ngff_convert"]["settings"]
    choice = settings["quality_choice"]
    assert choice["target_ssim"] == 0.95 and choice["reached"]
    assert choice["ssim"] == pytest.approx(level0["ssim_tissue"], abs=1e-3)
    for k in range(len(report["levels"])):
        meta = json.loads((default_stores[rel] / str(k) / "zarr.json").read_text())
        inner = {c["name"]: c for c in meta["codecs"][0]["configuration"]["codecs"]}
        assert inner["dlwsi"]["configuration"]["quality"] == choice["quality"]


def _inner_codecs(store: Path, level: int) -> list[str]:
    meta = json.loads((store / str(level) / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]


def test_jpeg_slide_gets_the_lattice_filter_on_level_0_only(slides, default_stores):
    """CMU-1 is Aperio RGB JPEG: level 0 (the scanner's pixels) gets the lattice filter
    before dlwsi; the converter's own downsampled levels are on no JPEG lattice. The
    JPEG 2000 slide gets none."""
    store = default_stores[CMU]
    assert _inner_codecs(store, 0) == ["dlwsi_jpeg_lattice", "dlwsi"]
    assert all(_inner_codecs(store, k) == ["dlwsi"] for k in (1, 2, 3))
    settings = json.loads((store / "zarr.json").read_text())["attributes"][
        "ngff_convert"]["settings"]
    assert settings["jpeg_lattice"]["color"] == "rgb"
    assert settings["jpeg_lattice"]["tables"][0][:4] == [27, 18, 17, 27]
    assert "level 0 is JPEG (RGB, DC step 27)" in settings["jpeg_lattice_note"]
    assert "JPEG lattice: level 0 is JPEG (RGB" in run_cli("info", store).stdout
    assert _inner_codecs(default_stores[TCGA], 0) == ["dlwsi"]
    tcga = json.loads((default_stores[TCGA] / "zarr.json").read_text())["attributes"][
        "ngff_convert"]["settings"]
    assert tcga["jpeg_lattice"] is None and "not JPEG" in tcga["jpeg_lattice_note"]


def test_the_lattice_lets_a_lower_rung_reach_the_target(slides, default_stores, tmp_path):
    """Without the filter the same slide needs a higher rung, and more bytes, for the
    same level-0 tissue SSIM (docs/guides/converter.md has the figures)."""
    off = tmp_path / "off.zarr"
    # level 0 lossy as in the default store (without the filter, the default would keep
    # the scanner's tiles instead: at the higher rung they are the smaller level 0)
    proc = run_cli(slides / CMU, off, "--jpeg-lattice", "off", "--level0", "lossy",
                   "--no-progress")
    assert "JPEG lattice" not in proc.stderr
    assert _inner_codecs(off, 0) == ["dlwsi"]
    with_lattice = json.loads(run_cli("info", default_stores[CMU], "--json").stdout)
    without = json.loads(run_cli("info", off, "--json").stdout)
    assert without["jpeg_lattice"] == "off (--jpeg-lattice off)"
    assert without["quality_choice"]["quality"] > with_lattice["quality_choice"]["quality"]
    assert without["levels"][0]["stored_bytes"] > 1.15 * with_lattice["levels"][0][
        "stored_bytes"]
    assert without["quality_choice"]["ssim"] >= 0.95


def test_target_ssim_chooses_the_lowest_quality_reaching_it(slides, tmp_path):
    """--target-ssim with a baseline codec: the sample is all of CMU-1's tissue chunks, so
    the SSIM it measured is the one verify reports, and one quality lower misses."""
    store = tmp_path / "jpeg.zarr"
    proc = run_cli(slides / CMU, store, "--codec", "jpeg", "--target-ssim", "0.95",
                   "--level0", "lossy", "--no-progress")
    assert "choosing the jpeg quality for level-0 tissue SSIM 0.95 on 21 chunks" in \
        proc.stderr
    choice = json.loads((store / "zarr.json").read_text())[
        "attributes"]["ngff_convert"]["settings"]["quality_choice"]
    assert choice["reached"] and choice["chunks"] == 21
    level0 = _verify(slides, CMU, store)["levels"][0]
    assert level0["ssim_tissue"] == pytest.approx(choice["ssim"], abs=1e-5)
    assert level0["ssim_tissue"] >= 0.95
    lower = tmp_path / "lower.zarr"
    run_cli(slides / CMU, lower, "--codec", "jpeg", "--quality", str(choice["quality"] - 1),
            "--no-progress")
    assert _verify(slides, CMU, lower)["levels"][0]["ssim_tissue"] < 0.95


def test_rate_control_picks_a_rung_per_chunk(slides, tmp_path):
    """--chunk-ssim: chunks of one array carry different rungs, the store names the
    target, and level 0 lands near it (or at the ladder's top)."""
    from numcodecs_dlwsi import bitstream

    store = tmp_path / "rc.zarr"
    run_cli(slides / CMU, store, "--chunk-ssim", "0.94", "--shard", "1", "--no-progress")
    meta = json.loads((store / "0" / "zarr.json").read_text())
    config = next(c for c in meta["codecs"] if c["name"] == "dlwsi")["configuration"]
    assert config["target_ssim"] == 0.94
    rungs = [bitstream.unpack(path.read_bytes())[0].quality
             for path in (store / "0" / "c").rglob("*") if path.is_file()]
    assert len(rungs) > 3 and len(set(rungs)) > 1 and max(rungs) <= config["quality"]
    level0 = _verify(slides, CMU, store)["levels"][0]
    assert level0["ssim_tissue"] >= 0.935, level0
    assert "target_ssim" in run_cli("info", store).stdout


def test_model_option_stores_that_model(slides, tmp_path):
    """--model he-mshl-v3-int8: the store's codec names it, its chunks carry it, the
    quality is chosen for it, and it reads back through zarr like any other."""
    from numcodecs_dlwsi import bitstream

    store = tmp_path / "int8.zarr"
    proc = run_cli(slides / CMU, store, "--model", "he-mshl-v3-int8", "--level0", "lossy",
                   "--shard", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((store / "0" / "zarr.json").read_text())
    config = next(c for c in meta["codecs"] if c["name"] == "dlwsi")["configuration"]
    assert config["model"] == "he-mshl-v3-int8"
    chunk = next(path for path in (store / "0" / "c").rglob("*") if path.is_file())
    assert bitstream.unpack(chunk.read_bytes())[0].model_id == "he-mshl-v3-int8"
    level0 = _verify(slides, CMU, store)["levels"][0]
    assert level0["ssim_tissue"] >= 0.95


def test_verify_reports_every_level_and_sizes(slides, tmp_path):
    store = tmp_path / "cmu-jpeg.zarr"
    run_cli(slides / CMU, store, "--codec", "jpeg", "--quality", "95", "--no-progress")
    report = _verify(slides, CMU, store)
    assert [lv["path"] for lv in report["levels"]] == ["0", "1", "2", "3"]
    for lv in report["levels"]:
        assert lv["ssim_tissue"] >= 0.95 and lv["psnr_tissue"] > 30
        assert 0 < lv["stored_bytes"] < lv["raw_bytes"]
        assert 0.2 < lv["tissue_fraction"] < 0.9  # CMU-1's right side is glass
        # the worst mostly-tissue 512² block: on the chunk grid, inside the level, no
        # better than the mean it is part of
        worst = lv["worst_block"]
        assert worst["size"] == 512 and worst["x"] % 512 == 0 and worst["y"] % 512 == 0
        assert worst["y"] < lv["shape"][1] and worst["x"] < lv["shape"][2]
        assert 0.9 < worst["ssim_tissue"] <= lv["ssim_tissue"]
    assert report["levels"][0]["worst_block"]["blocks_measured"] > 4
    # glass became white: outside tissue the stored image differs from the source
    assert report["levels"][0]["psnr_all"] < report["levels"][0]["psnr_tissue"] - 1
    text = run_cli("verify", slides / CMU, store, "--no-progress").stdout
    assert "SSIM" in text and "source file" in text and "worst block: level 0" in text
    # --min-ssim turns the report into a check
    assert run_cli("verify", slides / CMU, store, "--min-ssim", "0.999", "--no-progress",
                   check=False).returncode == 3


def _tissue_grid(slide: Path, step: int, chunk: int = 512) -> np.ndarray:
    """Which level-0 blocks of ``step`` pixels touch tissue, from the converter's mask."""
    from ngff_convert.slide import open_slide
    from ngff_convert.tissue import mask_downsample, thumbnail, tissue_mask

    info = open_slide(slide)
    ds = mask_downsample(info)
    tissue = tissue_mask(thumbnail(info, ds), ds)
    ny, nx = math.ceil(info.height / step), math.ceil(info.width / step)
    return np.array([[tissue.has_tissue(y * step, x * step, step, step) for x in range(nx)]
                     for y in range(ny)])


@pytest.mark.parametrize("glass", ["drop", "fill"])
def test_glass_chunks_absent_tissue_chunks_present(slides, tmp_path, glass):
    store = tmp_path / f"{glass}.zarr"
    run_cli(slides / CMU, store, "--codec", "jpeg", "--shard", "1", "--glass", glass,
            "--no-progress")
    grid = _tissue_grid(slides / CMU, 512)
    assert grid.any() and not grid.all()
    for y in range(grid.shape[0]):
        for x in range(grid.shape[1]):
            assert (store / "0" / "c" / "0" / str(y) / str(x)).exists() == grid[y, x], (y, x)
    import zarr

    from ngff_convert.codecs import register_image_codecs

    register_image_codecs()
    level0 = zarr.open_array(store / "0", mode="r")
    gy, gx = np.argwhere(~grid)[0]
    assert (level0[:, gy * 512:(gy + 1) * 512, gx * 512:(gx + 1) * 512] == 255).all()
    # a lower level is all-white exactly where its whole level-0 footprint was dropped
    grid1 = _tissue_grid(slides / CMU, 1024)
    for y in range(grid1.shape[0]):
        for x in range(grid1.shape[1]):
            assert (store / "1" / "c" / "0" / str(y) / str(x)).exists() == grid1[y, x]


def test_glass_drop_shards_absent(slides, default_stores):
    """Sharded store: shards without tissue are not written at all."""
    grid = _tissue_grid(slides / TCGA, 2048)
    store = default_stores[TCGA]
    for y in range(grid.shape[0]):
        for x in range(grid.shape[1]):
            assert (store / "0" / "c" / "0" / str(y) / str(x)).exists() == grid[y, x]


def test_glass_modes_differ_as_documented(slides, tmp_path):
    import zarr

    from ngff_convert.codecs import register_image_codecs

    register_image_codecs()
    data, sizes = {}, {}
    for glass in ("keep", "drop", "fill"):
        store = tmp_path / f"{glass}.zarr"
        run_cli(slides / CMU, store, "--codec", "jpeg", "--glass", glass, "--no-progress")
        data[glass] = zarr.open_array(store / "1", mode="r")[:]
        sizes[glass] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert sizes["keep"] > sizes["drop"] >= sizes["fill"] * 0.95
    # CMU-1's glass is off-white (~244): keep keeps it everywhere, drop beside tissue only
    corner = (slice(None), slice(0, 64), slice(-64, None))  # top right: glass
    assert 230 < data["keep"][corner].mean() < 252
    assert (data["drop"][corner] == 255).all() and (data["fill"][corner] == 255).all()
    # inside kept chunks: drop leaves the glass off-white, fill makes it white
    drop_glass = (data["drop"].min(axis=0) > 225) & (data["drop"].min(axis=0) < 252)
    assert drop_glass.sum() > 10_000
    assert np.median(data["fill"][:, drop_glass]) == 255


def test_ngff_04_zarr_v2(slides, tmp_path):
    store = tmp_path / "v04.zarr"
    run_cli(slides / CMU, store, "--ngff", "0.4", "--quality", "3", "--no-progress")
    d = read_back(store)
    assert d["zarr_format"] == 2
    assert d["shapes"] == expected_shapes(2220, 2967)
    assert d["shards"] == [None] * 4
    zarray = json.loads((store / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/"
    assert zarray["compressor"]["id"] == "dlwsi" and zarray["compressor"]["quality"] == 3
    # CMU-1 is JPEG: level 0 has the lattice filter, as a numcodecs filter
    assert [f["id"] for f in zarray["filters"]] == ["dlwsi_jpeg_lattice"]
    assert json.loads((store / "1" / ".zarray").read_text())["filters"] is None
    assert zarray["fill_value"] == 255
    # chunks stored under v2 keys with "/" (0/<c>/<y>/<x>), the glass ones left out
    keys = [p.relative_to(store / "0").parts for p in (store / "0").rglob("*") if p.is_file()
            and not p.name.startswith(".")]
    assert keys and all(len(k) == 3 and k[0] == "0" for k in keys)
    assert len(keys) < math.ceil(2967 / 512) * math.ceil(2220 / 512)


@pytest.mark.parametrize("codec", ["jpeg", "jpegxl", "jpeg2k", "avif"])
def test_baseline_codecs(slides, tmp_path, codec):
    store = tmp_path / f"{codec}.zarr"
    run_cli(slides / TIFF, store, "--codec", codec, "--glass", "keep", "--no-progress")
    d = read_back(store)
    assert d["shapes"] == expected_shapes(300, 250)
    meta = json.loads((store / "0" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["transpose", f"numcodecs.imagecodecs_{codec}",
                                          "crc32c"]  # damage is detected (check)
    if codec == "avif":  # libavif's slowest default speed would take hours on a slide
        assert inner[1]["configuration"]["speed"] == 6
    report = _verify(slides, TIFF, store)
    assert report["levels"][0]["psnr_all"] > 28
    # a lossy baseline: imagecodecs' JPEG-XL wrapper silently defaults to lossless
    assert report["levels"][0]["psnr_all"] < 70


def test_info_lists_levels_codec_and_sizes(slides, default_stores):
    proc = run_cli("info", default_stores[CMU], "--json")
    d = json.loads(proc.stdout)
    assert d["ngff"] == "0.5" and d["zarr_format"] == 3 and d["unit"] == "micrometer"
    assert [lv["shape"] for lv in d["levels"]] == expected_shapes(2220, 2967)
    assert all("dlwsi" in lv["codec"] for lv in d["levels"])
    assert 0 < d["stored_bytes"] < d["raw_bytes"]
    assert d["source_bytes"] == (slides / CMU).stat().st_size
    assert d["quality_choice"]["target_ssim"] == 0.95
    quality = d["quality_choice"]["quality"]
    assert all(f"'quality': {quality}," in lv["codec"] for lv in d["levels"])
    text = run_cli("info", default_stores[CMU]).stdout
    assert "dlwsi" in text and "raw" in text and "source file" in text
    assert f"quality {quality} chosen for level-0 tissue SSIM 0.95" in text


def test_mask_preview_and_associated_images(slides, tmp_path):
    from PIL import Image

    store, png = tmp_path / "assoc.zarr", tmp_path / "mask.png"
    run_cli(slides / CMU, store, "--codec", "jpeg", "--associated", "--mask-out", png,
            "--no-progress")
    preview = np.asarray(Image.open(png))
    assert preview.shape == (math.ceil(2967 / 16), math.ceil(2220 / 16), 3)
    d = read_back(store)
    assert "associated" in d["groups"]
    assert d["state"]["associated"] == ["label", "macro", "thumbnail"]
    for name in ("label", "macro", "thumbnail"):
        sub = read_back(store / "associated" / name)
        assert len(sub["shapes"]) == 1 and sub["shapes"][0][0] == 3


def test_tissue_mask_saturation_matches_skimage(slides):
    """The band-wise float32 saturation (kept lean for large slides) is skimage's HSV S."""
    from skimage import color

    from ngff_convert.slide import open_slide
    from ngff_convert.tissue import hsv_saturation, thumbnail

    thumb = thumbnail(open_slide(slides / CMU), 4)
    expected = color.rgb2hsv(thumb.transpose(1, 2, 0))[..., 1]
    assert np.abs(hsv_saturation(thumb, band=100) - expected).max() < 1e-6
    assert (expected > 0.07).mean() > 0.1  # real tissue, not a blank thumbnail


def test_fsspec_url_output(slides, tmp_path):
    url = f"file://{tmp_path}/url.zarr"
    run_cli(slides / DICOM, url, "--codec", "jpeg", "--glass", "keep", "--no-progress")
    d = read_back(tmp_path / "url.zarr")
    assert d["shapes"] == [[3, 50, 50]]
    assert json.loads(run_cli("info", url, "--json").stdout)["levels"][0]["shape"] == [3, 50, 50]


def test_mostly_glass_dicom_stores_no_pixels(default_stores):
    """The highdicom test image is all glass: nothing but metadata is stored."""
    store = default_stores[DICOM]
    assert not (store / "0" / "c").exists()
    assert read_back(store)["top_mean"] == 255.0


def test_distributed_scheduler(slides, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp", dashboard_address=None) as cluster:
        store = tmp_path / "dist.zarr"
        run_cli(slides / TIFF, store, "--codec", "jpeg", "--scheduler",
                cluster.scheduler_address, "--no-progress")
    assert read_back(store)["shapes"] == expected_shapes(300, 250)


def test_help_explains(tmp_path):
    exe = Path(sys.executable).parent / "ngff-convert"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ngff_convert"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("verify", "info", "--glass", "--codec", "--resume", "--overwrite",
                 "--associated", "--mask-out", "--scheduler", "s3://"):
        assert word in out
