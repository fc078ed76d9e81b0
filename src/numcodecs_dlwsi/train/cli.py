"""``python -m numcodecs_dlwsi.train`` / ``dlwsi-train``: train, continue and export models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlwsi-train",
        description="Train dlwsi models on H&E (resumable) and export them as codec weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train or continue a run",
        description="Train a run folder; running the same command again continues it.",
    )
    train.add_argument("run", type=Path, help="run folder (config, checkpoint, log)")
    train.add_argument("--lmbda", type=float, default=0.0483,
                       help="rate-distortion trade-off (higher = better quality)")
    train.add_argument("--steps", type=int, default=3000, help="total steps of the run")
    train.add_argument("--batch", type=int,
                       help="crops per step (new runs: 8; resuming: changes the run's)")
    train.add_argument("--crop", type=int,
                       help="crop side in pixels (new runs: 128; resuming: changes the run's)")
    train.add_argument("--lr", type=float,
                       help="Adam learning rate (new runs: 5e-4; resuming: lower it)")
    train.add_argument("--latent", type=int, default=96,
                       help="latent channels M (a narrower --init checkpoint is widened)")
    train.add_argument("--hyper", type=int, default=0,
                       help="hyper-synthesis hidden width (0 = same as --latent)")
    train.add_argument("--hyper-kernel", type=int, default=3, choices=(1, 3),
                       help="kernel of the hyper-synthesis's last layer (new runs; 1 decodes "
                            "faster on a CPU)")
    train.add_argument("--synthesis-first", type=int, default=0,
                       help="channels of the synthesis's first (1/8 resolution) stage "
                            "(0 = N; a narrower --init checkpoint is widened)")
    train.add_argument("--analysis-width", type=int, default=0,
                       help="hidden channels of the analysis transform, which only encoding "
                            "runs (0 = N; a narrower --init checkpoint is widened)")
    train.add_argument("--ssim-weight", type=float, default=0.0,
                       help="share of the distortion measured as 1-SSIM instead of MSE (0-1)")
    train.add_argument("--init", type=Path, help="checkpoint to fine-tune from (new runs only)")
    train.add_argument("--ladder-gains", type=_gains, metavar="G1,G2,...",
                       help="tune the decoder side of --init for a quality ladder: only the "
                            "hyper-synthesis and synthesis train, each crop coded at one of "
                            "these latent gains (new runs; export with the same --gains)")
    train.add_argument("--jpeg-recompress", type=_quality_range, metavar="LOW-HIGH",
                       help="re-encode half the training crops as JPEG at a random quality "
                            "in this range (e.g. 30-90), as scanners store the slides the "
                            "converter reads (new runs)")
    train.add_argument("--data", type=Path, help="shared data folder (default ../shared/data)")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all)")
    train.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    train.add_argument("--amp", choices=("none", "bf16"), default="none",
                       help="bf16 autocast for the transforms (entropy models stay float32)")
    train.add_argument("--minutes", type=float,
                       help="wall-clock limit: save, log and stop cleanly after this long")
    train.add_argument("--data-pack", type=Path,
                       help="train from a pack made by 'dlwsi-train pack' instead of --data")

    pack = sub.add_parser(
        "pack",
        help="pack a lossless sample of the training side into one file",
        description="Write a byte-budgeted .npz of training regions (lossless) and the "
                    "validation tiles, for training where shared/data is not (a GPU machine).",
    )
    pack.add_argument("out", type=Path, help="pack file to write (.npz)")
    pack.add_argument("--budget-mb", type=float, default=20.0, help="size limit in MiB")
    pack.add_argument("--tile", type=int, default=256,
                      help="regions are tiles of the training images of about this side")
    pack.add_argument("--min-side", type=int, default=256,
                      help="leave out images smaller than this (the largest crop to train on)")
    pack.add_argument("--val-per-image", type=int, default=4,
                      help="validation tiles per validation image (0 = none; train uses 4)")
    pack.add_argument("--codec", choices=("webp", "png"), default="webp")
    pack.add_argument("--seed", type=int, default=0)
    pack.add_argument("--data", type=Path, help="shared data folder (default ../shared/data)")

    release = sub.add_parser(
        "from-release",
        help="rebuild a training checkpoint from a released model file",
        description="Write a checkpoint of a released network (transforms exactly, "
                    "hyper-synthesis from its integer layers, hyper-latent prior fitted to "
                    "its tables) to start a new run from with 'train --init'. Checkpoints "
                    "are not released, so this is how training continues a release.",
    )
    release.add_argument("model", help="released model id, e.g. he-mshl-v3")
    release.add_argument("out", type=Path, help="checkpoint file to write (.pt)")

    export = sub.add_parser(
        "export",
        help="export a run's checkpoint as a released model file",
        description="Write weights/<model>-q<first>[-<last>].dlwsi, one file holding a "
                    "quality rung per latent gain, and register the rungs in the manifest. "
                    "A gain below 1 quantizes the latent more coarsely (fewer bits, lower "
                    "quality); gain 1 is the network as trained.",
    )
    export.add_argument("run", type=Path, help="run folder holding checkpoint.pt")
    export.add_argument("--model", required=True, help="model family id, e.g. he-mshl-v2")
    export.add_argument("--quality", type=int, required=True,
                        help="quality of the first (lowest) rung; the next gains get the "
                             "next qualities")
    export.add_argument("--gains", type=_gains, default=[1.0],
                        help="comma-separated, increasing latent gains, one rung each "
                             "(default: 1)")
    export.add_argument("--weights", type=Path, default=Path("weights"), help="weights folder")
    export.add_argument("--data", type=Path, help="shared data folder (default ../shared/data)")
    export.add_argument("--default", action="store_true", help="make this family the default")
    export.add_argument("--default-quality", type=int, metavar="Q",
                        help="make rung Q the family's default quality")

    int8 = sub.add_parser(
        "export-int8",
        help="release a model whose synthesis runs in int8, from a fine-tuned synthesis",
        description="Write PARENT's model file with its synthesis replaced by an int8 one "
                    "(the sub-pixel synthesis fine-tuned by 'benchmarks/int8_synthesis.py "
                    "--save', quantized on its own grids) under a new model id, and register "
                    "its rungs. Everything else is the parent's, so its chunks hold the same "
                    "bits; only the decoded pixels differ, by what the int8 synthesis costs.",
    )
    int8.add_argument("fine_tuned", type=Path,
                      help="synthesis_qat.pt written by benchmarks/int8_synthesis.py --save")
    int8.add_argument("--parent", required=True, help="released model id, e.g. he-mshl-v3")
    int8.add_argument("--model", required=True, help="new model id, e.g. he-mshl-v3-int8")
    int8.add_argument("--weights", type=Path, default=Path("weights"), help="weights folder")
    int8.add_argument("--default-quality", type=int, metavar="Q",
                      help="make rung Q the new model's default quality")
    return parser


def _gains(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}"
                                         ) from None


def _quality_range(text: str) -> list[int]:
    low, sep, high = text.partition("-")
    try:
        qualities = [int(low), int(high if sep else low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JPEG quality range LOW-HIGH: {text!r}"
                                         ) from None
    if not 1 <= qualities[0] <= qualities[1] <= 100:
        raise argparse.ArgumentTypeError(f"JPEG qualities must be 1 <= LOW <= HIGH <= 100: "
                                         f"{text!r}")
    return qualities


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pack":
        from .data import default_data_root
        from .pack import build_pack

        build_pack(args.data or default_data_root(), args.out, budget_mb=args.budget_mb,
                   tile=args.tile, min_side=args.min_side, val_per_image=args.val_per_image,
                   seed=args.seed, codec=args.codec)
        return 0
    try:
        import torch
    except ImportError:
        print("dlwsi-train needs the training extra: pip install 'numcodecs-dlwsi[train]'",
              file=sys.stderr)
        return 2
    if args.command == "train":
        from .train import TrainConfig, train

        if args.threads:
            torch.set_num_threads(args.threads)
        overrides = tuple(name for name in ("batch", "crop") if getattr(args, name) is not None)
        config = TrainConfig(lmbda=args.lmbda, steps=args.steps,
                             batch=args.batch or TrainConfig.batch,
                             crop=args.crop or TrainConfig.crop, lr=args.lr, M=args.latent,
                             hyper=args.hyper, hyper_kernel=args.hyper_kernel,
                             first=args.synthesis_first,
                             analysis=args.analysis_width,
                             ssim_weight=args.ssim_weight,
                             init=str(args.init) if args.init else None,
                             ladder_gains=args.ladder_gains,
                             jpeg_recompress=args.jpeg_recompress)
        train(args.run, config, data_root=args.data, device=args.device, amp=args.amp,
              minutes=args.minutes, data_pack=args.data_pack, overrides=overrides)
        return 0
    if args.command == "from-release":
        from ..model_store import ModelNotAvailableError, resolve
        from .from_release import write_checkpoint_from_release

        try:
            excess = write_checkpoint_from_release(resolve(args.model, None), args.out)
        except (ModelNotAvailableError, ValueError, FileExistsError) as error:
            print(f"dlwsi-train from-release: {error}", file=sys.stderr)
            return 2
        print(f"{args.out}: {args.model}'s network; hyper-latent prior fitted to its tables "
              f"within {excess:.2e} bits per symbol")
        return 0
    if args.command == "export-int8":
        from ..model_store import ModelNotAvailableError, resolve
        from .int8_synthesis import export_int8_model

        try:
            path = export_int8_model(resolve(args.parent, None), args.fine_tuned, args.model,
                                     args.weights, args.default_quality)
        except (ModelNotAvailableError, ValueError, FileExistsError, OSError) as error:
            print(f"dlwsi-train export-int8: {error}", file=sys.stderr)
            return 2
        print(path)
        return 0
    from .export import export_model

    try:
        path = export_model(args.run / "checkpoint.pt", args.weights, args.model, args.quality,
                            gains=args.gains, data_root=args.data, make_default=args.default,
                            default_quality=args.default_quality)
    except (ValueError, FileExistsError) as error:
        print(f"dlwsi-train export: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0
