"""What feeds the entropy coder must be bit-identical everywhere; the bytes deterministic."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from numcodecs_dlwsi import image_codec
from numcodecs_dlwsi.hyper_synthesis import ACTIVATION_LIMIT, LEAKY_NUMERATOR, LEAKY_SHIFT
from numcodecs_dlwsi.model_store import load, resolve


@pytest.fixture(scope="module")
def tiles(he_image):
    return [np.ascontiguousarray(he_image[y : y + 256, x : x + 384].transpose(2, 0, 1))
            for y, x in ((0, 0), (300, 500), (700, 100))]


def test_same_bytes_across_threads_and_runs(tiles, monkeypatch):
    ref = resolve(None, None)
    results = []
    for threads in ("1", "2", "1", "0"):
        monkeypatch.setenv("DLWSI_THREADS", threads)
        results.append(image_codec.encode_batch(tiles, ref))
    assert all(r == results[0] for r in results[1:])
    # batching does not change the bytes either
    assert [image_codec.encode_batch([t], ref)[0] for t in tiles] == results[0]


def _reference_layer(layer, x):
    """Independent int64 implementation: zero-insertion for transposed convs, einsum."""
    w = layer.weight.astype(np.int64)
    k = w.shape[2]
    if layer.kind == "deconv":
        b, c, h, wd = x.shape
        s = layer.stride
        up = np.zeros((b, c, (h - 1) * s + 1, (wd - 1) * s + 1), dtype=np.int64)
        up[:, :, ::s, ::s] = x
        lo = k - 1 - layer.padding
        hi = lo + layer.output_padding
        x = np.pad(up, ((0, 0), (0, 0), (lo, hi), (lo, hi)))
        w = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        stride = 1
    else:
        p = layer.padding
        x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        stride = layer.stride
    ho = (x.shape[2] - k) // stride + 1
    wo = (x.shape[3] - k) // stride + 1
    acc = np.zeros((x.shape[0], w.shape[0], ho, wo), dtype=np.int64)
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            acc += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    acc += layer.bias.astype(np.int64)[None, :, None, None]
    out = (acc + (1 << (layer.shift - 1))) >> layer.shift
    if layer.leaky_relu:
        out = np.where(out < 0, (out * LEAKY_NUMERATOR) >> LEAKY_SHIFT, out)
    limit = int(ACTIVATION_LIMIT)
    return np.clip(out, -limit, limit)


def test_hyper_synthesis_equals_independent_integer_reference(tiles):
    model = load(resolve(None, None))
    rng = np.random.default_rng(0)
    z = rng.integers(-6, 7, size=(2, model.hyper_channels, 4, 6)).astype(np.int64)
    z_fixed = z * 1024 + model.z_medians_fixed[None, :, None, None]
    scales, means = model.hyper_synthesis(z_fixed.astype(np.float64))
    x = z_fixed
    for layer in model.hyper_synthesis.layers:
        x = _reference_layer(layer, x)
    half = x.shape[1] // 2
    np.testing.assert_array_equal(scales.astype(np.int64), x[:, :half])
    np.testing.assert_array_equal(means.astype(np.int64), x[:, half:])


@pytest.mark.parametrize("provider", [p for p in ("cpu", "cuda")
                                      if {"cpu": "CPUExecutionProvider",
                                          "cuda": "CUDAExecutionProvider"}[p]
                                      in ort.get_available_providers()])
def test_decoded_latents_identical_for_every_provider(tiles, provider, monkeypatch):
    ref = resolve(None, None)
    chunks = image_codec.encode_batch(tiles, ref)
    reference = [item.y_hat for item in image_codec.decode_latents(chunks, ref)]
    monkeypatch.setenv("DLWSI_PROVIDER", provider)
    for threads in ("1", "2"):
        monkeypatch.setenv("DLWSI_THREADS", threads)
        decoded = image_codec.decode_latents(chunks, ref)
        for item, expected in zip(decoded, reference, strict=True):
            assert item.y_hat.tobytes() == expected.tobytes()
        pixels = image_codec.decode_batch(chunks, ref)
        for image, tile in zip(pixels, tiles, strict=True):
            assert image.shape == tile.shape
