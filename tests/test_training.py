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
    config = TrainConfig(lmbda=0.01, steps=2, batch=2, crop=64, N=16, M=24, last=8,
                         hyper_kernel=1)
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
    path = export_model(tiny_run / "checkpoint.pt", weights, "tiny-test-v1", 1,
                        gains=[0.5, 1.0], data_root=data_root)
    assert path.name == "tiny-test-v1-q1-2.dlwsi"
    for quality, gains in ((1, [1.0]), (2, [2.0]), (0, [0.5, 1.0])):  # rung 2 is taken
        with pytest.raises((FileExistsError, ValueError), match="never change|outside"):
            export_model(tiny_run / "checkpoint.pt", weights, "tiny-test-v1", quality,
                         gains=gains, data_root=data_root)
    for gains in ([1.0, 0.5], [100.0]):
        with pytest.raises(ValueError, match="increasing|1/64..64"):
            export_model(tiny_run / "checkpoint.pt", weights, "tiny-test-v2", 1,
                         gains=gains, data_root=data_root)
    monkeypatch.setenv("DLWSI_WEIGHTS", str(weights))
    refs = [resolve("tiny-test-v1", q) for q in (1, 2)]
    assert refs[0].sha256 == refs[1].sha256
    model = load(refs[0])
    assert model.meta["trained_on"] and "slides/aperio/CMU-1-Small-Region.svs" not in (
        model.meta["trained_on"])
    chunks = [image_codec.encode_batch([he_tile], ref)[0] for ref in refs]
    assert len(chunks[0]) < len(chunks[1])  # the lower gain quantizes more coarsely
    for chunk, ref in zip(chunks, refs, strict=True):
        assert image_codec.decode_batch([chunk], ref)[0].shape == he_tile.shape


def _small_data_root(tmp_path, data_root):
    """Two training images and one validation image of the real data, linked."""
    from numcodecs_dlwsi.train.data import VALIDATION_FILES

    train_files = ["he/tcga_tiles_mopadi/TCGA-3X-AAVA-01Z-00-DX1__0_0_0_506.jpg",
                   "he/torchstain/source.png"]
    val_file = "he/torchstain/target.png"
    assert val_file in VALIDATION_FILES
    root = tmp_path / "data"
    for rel in [*train_files, val_file]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(data_root / rel)
    return root, train_files, val_file


def test_a_data_pack_trains_with_bf16_and_the_run_goes_on(tmp_path, data_root):
    import torch

    from numcodecs_dlwsi.train.data import read_image
    from numcodecs_dlwsi.train.pack import build_pack, load_pack

    root, train_files, val_file = _small_data_root(tmp_path, data_root)
    pack = tmp_path / "pack.npz"
    meta = build_pack(root, pack, budget_mb=2, tile=128, min_side=128, val_per_image=1,
                      log=False)
    assert meta["trained_on"] == sorted(train_files)
    assert meta["validation_files"] == [val_file]
    loaded = load_pack(pack)
    for (rel, factor, y, x, h, w), region in zip(meta["regions"], loaded.regions, strict=True):
        assert factor == 1  # lossless: each region is exactly its rectangle of the source
        assert np.array_equal(region, read_image(root / rel)[y : y + h, x : x + w])
    assert loaded.val.shape == (1, 3, 256, 256)

    run = tmp_path / "run"
    config = TrainConfig(lmbda=0.01, steps=1, batch=2, crop=64, N=16, M=24, last=8,
                         jpeg_recompress=[30, 90])
    train(run, config, log_every=1, val_every=10, data_pack=pack, amp="bf16", minutes=5)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert state["data_packs"][0]["trained_on"] == sorted(train_files)
    # a GPU run goes on elsewhere with other crops; a wall-clock limit of 0 stops after a step
    config.steps, config.crop = 10, 128
    train(run, config, log_every=1, val_every=10, data_pack=pack, minutes=0,
          overrides=("crop",))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert log[0]["amp"] == "bf16" and "amp" not in log[1]
    assert np.isfinite(log[-1]["val_bpp"])  # stopping early validates and saves
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2
    assert json.loads((run / "config.json").read_text())["crop"] == 128


