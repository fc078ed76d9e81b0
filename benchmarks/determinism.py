"""Cross-device / cross-setting determinism of dlwsi at scale.

Takes ``--chunks`` real H&E crops (256x256 by default) from ``../shared/data`` (every
H&E image and the two Aperio slides, tiled on two offset grids), spreads them over every
quality of the installed default model, encodes them once in a subprocess, then decodes
every chunk in one fresh subprocess per (execution provider, thread setting). Each
decoder records, per chunk, a digest of the decoded latents (``decode_latents``: the
hyper-latent symbols and ``y_hat``, which must be bit-identical on every machine) and of
the decoded pixels, and the PSNR against the original crop. A *failure* is any decode
that raises, or latents that differ from the first configuration's. Pixels come out of a
float synthesis transform, so their bit-identity is reported, not required.

A subset (``--encode-check``) is also encoded with the other thread settings, and the
bytes compared (the analysis transform is float too, so this is reported, not required).

CPU only here; on a GPU machine ``benchmarks/determinism_gpu.sh`` runs the same check
with the encoder on CUDA and the decoders on CPU (and the reverse)::

    nice -n 5 python benchmarks/determinism.py --chunks 2048 \
        --json docs/results/determinism_cpu.json
    python benchmarks/determinism.py --encode cuda:0 --decode cpu:1,cpu:2,cuda:0 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SLIDES = ("slides/aperio/CMU-1-Small-Region.svs", "slides/aperio/TCGA-CR-7395-01A-01-TS1.svs")
BATCH = 32


def collect_tiles(n: int, size: int) -> tuple[np.ndarray, list[str]]:
    """``n`` real crops (N, 3, size, size) and where each came from."""
    from numcodecs_dlwsi.train.data import IMAGE_SUFFIXES, read_image, read_slide

    sources = [(p.relative_to(DATA).as_posix(), read_image)
               for p in sorted((DATA / "he").rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    sources += [(s, read_slide) for s in SLIDES if (DATA / s).is_file()]
    tiles, origin = [], []
    for offset in (0, size // 2, size // 4, 3 * size // 4):
        for rel, reader in sources:
            image = reader(DATA / rel)
            h, w = image.shape[:2]
            for y in range(offset, h - size + 1, size):
                for x in range(offset, w - size + 1, size):
                    tiles.append(image[y:y + size, x:x + size].transpose(2, 0, 1))
                    origin.append(f"{rel}@{y},{x}")
                    if len(tiles) == n:
                        return np.ascontiguousarray(np.stack(tiles)), origin
    raise SystemExit(f"only {len(tiles)} crops of {size}x{size} in {DATA}; ask for fewer")


def _set_env(provider: str, threads: str) -> None:
    os.environ["DLWSI_PROVIDER"] = provider
    os.environ["DLWSI_THREADS"] = threads


def worker_encode(work: Path, provider: str, threads: str, limit: int | None) -> None:
    _set_env(provider, threads)
    from numcodecs_dlwsi.image_codec import encode_batch
    from numcodecs_dlwsi.model_store import resolve

    tiles = np.load(work / "tiles.npy", mmap_mode="r")
    quality = np.load(work / "quality.npy")
    n = len(tiles) if limit is None else min(limit, len(tiles))
    chunks: list[bytes] = [b""] * n
    for q in sorted(set(quality[:n].tolist())):
        ref = resolve(None, int(q))
        members = [i for i in range(n) if quality[i] == q]
        for start in range(0, len(members), BATCH):
            batch = members[start:start + BATCH]
            for i, chunk in zip(batch, encode_batch([np.asarray(tiles[i]) for i in batch], ref),
                                strict=True):
                chunks[i] = chunk
    _write_chunks(work / f"chunks-{provider}-{threads}.bin", chunks)


def _write_chunks(path: Path, chunks: list[bytes]) -> None:
    lengths = np.array([len(c) for c in chunks], np.int64)
    with open(path, "wb") as f:
        f.write(len(chunks).to_bytes(8, "little"))
        f.write(lengths.tobytes())
        for c in chunks:
            f.write(c)


def read_chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    lengths = np.frombuffer(data, np.int64, n, 8)
    out, at = [], 8 + 8 * n
    for length in lengths:
        out.append(data[at:at + int(length)])
        at += int(length)
    return out


def worker_decode(work: Path, chunk_file: str, provider: str, threads: str) -> None:
    _set_env(provider, threads)
    from numcodecs_dlwsi.image_codec import decode_batch, decode_latents

    chunks = read_chunks(work / chunk_file)
    tiles = np.load(work / "tiles.npy", mmap_mode="r")
    rows: list[dict] = []

    def one(batch: list[int]) -> None:
        blobs = [chunks[i] for i in batch]
        latents = decode_latents(blobs)
        images = decode_batch(blobs)
        for i, lat, image in zip(batch, latents, images, strict=True):
            h = hashlib.sha256(lat.z_symbols.tobytes())
            h.update(lat.y_hat.tobytes())
            ok_shape = image.shape == tiles[i].shape and image.dtype == np.uint8
            mse = float(np.mean((image.astype(np.float64) - tiles[i]) ** 2)) if ok_shape else 0
            rows.append({"i": i, "latents": h.hexdigest()[:32],
                         "pixels": hashlib.sha256(image.tobytes()).hexdigest()[:32],
                         "psnr": 10 * np.log10(255.0**2 / max(mse, 1e-12)),
                         "error": None if ok_shape else f"shape {image.shape} {image.dtype}"})

    start = time.perf_counter()
    for s in range(0, len(chunks), BATCH):
        batch = list(range(s, min(s + BATCH, len(chunks))))
        try:
            one(batch)
        except Exception:  # noqa: BLE001 - attribute the failure to its chunk
            for i in batch:
                try:
                    one([i])
                except Exception as exc:  # noqa: BLE001
                    rows.append({"i": i, "latents": None, "pixels": None, "psnr": None,
                                 "error": f"{type(exc).__name__}: {exc}"})
    rows.sort(key=lambda r: r["i"])
    out = {"provider": provider, "threads": threads, "seconds": time.perf_counter() - start,
           "rows": rows}
    (work / f"decoded-{chunk_file}-{provider}-{threads}.json").write_text(json.dumps(out))


def _sub(*args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=2048)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--encode", default="cpu:0", help="provider:threads of the encoder")
    p.add_argument("--decode", default="cpu:1,cpu:2",
                   help="comma-separated provider:threads settings that decode everything")
    p.add_argument("--encode-check", type=int, default=128,
                   help="chunks re-encoded with each --decode setting, bytes compared")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, work, *rest = args.worker
        if kind == "encode":
            worker_encode(Path(work), rest[0], rest[1], int(rest[2]) if rest[2] != "all"
                          else None)
        else:
            worker_decode(Path(work), rest[0], rest[1], rest[2])
        return

    from numcodecs_dlwsi.model_store import default_model, qualities

    with tempfile.TemporaryDirectory(prefix="dlwsi-det-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tiles, origin = collect_tiles(args.chunks, args.size)
        model = default_model()
        levels = qualities(model)
        quality = np.array([levels[i % len(levels)] for i in range(len(tiles))], np.int64)
        np.save(work / "tiles.npy", tiles)
        np.save(work / "quality.npy", quality)
        enc_p, enc_t = args.encode.split(":")
        t = time.perf_counter()
        _sub("--worker", "encode", str(work), enc_p, enc_t, "all")
        encode_s = time.perf_counter() - t
        chunk_file = f"chunks-{enc_p}-{enc_t}.bin"
        chunks = read_chunks(work / chunk_file)
        settings = [s.split(":") for s in args.decode.split(",") if s]
        decoded = []
        for prov, thr in settings:
            _sub("--worker", "decode", str(work), chunk_file, prov, thr)
            decoded.append(json.loads(
                (work / f"decoded-{chunk_file}-{prov}-{thr}.json").read_text()))
        # the encoder's bytes under the other settings (a subset)
        encode_checks = []
        for prov, thr in settings:
            if [prov, thr] == [enc_p, enc_t] or args.encode_check <= 0:
                continue
            _sub("--worker", "encode", str(work), prov, thr, str(args.encode_check))
            other = read_chunks(work / f"chunks-{prov}-{thr}.bin")
            same = sum(a == b for a, b in zip(chunks, other, strict=False))
            encode_checks.append({"setting": f"{prov}:{thr}", "chunks": len(other),
                                  "identical_bytes": same})

        reference = decoded[0]["rows"]
        failures, latent_mismatch, pixel_identical = [], 0, {}
        for d in decoded:
            name = f"{d['provider']}:{d['threads']}"
            same_pixels = 0
            for ref_row, row in zip(reference, d["rows"], strict=True):
                if row["error"]:
                    failures.append({"setting": name, "chunk": row["i"],
                                     "origin": origin[row["i"]], "error": row["error"]})
                elif row["latents"] != ref_row["latents"]:
                    latent_mismatch += 1
                    failures.append({"setting": name, "chunk": row["i"],
                                     "origin": origin[row["i"]], "error": "latents differ"})
                same_pixels += row["pixels"] == ref_row["pixels"]
            pixel_identical[name] = same_pixels
        psnr = {int(q): float(np.mean([r["psnr"] for r in reference
                                       if quality[r["i"]] == q and r["psnr"] is not None]))
                for q in levels}
        summary = {
            "model": model, "qualities": levels, "chunk_size": args.size,
            "chunks": len(chunks), "chunks_per_quality": {int(q): int((quality == q).sum())
                                                          for q in levels},
            "sources": sorted({o.split("@")[0] for o in origin}),
            "encoder": args.encode, "decoders": [f"{a}:{b}" for a, b in settings],
            "decodes": len(chunks) * len(settings),
            "failures": len(failures), "latent_mismatches": latent_mismatch,
            "failure_examples": failures[:20],
            "pixels_bit_identical_to_first_decoder": pixel_identical,
            "encode_bytes_identical": encode_checks,
            "mean_psnr_db_by_quality": psnr,
            "stored_bytes_mean": float(np.mean([len(c) for c in chunks])),
            "seconds": {"encode": round(encode_s, 1),
                        **{f"decode {d['provider']}:{d['threads']}": round(d["seconds"], 1)
                           for d in decoded},
                        "total": round(time.perf_counter() - started, 1)},
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "python": platform.python_version()},
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        if failures:
            sys.exit(1)


if __name__ == "__main__":
    main()
