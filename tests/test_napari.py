"""napari shows a dlwsi-compressed OME-Zarr slide in true colour, checked on the screen.

The real Aperio slide is converted with the default codec (dlwsi), then opened by
napari's ome-zarr reader (``napari-ome-zarr``) exactly as
``napari --plugin napari-ome-zarr slide.zarr`` does (plain ``napari slide.zarr`` asks
which reader to use): no plugin code of ours, the chunks decode through the codec's
entry point. napari draws with OpenGL, so the test starts its own virtual X display
(Xvfb, Mesa's software GL) and runs a real, shown napari window in a child process.
It takes canvas screenshots of the whole slide and of a zoomed-in tissue field (where
napari loads a finer pyramid level), and compares them with the source slide read by
OpenSlide: mean colour, H&E hues, no grey/one-channel rendering, and the structure,
pixel for pixel through napari's camera.

Needs the ``[napari]`` extra and Xvfb (``.ci/run`` installs both); skips with the reason
when no X display can be started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CMU = "aperio/CMU-1-Small-Region.svs"
WINDOW = (1000, 800)  # napari main window, width x height

# Runs in a child process on the virtual display: opens the image as napari's command does,
# waits until every layer has loaded its level, saves canvas screenshots and the camera.
VIEWER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    path, out, zoom_yx, size = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5])
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*size)
    app = QApplication.instance()
    viewer.open(path, plugin="napari-ome-zarr")  # as `napari --plugin napari-ome-zarr PATH`

    def settle(timeout=120.0):
        # Process events until every layer has loaded its data and the levels are stable.
        t0, last = time.monotonic(), None
        while time.monotonic() - t0 < timeout:
            for _ in range(5):
                app.processEvents()
                time.sleep(0.02)
            now = [(layer.data_level, layer.loaded) for layer in viewer.layers]
            if now == last and all(done for _, done in now):
                return
            last = now
        raise SystemExit(f"napari did not finish loading in {timeout} s: {now}")

    def shoot(name):
        settle()
        first = viewer.screenshot(canvas_only=True, flash=False)
        settle()
        shot = viewer.screenshot(canvas_only=True, flash=False)
        Image.fromarray(shot[..., :3]).save(f"{out}/{name}.png")
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)[..., :3]).save(
            f"{out}/{name}_window.png")
        return {
            "png": f"{out}/{name}.png",
            "stable": bool(np.array_equal(first, shot)),
            "center": [float(v) for v in viewer.camera.center[-2:]],
            "zoom": float(viewer.camera.zoom),
            "levels": [int(layer.data_level) for layer in viewer.layers],
        }

    result = {"layers": [{
        "name": layer.name, "colormap": layer.colormap.name, "blending": layer.blending,
        "contrast_limits": [float(v) for v in layer.contrast_limits],
        "gamma": float(layer.gamma), "opacity": float(layer.opacity),
        "visible": bool(layer.visible), "multiscale": bool(layer.multiscale),
        "n_levels": len(layer.data), "scale": [float(v) for v in layer.scale],
        "rgb": bool(layer.rgb), "reader": layer.source.reader_plugin,
    } for layer in viewer.layers]}
    viewer.reset_view()
    result["whole"] = shoot("whole")
    scale = viewer.layers[0].scale[-1]
    viewer.camera.center = (zoom_yx[0] * scale, zoom_yx[1] * scale)
    viewer.camera.zoom = 1.5 / scale  # 1.5 screen pixels per level-0 pixel
    result["zoomed"] = shoot("zoomed")
    print("RESULT " + json.dumps(result))
    viewer.close()
""")