def test_jpeg_recompression_gives_a_share_of_crops_their_jpeg_round_trip(he_image):
    from numcodecs_dlwsi.train.data import JPEG_LAYOUTS, JpegRecompression, jpeg_round_trip

    crops = np.stack([np.rot90(he_image[:128, :128], k).transpose(2, 0, 1) for k in range(4)]
                     * 16)
    out = JpegRecompression(30, 30, share=0.5).apply(crops.copy(), np.random.default_rng(0))
    changed = [not np.array_equal(a, b) for a, b in zip(crops, out, strict=True)]
    assert 16 < sum(changed) < 48
    layouts_seen = set()
    for original, recompressed in zip(crops, out, strict=True):
        pixels = np.ascontiguousarray(original.transpose(1, 2, 0))
        round_trips = {layout: jpeg_round_trip(pixels, 30, layout).transpose(2, 0, 1)
                       for layout in JPEG_LAYOUTS}
        matches = [name for name, r in round_trips.items() if np.array_equal(recompressed, r)]
        assert matches or np.array_equal(recompressed, original)
        layouts_seen.update(matches)
    assert layouts_seen == set(JPEG_LAYOUTS)
    # the RGB layout is Aperio's (CMU-1's tiles): no colour transform, no chroma
    # subsampling, so its artefacts differ from YCbCr's
    assert not np.array_equal(round_trips["rgb"], round_trips["ycbcr420"])
    with pytest.raises(ValueError, match="unknown JPEG layout"):
        jpeg_round_trip(np.ascontiguousarray(crops[0].transpose(1, 2, 0)), 30, "cmyk")
    again = JpegRecompression(30, 30, share=0.5).apply(crops.copy(), np.random.default_rng(0))
    assert np.array_equal(out, again)  # seeded: a resumed run draws what it would have
    for low, high, share in ((0, 50, 0.5), (60, 40, 0.5), (30, 90, 0.0)):
        with pytest.raises(ValueError, match="JPEG"):
            JpegRecompression(low, high, share)


def test_jpeg_recompress_option_refuses_a_reversed_range(capsys):
    from numcodecs_dlwsi.train.cli import main

    with pytest.raises(SystemExit):
        main(["train", "run", "--jpeg-recompress", "90-30"])
    assert "1 <= LOW <= HIGH <= 100" in capsys.readouterr().err


def test_torch_crop_sampler_draws_windows_in_all_eight_symmetries():
    from numcodecs_dlwsi.train.pack import TorchCropSampler

    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    batch = TorchCropSampler([image], crop=3, seed=0).batch(2000)
    crops = (batch * 255).round().byte().numpy()
    windows = [image[y : y + 3, x : x + 3].transpose(2, 0, 1)
               for y in range(3) for x in range(5)]
    variants = {np.ascontiguousarray(np.rot90(v, k, axes=(1, 2))).tobytes()
                for w in windows for v in (w, w[:, :, ::-1]) for k in range(4)}
    seen = {crop.tobytes() for crop in crops}
    assert seen == variants  # every window, flipped and rotated every way, and nothing else


def _widened(**wider: int):
    """A small random model, the same widened by ``wider`` (model arguments), and a batch."""
    import torch

    from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior, widen_state

    torch.manual_seed(0)
    narrow = LiteMeanScaleHyperprior(N=16, M=24, last=8).eval()
    wide = LiteMeanScaleHyperprior(**{"N": 16, "M": 24, "last": 8, **wider})
    wide.load_state_dict(widen_state(narrow.state_dict(), wide))
    return narrow, wide.eval(), torch.rand(2, 3, 64, 64)


