"""Latent refinement: encoder-only, so refined chunks are ordinary chunks of the same model.

Refinement needs PyTorch (the train extra); reading its chunks must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from numcodecs import get_codec

from numcodecs_dlwsi import bitstream, image_codec
from numcodecs_dlwsi.latent_refinement import MAX_STEPS, rung_lambda
from numcodecs_dlwsi.model_store import default_model, load, resolve
from numcodecs_dlwsi.numcodecs import Dlwsi
from numcodecs_dlwsi.quality_measure import ReferenceSSIM
from numcodecs_dlwsi.zarr3 import DlwsiCodec

torch = pytest.importorskip("torch", reason="latent refinement needs PyTorch (train extra)")
pytest.importorskip("compressai", reason="latent refinement needs CompressAI (train extra)")
from pytorch_msssim import ssim as torch_ssim  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_SLIDE = REPO.parent / "shared/data/slides/dicom/highdicom_sm_image/sm_image.dcm"
QUALITY = 6
STEPS = 40


@pytest.fixture(scope="module")
def tiles(he_image) -> list[np.ndarray]:
    """Two real 256² H&E crops, (3, H, W)."""
    return [np.ascontiguousarray(he_image[y : y + 256, x : x + 256].transpose(2, 0, 1))
            for y, x in ((100, 100), (600, 500))]


@pytest.fixture(scope="module")
def coded(tiles) -> dict[int, list[bytes]]:
    ref = resolve(default_model(), QUALITY)
    return {steps: image_codec.encode_batch(tiles, ref, refine=steps) for steps in (0, STEPS)}


def _loss(chunk: bytes, tile: np.ndarray) -> float:
    """The model's own rate-distortion loss of a real chunk: bits per pixel plus the rung's
    lambda times its MSE/SSIM distortion, the quantity refinement lowers."""
    ref = resolve(default_model(), QUALITY)
    model = load(ref)
    decoded = image_codec.decode(chunk)
    a = torch.from_numpy(decoded[None].astype(np.float32) / 255)
    b = torch.from_numpy(tile[None].astype(np.float32) / 255)
    mse = float(((a - b) ** 2).mean())
    similarity = float(torch_ssim(a, b, data_range=1.0))
    weight = model.meta.get("ssim_weight", 0.0)
    distortion = (1 - weight) * 255**2 * mse + weight * 1000 * (1 - similarity)
    lmbda = rung_lambda(model.meta["lambda"], model.rungs[QUALITY] / image_codec.GAIN_ONE)
    return 8 * len(chunk) / tile[0].size + lmbda * distortion


def test_refinement_lowers_the_loss_of_real_chunks(tiles, coded):
    for tile, plain, refined in zip(tiles, coded[0], coded[STEPS], strict=True):
        assert _loss(refined, tile) < _loss(plain, tile)
    assert sum(map(len, coded[STEPS])) < sum(map(len, coded[0]))


def test_refined_chunks_are_ordinary_chunks(coded):
    plain_header = bitstream.unpack(coded[0][0])[0]
    refined_header = bitstream.unpack(coded[STEPS][0])[0]
    assert refined_header == plain_header  # same model, hash, rung, bitstream version
    assert coded[STEPS][0] != coded[0][0]


def test_refined_chunks_decode_without_torch(coded, tmp_path):
    """A reader without PyTorch (imports of torch fail) decodes refined chunks to exactly
    the pixels this process decodes."""
    (tmp_path / "chunk.bin").write_bytes(coded[STEPS][0])
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['compressai'] = None\n"
        "import numpy as np\n"
        "from numcodecs_dlwsi.image_codec import decode\n"
        f"image = decode(open({str(tmp_path / 'chunk.bin')!r}, 'rb').read())\n"
        f"np.save({str(tmp_path / 'decoded.npy')!r}, image)\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "decoded.npy"),
                                  image_codec.decode(coded[STEPS][0]))


def test_refinement_is_repeatable(tiles, coded):
    again = image_codec.encode_batch(tiles, resolve(default_model(), QUALITY), refine=STEPS)
    assert again == coded[STEPS]


def test_rate_control_keeps_its_promise_with_refinement(tiles):
    ref = resolve(default_model(), QUALITY)
    chunks = image_codec.encode_batch(tiles, ref, target_ssim=0.93, refine=20)
    for tile, chunk in zip(tiles, chunks, strict=True):
        rung = bitstream.unpack(chunk)[0].quality
        decoded = image_codec.decode(chunk)
        assert ReferenceSSIM(tile)(decoded) >= 0.93 or rung == QUALITY


def test_refine_in_both_codec_configs():
    codec = Dlwsi(quality=QUALITY, refine=25)
    config = codec.get_config()
    assert config["refine"] == 25
    assert get_codec(config).get_config() == config
    assert "refine" not in Dlwsi(quality=QUALITY).get_config()  # old stores unchanged
    v3 = DlwsiCodec(quality=QUALITY, refine=25)
    assert v3.to_dict()["configuration"]["refine"] == 25
    assert DlwsiCodec.from_dict(v3.to_dict()) == v3


@pytest.mark.parametrize("bad", [-1, MAX_STEPS + 1, 2.5, True, "10"])
def test_bad_refine_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="refine must be an integer"):
        Dlwsi(quality=QUALITY, refine=bad)


def test_zarr_array_written_with_refinement_reads_back(tiles, tmp_path):
    image = np.concatenate(tiles, axis=2)  # (3, 256, 512): two chunks
    array = zarr.create_array(tmp_path / "a.zarr", shape=image.shape, chunks=(3, 256, 256),
                              dtype="uint8", serializer=DlwsiCodec(quality=QUALITY, refine=10),
                              compressors=None, fill_value=255)
    array[:] = image
    back = zarr.open_array(tmp_path / "a.zarr", mode="r")
    assert back.metadata.to_dict()["codecs"][0]["configuration"]["refine"] == 10
    for k, tile in enumerate(tiles):
        stored = (tmp_path / "a.zarr" / "c" / "0" / "0" / str(k)).read_bytes()
        np.testing.assert_array_equal(back[:, :, 256 * k : 256 * (k + 1)],
                                      image_codec.decode(stored))
        plain = image_codec.encode_batch([tile], resolve(default_model(), QUALITY))[0]
        assert stored != plain and bitstream.unpack(stored)[0] == bitstream.unpack(plain)[0]


def test_refinement_does_not_depend_on_the_batch(tiles):
    """A chunk's noise comes from its own generator: coded alone or beside another chunk,
    its refined latents agree (up to float differences between batch sizes)."""
    ref = resolve(default_model(), QUALITY)
    alone = image_codec.encode_batch([tiles[0]], ref, refine=10)[0]
    together = image_codec.encode_batch(tiles, ref, refine=10)[0]
    a = image_codec.decode(alone).astype(int)
    b = image_codec.decode(together).astype(int)
    assert np.mean(a == b) > 0.99 and abs(len(alone) - len(together)) <= 0.01 * len(alone)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ngff_convert", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())


def test_converter_records_refinement(tmp_path):
    """--refine reaches the codec configuration of every level."""
    if not SMALL_SLIDE.exists():
        pytest.skip(f"{SMALL_SLIDE} not found (the shared data folder beside the repository)")
    out = tmp_path / "small.zarr"
    proc = _cli(SMALL_SLIDE, out, "--quality", 4, "--refine", 5, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr  # torch's import noise stays out of the CLI
    for level in (p for p in out.iterdir() if p.is_dir()):
        meta = json.loads((level / "zarr.json").read_text())
        assert '"refine": 5' in json.dumps(meta["codecs"])
    assert zarr.open_group(out, mode="r")["0"][:].shape[0] == 3


def test_quality_choice_with_refinement(slides):
    """--target-ssim with --refine: the plain bisection, then refined trials; the chosen
    rung's refined sample reaches the target and the one below, refined, misses it."""
    from ngff_convert.calibrate import choose_quality
    from ngff_convert.codecs import codec_choice
    from ngff_convert.slide import open_slide
    from ngff_convert.tissue import Glass, MaskParams, mask_downsample, thumbnail, tissue_mask

    info = open_slide(str(slides / "aperio/CMU-1-Small-Region.svs"))
    downsample = mask_downsample(info)
    tissue = tissue_mask(thumbnail(info, downsample), downsample, MaskParams())
    logs: list[str] = []

    def choose(refine: int) -> object:  # 128² chunks: a small sample, quick trials
        return choose_quality(info, tissue, Glass.fill, 128, codec_choice("dlwsi"), 0.93,
                              2, logs.append, refine=refine)

    plain, refined = choose(0), choose(5)
    assert refined.tried == plain.tried and refined.refine == 5
    assert refined.reached and refined.ssim == refined.tried_refined[refined.quality] >= 0.93
    assert refined.quality == 1 or refined.tried_refined[refined.quality - 1] < 0.93
    assert any("with 5 refinement steps" in line for line in logs)
    assert refined.as_dict()["tried_refined"] and type(refined).from_dict(
        refined.as_dict()).as_dict() == refined.as_dict()


def test_converter_refuses_refine_for_other_codecs(tmp_path):
    from ngff_helpers import assert_one_line_error

    if not SMALL_SLIDE.exists():
        pytest.skip(f"{SMALL_SLIDE} not found (the shared data folder beside the repository)")
    proc = _cli(SMALL_SLIDE, tmp_path / "o.zarr", "--codec", "jpeg", "--refine", 5)
    assert_one_line_error(proc, "--refine", "jpeg")
    assert not (tmp_path / "o.zarr").exists()
