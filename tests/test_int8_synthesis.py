"""A model derived with an int8 synthesis codes the same bits as its parent and decodes
close to it; the derivation refuses what it must not overwrite or cannot use."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from golden_vectors import synthetic_image
from onnx import numpy_helper

pytest.importorskip("compressai", reason="deriving an int8 model needs the [train] extra")

import torch  # noqa: E402

from numcodecs_dlwsi import image_codec  # noqa: E402
from numcodecs_dlwsi.bitstream import unpack  # noqa: E402
from numcodecs_dlwsi.model_store import default_model, load, resolve  # noqa: E402
from numcodecs_dlwsi.network.release import network_from_release  # noqa: E402
from numcodecs_dlwsi.train.cli import main as train_main  # noqa: E402
from numcodecs_dlwsi.train.int8_synthesis import (  # noqa: E402
    PIXEL_GRID,
    activation_points,
    calibrate_grids,
    export_int8_model,
    last_output,
    sub_pixel_synthesis,
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def parent():
    return resolve(default_model(), None)


@pytest.fixture(scope="module")
def derived(parent, tmp_path_factory):
    """The parent's synthesis quantized without fine-tuning, exported as a new model."""
    folder = tmp_path_factory.mktemp("int8")
    image = synthetic_image(256, 256)
    chunk = image_codec.encode_batch([image], parent)[0]
    latents = image_codec.decode_latents([chunk], parent)[0].y_hat[None]
    g_s = sub_pixel_synthesis(network_from_release(parent).g_s).eval()
    grids = calibrate_grids(g_s, latents)
    grids[last_output()] = PIXEL_GRID
    state = folder / "synthesis_qat.pt"
    torch.save({"synthesis": g_s.state_dict(), "grids": grids, "steps": 0, "weight_bits": 7},
               state)
    weights = folder / "weights"
    path = export_int8_model(parent, state, "test-int8", weights, default_quality=11)
    return state, weights, path


def test_int8_model_codes_the_parents_bits(parent, derived, monkeypatch):
    _, weights, path = derived
    monkeypatch.setenv("DLWSI_WEIGHTS", str(weights))
    ref = resolve("test-int8", parent.quality)
    assert ref.path == path
    model, source = load(ref), load(parent)
    assert model.meta["parent"] == parent.model and model.meta["parent_sha256"] == parent.sha256
    assert model.meta["synthesis"]["weight_bits"] == 7
    assert model.analysis_onnx == source.analysis_onnx
    graph = onnx.load_from_string(model.synthesis_onnx).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    grids = {node.input[0]: (float(constants[node.input[1]]), int(constants[node.input[2]]))
             for node in graph.node if node.op_type == "QuantizeLinear"}
    assert set(grids) == set(activation_points())  # on the grids given, nowhere else
    assert grids[last_output()] == (pytest.approx(PIXEL_GRID[0]), PIXEL_GRID[1])
    assert json.loads((weights / "manifest.json").read_text())["default_quality"] == {
        "test-int8": 11}

    image = synthetic_image()
    ours, theirs = (image_codec.encode_batch([image], r)[0] for r in (ref, parent))
    (header, payload), (parent_header, parent_payload) = unpack(ours), unpack(theirs)
    assert header.model_id == "test-int8" and parent_header.model_id == parent.model
    assert bytes(payload) == bytes(parent_payload)
    pixels, parent_pixels = image_codec.decode(ours), image_codec.decode(theirs)
    assert pixels.shape == parent_pixels.shape == image.shape
    assert not np.array_equal(pixels, parent_pixels)
    assert psnr(pixels, parent_pixels) > 38.0, psnr(pixels, parent_pixels)


def test_int8_export_refuses_what_it_must_not_do(parent, derived, monkeypatch, capsys):
    state, weights, path = derived
    released = path.read_bytes()
    with pytest.raises(FileExistsError, match="never change"):
        export_int8_model(parent, state, "test-int8", weights)
    assert path.read_bytes() == released
    args = ["export-int8", str(state), "--parent", parent.model, "--weights", str(weights)]
    assert train_main([*args, "--model", "test-int8"]) == 2
    assert "already released" in capsys.readouterr().err
    assert train_main([*args, "--model", "other-int8", "--default-quality", "99"]) == 2
    assert "not one of" in capsys.readouterr().err
    not_a_state = path.parent / "notes.pt"
    not_a_state.write_bytes(b"not a checkpoint")
    assert train_main(["export-int8", str(not_a_state), "--parent", parent.model,
                       "--model", "other-int8", "--weights", str(weights)]) == 2
    assert "not a fine-tuned int8 synthesis" in capsys.readouterr().err
    assert not list(weights.glob("other-int8*"))
    monkeypatch.setenv("DLWSI_WEIGHTS", str(weights))
    with pytest.raises(ValueError, match="runs in int8"):
        network_from_release(resolve("test-int8", parent.quality))


def test_int8_synthesis_in_float_decodes_within_one_grey_level(parent, derived, monkeypatch,
                                                                he_tile):
    """Where int8 kernels could saturate the graph runs in float: the pixels must then
    match the int8 kernels' within the +-1 allowed between devices."""
    from numcodecs_dlwsi import runtime

    monkeypatch.setenv("DLWSI_WEIGHTS", str(derived[1]))
    ref = resolve("test-int8", parent.quality)
    chunk = image_codec.encode_batch([he_tile], ref)[0]
    decoded = {}
    for mode in ("auto", "float"):
        monkeypatch.setenv("DLWSI_INT8", mode)
        decoded[mode] = image_codec.decode(chunk).astype(int)
        assert runtime.session(ref, "synthesis", runtime.execution_providers(), 1
                               ).get_providers() == ["CPUExecutionProvider"]
    difference = np.abs(decoded["auto"] - decoded["float"])
    assert difference.max() <= 1
    if runtime.exact_int8_kernels():  # auto ran the int8 kernels: they were compared
        assert difference.any()
    monkeypatch.setenv("DLWSI_INT8", "fast")
    with pytest.raises(ValueError, match="DLWSI_INT8"):
        image_codec.decode(chunk)