def test_widening_the_latent_keeps_what_the_narrow_model_computes():
    """A narrow checkpoint widened to more latent channels reconstructs exactly as before,
    and the old channels keep their rates; only the new channels start from scratch."""
    import torch

    from numcodecs_dlwsi.network.model import widen_state

    narrow, wide, x = _widened(M=48, hyper=24)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert torch.equal(a["x_hat"], b["x_hat"])
    assert torch.equal(a["likelihoods"]["z"], b["likelihoods"]["z"])
    assert torch.equal(a["likelihoods"]["y"], b["likelihoods"]["y"][:, :24])
    assert not torch.equal(wide.g_a[6].weight[24:], torch.zeros_like(wide.g_a[6].weight[24:]))
    with pytest.raises(ValueError, match="cannot narrow"):
        narrow.load_state_dict(widen_state(wide.state_dict(), narrow))


def test_widening_the_transforms_keeps_what_the_narrow_model_computes():
    """g_s's first stage and g_a widened (new GDN channels, zero outgoing weights) code
    exactly as before, and the new channels can learn: their outgoing weights get
    gradients."""
    import torch

    narrow, wide, x = _widened(first=40, analysis=32)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert torch.equal(a["x_hat"], b["x_hat"])
    assert torch.equal(a["likelihoods"]["y"], b["likelihoods"]["y"])
    assert wide.config()["first"] == 40 and wide.g_s[0].weight.shape[1] == 40
    assert wide.config()["analysis"] == 32 and wide.g_a[0].weight.shape[0] == 32
    wide.train()
    wide(x)["x_hat"].square().mean().backward()
    assert wide.g_s[2].weight.grad[16:].abs().sum() > 0  # (in, out): new inputs
    assert wide.g_a[2].weight.grad[:, 16:].abs().sum() > 0  # (out, in): new inputs


def test_lower_bounds_are_architecture_constants_not_checkpoint_values():
    """A float16 copy rounds the 1e-9 likelihood bounds to 0 (as the first GPU payload did);
    loading must restore them, or a likelihood can reach 0 and the loss infinity."""
    from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior
    from numcodecs_dlwsi.train.train import with_constant_bounds

    model = LiteMeanScaleHyperprior(N=16, M=24, last=8)
    damaged = {name: value.half().float() for name, value in model.state_dict().items()}
    name = "gaussian_conditional.likelihood_lower_bound.bound"
    assert damaged[name].item() == 0.0
    restored = with_constant_bounds(damaged, LiteMeanScaleHyperprior(N=16, M=24, last=8))
    assert restored[name].item() == pytest.approx(1e-9)
    weight = "g_s.0.weight"  # learned values pass through untouched
    assert restored[weight] is damaged[weight]


def test_ladder_tuning_moves_the_decoder_side_only(tiny_run, tmp_path, data_root):
    """--ladder-gains tunes h_s and g_s of --init; the encoder side, which decides the
    coded latents, must stay bit for bit, and the run must resume like any other."""
    import torch

    from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior
    from numcodecs_dlwsi.train.train import GainSampler

    init = tiny_run / "checkpoint.pt"
    before = torch.load(init, weights_only=False)["model"]
    run = tmp_path / "ladder"
    config = TrainConfig(lmbda=0.01, steps=2, batch=4, crop=64, N=16, M=24, last=8,
                         hyper_kernel=1, lr=1e-2, init=str(init), ladder_gains=[0.25, 1.0])
    train(run, config, save_every=1, log_every=1, val_every=2, data_root=data_root)
    config.steps = 3
    train(run, config, save_every=1, log_every=1, val_every=3, data_root=data_root)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["aux_optimizer"] is None
    after = state["model"]
    learned = [name for name, _ in LiteMeanScaleHyperprior(
        N=16, M=24, last=8, hyper_kernel=1).named_parameters()]  # buffers are constants
    for name in learned:
        frozen = name.startswith(("g_a.", "h_a.", "entropy_bottleneck."))
        assert torch.equal(after[name], before[name]) == frozen, name

    sampler = GainSampler([0.25, 1.0], torch.device("cpu"))
    gains, weights = sampler.draw(256)
    assert set(gains.flatten().tolist()) == {0.25, 1.0}
    assert gains.shape == (256, 1, 1, 1)
    # weight grows as gain squared, mean 1 over the ladder
    assert torch.allclose(weights, gains.flatten() ** 2 / ((0.25**2 + 1.0) / 2))