@pytest.fixture(scope="module")
def napari_installed() -> None:
    """Skip unless the [napari] extra is installed (not imported here: napari runs in a child)."""
    for module in ("napari", "napari_ome_zarr", "qtpy"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[napari]'")


@pytest.fixture(scope="module")
def display(tmp_path_factory: pytest.TempPathFactory):
    """A virtual X display (Xvfb) of our own; its DISPLAY string."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no X display can be had: Xvfb is not installed "
                    "(Debian: apt-get install xvfb libgl1-mesa-dri; .ci/run installs it)")
    read, write = os.pipe()
    log = open(tmp_path_factory.mktemp("xvfb") / "xvfb.log", "w+")
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp",
         "+extension", "GLX"], pass_fds=(write,), stdout=log, stderr=subprocess.STDOUT)
    os.close(write)
    number = b""
    deadline = time.monotonic() + 30
    try:
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if not select.select([read], [], [], 0.5)[0]:
                continue
            chunk = os.read(read, 16)
            if not chunk:
                break
            number += chunk
    finally:
        os.close(read)
    if not number.strip().isdigit():
        proc.kill()
        proc.wait()
        log.seek(0)
        pytest.skip(f"no X display can be had: Xvfb did not start ({log.read()[-500:]!r})")
    try:
        yield f":{number.strip().decode()}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def source(slides: Path) -> np.ndarray:
    """The source slide's level 0 from OpenSlide, RGB uint8 (H, W, 3), glass composited."""
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(slides / CMU)) as slide:
        w, h = slide.dimensions
        rgba = slide.read_region((0, 0), 0, (w, h))
    from PIL import Image

    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


