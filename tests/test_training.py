"""Training is resumable and export produces a model the torch-free reader decodes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("compressai", reason="training tests need the [train] extra")

from numcodecs_dlwsi import image_codec  # noqa: E402
from numcodecs_dlwsi.model_store import load, resolve  # noqa: E402
from numcodecs_dlwsi.train.export import export_model  # noqa: E402
from numcodecs_dlwsi.train.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    run = tmp_path_factory.mktemp("run")
    config = TrainConfig(lmbda=0.01, steps=2, batch=2, crop=64, N=16, M=24, last=8)
    train(run, config, save_every=1, log_every=1, val_every=2, data_root=data_root)
    return run


def test_training_continues_where_it_stopped(tiny_run, data_root):
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    config = TrainConfig(**json.loads((tiny_run / "config.json").read_text()))
    config.steps = 3
    train(tiny_run, config, save_every=1, log_every=1, val_every=3, data_root=data_root)
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert np.isfinite(log[-1]["val_bpp"])


def test_export_gives_a_model_the_reader_decodes(tiny_run, tmp_path, monkeypatch, he_tile,
                                                 data_root):
    weights = tmp_path / "weights"
    export_model(tiny_run / "checkpoint.pt", weights, "tiny-test-v1", 1, data_root=data_root)
    with pytest.raises(FileExistsError, match="never change"):
        export_model(tiny_run / "checkpoint.pt", weights, "tiny-test-v1", 1,
                     data_root=data_root)
    monkeypatch.setenv("DLWSI_WEIGHTS", str(weights))
    ref = resolve("tiny-test-v1", 1)
    model = load(ref)
    assert model.meta["trained_on"] and "slides/aperio/CMU-1-Small-Region.svs" not in (
        model.meta["trained_on"])
    chunk = image_codec.encode_batch([he_tile], ref)[0]
    assert image_codec.decode_batch([chunk], ref)[0].shape == he_tile.shape