def test_a_gain_codes_the_latent_on_a_finer_or_coarser_grid():
    """The model's gain path is the exported rung's arithmetic: y_hat - mean is a multiple
    of 1/gain."""
    import torch

    from numcodecs_dlwsi.network.model import LiteMeanScaleHyperprior

    model = LiteMeanScaleHyperprior(N=16, M=24, last=8).eval()
    captured = {}
    model.g_s.register_forward_pre_hook(lambda _, args: captured.update(y_hat=args[0]))
    x = torch.rand(2, 3, 64, 64)
    gain = torch.tensor([0.5, 2.0]).view(-1, 1, 1, 1)
    with torch.no_grad():
        model(x, gain)
        z = model.h_a(model.g_a(x))
        medians = model.entropy_bottleneck._get_medians()
        _, means = model.h_s(torch.round(z - medians) + medians).chunk(2, 1)
    steps = (captured["y_hat"] - means) * gain
    assert torch.allclose(steps, torch.round(steps), atol=1e-4)


def test_a_release_becomes_a_checkpoint_that_exports_back_and_trains(tmp_path, monkeypatch,
                                                                     he_tile, data_root):
    """Checkpoints are not released: ``from-release`` rebuilds one from he-mshl-v3's model
    file. Exported again with the release's gains, it has the release's transforms and
    integer hyper-synthesis exactly, a hyper-latent prior fitted to the release's tables,
    codes a real tile within a few bytes of the release, and a run starts from it."""
    import onnx
    import torch
    from onnx import numpy_helper

    from numcodecs_dlwsi.train.from_release import checkpoint_from_release

    release = resolve("he-mshl-v3", 11)
    state, excess = checkpoint_from_release(release, prior_steps=300)
    assert 0 <= excess < 0.01  # bits per hyper-latent symbol above the tables' entropy
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "checkpoint.pt")
    gains = load(release).meta["gains"]
    weights = tmp_path / "weights"
    export_model(run / "checkpoint.pt", weights, "he-rebuilt-v3", 1, gains=gains,
                 data_root=data_root)
    monkeypatch.setenv("DLWSI_WEIGHTS", str(weights))
    rebuilt, original = load(resolve("he-rebuilt-v3", 11)), load(release)
    for graph in ("analysis_onnx", "synthesis_onnx"):
        ours, theirs = (
            {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(
                getattr(m, graph)).graph.initializer
             if i.name.endswith((".weight", ".bias", ".beta", ".gamma"))}
            for m in (rebuilt, original))  # the trained parameters, not export constants
        assert ours.keys() == theirs.keys() and len(theirs) >= 10
        assert all(np.array_equal(ours[name], theirs[name]) for name in theirs)
    for a, b in zip(rebuilt.hyper_synthesis.layers, original.hyper_synthesis.layers,
                    strict=True):
        assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    assert np.array_equal(rebuilt.z_medians_fixed, original.z_medians_fixed)
    assert [t.lo for t in rebuilt.z_tables] == [t.lo for t in original.z_tables]
    sizes = [len(image_codec.encode_batch([he_tile], resolve(m, 11))[0])
             for m in ("he-rebuilt-v3", "he-mshl-v3")]
    assert abs(sizes[0] - sizes[1]) < 0.002 * sizes[1]
    config = TrainConfig(lmbda=0.15, steps=1, batch=2, crop=128, M=192, N=64, hyper=96,
                         hyper_kernel=1, analysis=128, ssim_weight=0.5, lr=1e-5,
                         init=str(run / "checkpoint.pt"))
    train(tmp_path / "continued", config, log_every=1, val_every=100, data_root=data_root)
    log = json.loads((tmp_path / "continued" / "log.jsonl").read_text().splitlines()[-1])
    # the release's quality on the held-out tiles, not noise (two random training crops
    # are too few to judge: 28-35 dB depending on which crops the machine's data gives)
    assert log["step"] == 1 and 30 < log["val_psnr"] < 50