@pytest.fixture(scope="module")
def converted(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1-Small-Region converted by ngff-convert with its defaults (dlwsi, NGFF 0.5)."""
    out = tmp_path_factory.mktemp("napari") / "cmu1.zarr"
    proc = subprocess.run([sys.executable, "-m", "ngff_convert", str(slides / CMU), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    level0 = json.loads((out / "0" / "zarr.json").read_text())
    assert "dlwsi" in json.dumps(level0["codecs"]), level0["codecs"]
    return out


def tissue_centre(src: np.ndarray, window: int = 512) -> tuple[int, int]:
    """(y, x) level-0 centre of the ``window``-pixel square with the most stained tissue."""
    step = 16
    h, w = (src.shape[0] // step) * step, (src.shape[1] // step) * step
    small = src[:h, :w].reshape(h // step, step, w // step, step, 3).mean(axis=(1, 3))
    stained = (small.max(axis=2) - small.min(axis=2)) > 40
    k = window // step
    integral = np.pad(stained.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    y, x = np.unravel_index(np.argmax(counts), counts.shape)
    return int((y + k / 2) * step), int((x + k / 2) * step)


def reference(src: np.ndarray, view: dict, shape: tuple[int, int],
              scale: float) -> tuple[np.ndarray, np.ndarray]:
    """What the canvas should show: the source at napari's level, through its camera.

    Returns the source pixel under each canvas pixel (RGB) and a mask of the canvas
    pixels that fall inside the image (a small margin kept off its edges).
    """
    f = 2 ** min(view["levels"])  # napari shows level L = 2**L-times mean-reduced level 0
    h, w = (src.shape[0] // f) * f, (src.shape[1] // f) * f
    level = src[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
    cy, cx = view["center"]
    rows, cols = np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5
    # canvas pixel -> world (micrometres) -> level-0 pixel edges (pixel i spans i..i+1)
    u = (cy + (rows - shape[0] / 2) / view["zoom"]) / scale + 0.5
    v = (cx + (cols - shape[1] / 2) / view["zoom"]) / scale + 0.5
    margin = 2 * f
    inside = ((u > margin) & (u < src.shape[0] - margin))[:, None] & (
        (v > margin) & (v < src.shape[1] - margin))[None, :]
    iu = np.clip((u // f).astype(int), 0, level.shape[0] - 1)
    iv = np.clip((v // f).astype(int), 0, level.shape[1] - 1)
    return level[iu][:, iv], inside


def blocks(img: np.ndarray, mask: np.ndarray, n: int = 8) -> np.ndarray:
    """Mean colour of each ``n`` x ``n`` canvas block lying wholly inside ``mask``."""
    h, w = (img.shape[0] // n) * n, (img.shape[1] // n) * n
    b = img[:h, :w].astype(np.float64).reshape(h // n, n, w // n, n, -1).mean(axis=(1, 3))
    full = mask[:h, :w].reshape(h // n, n, w // n, n).all(axis=(1, 3))
    return b[full]


def check_view(shot: np.ndarray, ref: np.ndarray, inside: np.ndarray, what: str) -> dict:
    """The colour and structure checks of one screenshot; returns the numbers."""
    assert inside.mean() > 0.3, f"{what}: the image covers only {inside.mean():.0%} of the canvas"
    got, want = blocks(shot, inside), blocks(ref, inside)
    stats = {
        "mean_rgb": got.mean(axis=0).round(1).tolist(),
        "source_mean_rgb": want.mean(axis=0).round(1).tolist(),
        # luminance structure, and each channel on its own
        "corr": float(np.corrcoef(got.mean(axis=1), want.mean(axis=1))[0, 1]),
        "corr_rgb": [float(np.corrcoef(got[:, c], want[:, c])[0, 1]) for c in range(3)],
        "mae": float(np.abs(got - want).mean()),
    }
    r, g, b = (got[:, c] for c in range(3))
    # H&E: eosin pink and haematoxylin purple both have red and blue well above green
    stats["he_fraction"] = float(((r - g > 25) & (b - g > 10)).mean())
    stats["he_fraction_source"] = float(((want[:, 0] - want[:, 1] > 25)
                                         & (want[:, 2] - want[:, 1] > 10)).mean())
    stats["chroma"] = float((got.max(axis=1) - got.min(axis=1)).mean())

    # true colour: the mean colour is the source's (glass turned white shifts it a little)
    diff = np.abs(np.subtract(stats["mean_rgb"], stats["source_mean_rgb"]))
    assert diff.max() < 12, f"{what}: mean colour off the source's: {stats}"
    # not grey, not one channel: the three channels differ the way H&E does
    assert stats["chroma"] > 0.5 * float((want.max(axis=1) - want.min(axis=1)).mean()), stats
    assert min(stats["mean_rgb"]) > 60, f"{what}: a channel is missing: {stats}"
    assert stats["he_fraction"] > 0.5 * stats["he_fraction_source"] > 0.05, stats
    # the slide's structure, in place: each channel correlates with the source's
    assert stats["corr"] > 0.9 and min(stats["corr_rgb"]) > 0.85, f"{what}: {stats}"
    assert stats["mae"] < 15, f"{what}: {stats}"
    return stats


def test_napari_shows_dlwsi_slide_in_true_colour(napari_installed: None, display: str,
                                                 source: np.ndarray, converted: Path,
                                                 tmp_path: Path) -> None:
    from PIL import Image

    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env.update(DISPLAY=display, QT_QPA_PLATFORM="xcb", XDG_RUNTIME_DIR=str(runtime),
               NAPARI_CONFIG=str(tmp_path / "napari_settings.yaml"), LIBGL_ALWAYS_SOFTWARE="1")
    centre = tissue_centre(source)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", VIEWER, str(converted), str(tmp_path),
                           json.dumps(centre), json.dumps(WINDOW)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"napari failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"napari ran {time.monotonic() - t0:.1f} s; layers {result['layers']}")

    # napari-ome-zarr turns (c, y, x) + omero into three layers that blend to true RGB
    layers = result["layers"]
    assert [layer["colormap"] for layer in layers] == ["red", "green", "blue"], layers
    assert [layer["blending"] for layer in layers] == [
        "translucent_no_depth", "additive", "additive"], layers
    for layer in layers:
        assert layer["contrast_limits"] == [0.0, 255.0] and layer["gamma"] == 1.0, layer
        assert layer["opacity"] == 1.0 and layer["visible"] and layer["multiscale"], layer
        assert layer["n_levels"] == 4 and not layer["rgb"], layer
        assert layer["reader"] == "napari-ome-zarr", layer
    scale = layers[0]["scale"][-1]
    assert scale == pytest.approx(0.499)

    whole, zoomed = result["whole"], result["zoomed"]
    assert whole["stable"] and zoomed["stable"], "the canvas changed after loading settled"
    assert len(set(whole["levels"])) == 1 and len(set(zoomed["levels"])) == 1, result
    assert zoomed["levels"][0] < whole["levels"][0], (
        f"zooming in did not load a finer level: {whole['levels']} -> {zoomed['levels']}")
    assert zoomed["levels"][0] == 0, zoomed

    report = {}
    for name, view in (("whole", whole), ("zoomed", zoomed)):
        shot = np.asarray(Image.open(view["png"]).convert("RGB"))
        ref, inside = reference(source, view, shot.shape[:2], scale)
        report[name] = check_view(shot, ref, inside, name)
        if name == "whole":
            # the canvas around the slide is napari's background, not image
            outside = ~inside & (np.arange(shot.shape[1]) < shot.shape[1] * 0.02)[None, :]
            if outside.any():
                assert shot[outside].mean() < 60, "expected the dark canvas beside the slide"
        else:
            assert inside.mean() > 0.99, "the zoomed view should be all tissue field"
    print(json.dumps(report, indent=1))
