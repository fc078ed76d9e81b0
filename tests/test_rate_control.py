"""Rate control: ``target_ssim`` codes each chunk at the lowest rung that reaches it.

A ladder lives in one model file and every chunk names its rung, so the encoder may pick
a rung per chunk and any reader of the pinned file decodes it (docs/reference/codec.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from numcodecs import get_codec

from numcodecs_dlwsi import bitstream, image_codec
from numcodecs_dlwsi.codec_config import CodecConfig
from numcodecs_dlwsi.model_store import (
    ModelNotAvailableError,
    default_quality,
    qualities,
    resolve,
)
from numcodecs_dlwsi.quality_measure import tissue_ssim
from numcodecs_dlwsi.zarr3 import DlwsiCodec

LADDER = "he-mshl-v2"
SINGLE = "he-mshl-v1"


def _rung(chunk: bytes) -> int:
    return bitstream.unpack(chunk)[0].quality


def _chw(tile: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tile.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def tiles(he_image) -> list[np.ndarray]:
    """Four real 256² crops, from busy to calm, and one all glass."""
    crops = [_chw(he_image[y : y + 256, x : x + 256])
             for y, x in ((0, 0), (256, 256), (512, 0), (0, 512))]
    return [*crops, np.full((3, 256, 256), 255, np.uint8)]


@pytest.mark.parametrize("target", [0.93, 0.96])
def test_each_chunk_gets_the_lowest_rung_that_reaches_the_target(tiles, target):
    top = resolve(LADDER, qualities(LADDER)[-1])
    chunks = image_codec.encode_batch(tiles, top, target_ssim=target)
    for tile, chunk in zip(tiles, chunks, strict=True):
        rung = _rung(chunk)
        assert tissue_ssim(image_codec.decode(chunk), tile) >= target or rung == top.quality
        if rung > qualities(LADDER)[0]:  # the rung below it misses the target
            below = image_codec.encode_batch([tile], resolve(LADDER, rung - 1))[0]
            assert tissue_ssim(image_codec.decode(below), tile) < target
    assert _rung(chunks[-1]) == qualities(LADDER)[0]  # glass needs nothing


def test_a_higher_target_never_picks_lower_rungs_and_quality_caps_the_rung(tiles):
    top = resolve(LADDER, qualities(LADDER)[-1])
    low = [_rung(c) for c in image_codec.encode_batch(tiles, top, target_ssim=0.90)]
    high = [_rung(c) for c in image_codec.encode_batch(tiles, top, target_ssim=0.99)]
    assert all(h >= lo for h, lo in zip(high, low, strict=True)) and high != low
    capped = image_codec.encode_batch(tiles, resolve(LADDER, 4), target_ssim=0.99)
    assert max(_rung(c) for c in capped) == 4


def test_rate_controlled_arrays_round_trip_through_both_zarr_formats(tmp_path, tiles):
    image = np.concatenate([np.concatenate(tiles[:2], axis=2),
                            np.concatenate(tiles[3:5], axis=2)], axis=1)  # 512x512
    v3 = zarr.create_array(tmp_path / "v3.zarr", shape=image.shape, chunks=(3, 256, 256),
                           dtype="uint8", compressors=None, serializer={
                               "name": "dlwsi", "configuration": {
                                   "model": LADDER, "target_ssim": 0.95, "quality": 7}})
    v3[:] = image
    codec = get_codec({"id": "dlwsi", "model": LADDER, "target_ssim": 0.95, "quality": 7})
    v2 = zarr.create_array(tmp_path / "v2.zarr", shape=image.shape, chunks=(3, 256, 256),
                           dtype="uint8", compressors=codec, zarr_format=2)
    v2[:] = image
    top = qualities(LADDER)[-1]
    for name in ("v3.zarr", "v2.zarr"):
        decoded = zarr.open_array(tmp_path / name, mode="r")[:]  # config from metadata
        rungs = {}
        for y in (0, 256):
            for x in (0, 256):
                key = f"c/0/{y // 256}/{x // 256}" if name == "v3.zarr" else \
                    f"0.{y // 256}.{x // 256}"
                rungs[y, x] = _rung((tmp_path / name / key).read_bytes())
                block = (slice(None), slice(y, y + 256), slice(x, x + 256))
                assert (tissue_ssim(decoded[block], image[block]) >= 0.95
                        or rungs[y, x] == top), (name, y, x, rungs)
        assert rungs[256, 256] == qualities(LADDER)[0]  # the glass chunk
        assert len(set(rungs.values())) > 1, rungs


def test_config_round_trips_and_bad_targets_are_refused():
    codec = get_codec({"id": "dlwsi", "model": LADDER, "target_ssim": 0.95})
    config = codec.get_config()
    assert config["target_ssim"] == 0.95 and config["quality"] == default_quality(LADDER)
    assert get_codec(config).get_config() == config
    v3 = DlwsiCodec(model=LADDER, target_ssim=0.95)
    assert DlwsiCodec.from_dict(v3.to_dict()) == v3
    assert "target_ssim" not in get_codec({"id": "dlwsi", "model": LADDER}).get_config()
    for bad in (0, 1, 1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="target_ssim must be a number between 0 and 1"):
            CodecConfig.create(model=LADDER, target_ssim=bad)


def test_a_single_rung_model_cannot_be_rate_controlled(tiles):
    with pytest.raises(ValueError, match="single-rung file"):
        image_codec.encode_batch(tiles[:1], resolve(SINGLE, 3), target_ssim=0.95)


def test_a_reader_accepts_other_rungs_of_the_pinned_file_only(tiles):
    chunk = image_codec.encode_batch(tiles[:1], resolve(LADDER, 2))[0]
    back = image_codec.decode_batch([chunk], resolve(LADDER, 6))[0]  # same file: fine
    assert np.array_equal(back, image_codec.decode(chunk))
    single = image_codec.encode_batch(tiles[:1], resolve(SINGLE, 2))[0]
    with pytest.raises(ModelNotAvailableError, match="configured for"):
        image_codec.decode_batch([single], resolve(SINGLE, 3))  # another file: refused


def test_the_target_is_the_ssim_verify_reports(tiles):
    """quality_measure keeps the original's statistics between trials; its SSIM must be
    scikit-image's (as ngff-convert verify computes it) over the non-white pixels."""
    from skimage.metrics import structural_similarity

    original = tiles[0].copy()
    original[:, :64, :128] = 255  # glass filled to white, as the converter does
    decoded = image_codec.decode(image_codec.encode_batch([original], resolve(LADDER, 2))[0])
    _, full = structural_similarity(decoded, original, channel_axis=0, data_range=255,
                                    full=True, win_size=7)
    not_white = (original != 255).any(axis=0)
    assert tissue_ssim(decoded, original) == pytest.approx(full.mean(0)[not_white].mean(),
                                                           abs=1e-6)


def test_searching_a_batch_in_lockstep_picks_what_one_by_one_picks(tiles):
    top = resolve(LADDER, qualities(LADDER)[-1])
    together = [_rung(c) for c in image_codec.encode_batch(tiles, top, target_ssim=0.95)]
    alone = [_rung(image_codec.encode_batch([t], top, target_ssim=0.95)[0]) for t in tiles]
    assert together == alone
