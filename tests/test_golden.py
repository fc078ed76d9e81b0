"""Chunks written by released models decode exactly as they did when released."""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_vectors import GOLDEN, digest, synthetic_image

from numcodecs_dlwsi import image_codec
from numcodecs_dlwsi.model_store import ModelNotAvailableError, resolve

VECTORS = sorted(GOLDEN.glob("*.json"))
REPO_WEIGHTS = GOLDEN.parents[1] / "weights"


def test_every_released_model_has_golden_vectors():
    from numcodecs_dlwsi.model_store import MANIFEST, qualities

    released = json.loads((REPO_WEIGHTS / MANIFEST).read_text())["models"]
    assert {f"{model}-q{q}.json" for model in released for q in qualities(model)} <= {
        p.name for p in VECTORS}


@pytest.mark.parametrize("vector", VECTORS, ids=[p.stem for p in VECTORS])
def test_golden_chunk_decodes_identically(vector):
    expected = json.loads(vector.read_text())
    try:
        ref = resolve(expected["model"], expected["quality"], expected["model_hash"])
    except ModelNotAvailableError as exc:
        pytest.fail(f"released weights are missing: {exc}")
    chunk = vector.with_suffix(".chunk").read_bytes()
    latents = image_codec.decode_latents([chunk], ref)[0]
    assert digest(latents.z_symbols.astype("<i4")) == expected["z_symbols_sha256"]
    assert digest(latents.y_hat.astype("<f4")) == expected["y_hat_sha256"]
    pixels = image_codec.decode_batch([chunk], ref)[0]
    reference = np.load(vector.with_name(vector.stem + ".pixels.npy"))
    assert pixels.shape == reference.shape == synthetic_image().shape
    diff = np.abs(pixels.astype(int) - reference.astype(int))
    assert diff.max() <= 1, "pixels may differ by at most 1 between devices"
