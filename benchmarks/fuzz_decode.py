"""Fuzzing the dlwsi decoder: a counting mutation run and a coverage-guided atheris run.

Seeds are real chunks: crops of held-out H&E (64x64 to 256x256, both layouts) encoded at
every quality of the installed default model. Every case must end in a *clean* error
(``ValueError``, which ``ModelNotAvailableError`` is, or ``TypeError``) or a *correct*
decode (uint8, exactly the shape the header announces; an unchanged seed decodes to its
original image); within ``--case-limit`` seconds and without growing peak RSS past
``--rss-limit-mb``. Anything else is a finding.

``mutate`` (default ``--cases 100000``) applies one of: bit flips, byte edits, header
field forgery, payload edits/replacement, truncation, suffixes, insertion, deletion,
concatenation, header/payload splices, arbitrary bytes; half of the cases then get their
CRC recomputed so the entropy decoder, escape/end-marker checks and the
hyper-synthesis are reached, not only the checksum. ``atheris`` runs libFuzzer over
the same harness (first input byte selects whether the CRC is resealed), with the
``numcodecs_dlwsi`` package instrumented for coverage::

    nice -n 5 python benchmarks/fuzz_decode.py mutate --cases 100000 --json out.json
    nice -n 5 python benchmarks/fuzz_decode.py atheris --runs 20000 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HELD_OUT = "he/monuseg_nc/TCGA-21-5786-01Z-00-DX1.png"
CLEAN = (ValueError, TypeError)


def make_seeds() -> tuple[list[bytes], list[np.ndarray]]:
    from numcodecs_dlwsi.image_codec import decode, encode_batch
    from numcodecs_dlwsi.model_store import default_model, qualities, resolve
    from numcodecs_dlwsi.train.data import read_image

    image = read_image(DATA / HELD_OUT)
    crops = [image[:64, :64], image[300:364, 500:596].transpose(2, 0, 1),
             image[100:228, 600:792], image[500:756, 200:456].transpose(2, 0, 1)]
    model = default_model()
    seeds = []
    for q in qualities(model):
        seeds += encode_batch([np.ascontiguousarray(c) for c in crops], resolve(model, q))
    return seeds, [decode(s) for s in seeds]


def crc_offset(chunk: bytes) -> int:
    return 8 + chunk[7] + 20


def reseal(data: bytes) -> bytes:
    if len(data) < 8 or len(data) < crc_offset(data) + 4:
        return data
    at = crc_offset(data)
    return data[:at] + struct.pack("<I", zlib.crc32(data[at + 4:], zlib.crc32(data[:at]))) \
        + data[at + 4:]


def mutate(rng: np.random.Generator, seeds: list[bytes]) -> tuple[str, bytes, int | None]:
    """One case: (operator name, bytes, index of the seed if unchanged else None)."""
    i = int(rng.integers(len(seeds)))
    a = bytearray(seeds[i])
    start = crc_offset(a) + 4
    op = str(rng.choice(["flip", "byte", "header", "payload-word", "payload-random",
                         "payload-zero", "truncate", "suffix", "insert", "delete", "concat",
                         "splice", "random"]))
    if op == "flip":
        for _ in range(int(rng.integers(1, 9))):
            a[int(rng.integers(len(a)))] ^= 1 << int(rng.integers(8))
    elif op == "byte":
        a[int(rng.integers(len(a)))] = int(rng.integers(256))
    elif op == "header":
        at = int(rng.integers(4, start))
        if rng.integers(2):
            a[at] = int(rng.integers(256))
        else:  # a whole 32-bit field, with values near the limits
            at = min(at, start - 4)
            value = int(rng.choice([0, 1, 63, 64, 65, 8192, 65535, 65536, 2**26, 2**32 - 1,
                                    int(rng.integers(2**32))]))
            a[at:at + 4] = struct.pack("<I", value)
    elif op == "payload-word":
        at = start + 4 * int(rng.integers((len(a) - start) // 4))
        a[at:at + 4] = struct.pack("<I", int(rng.integers(2**32)))
    elif op == "payload-random":
        a[start:] = rng.integers(0, 256, len(a) - start, dtype=np.uint8).tobytes()
    elif op == "payload-zero":
        k = 4 * int(rng.integers(1, (len(a) - start) // 4 + 1))
        a[len(a) - k:] = bytes(k)
    elif op == "truncate":
        a = a[:int(rng.integers(len(a)))]
    elif op == "suffix":
        a = a[int(rng.integers(1, len(a))):]
    elif op == "insert":
        at = int(rng.integers(len(a) + 1))
        a[at:at] = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
    elif op == "delete":
        at = int(rng.integers(len(a)))
        del a[at:at + int(rng.integers(1, 33))]
    elif op == "concat":
        a += seeds[int(rng.integers(len(seeds)))]
    elif op == "splice":
        b = seeds[int(rng.integers(len(seeds)))]
        a = a[:start] + b[crc_offset(b) + 4:]
    else:
        a = bytearray(rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8).tobytes())
        if rng.integers(2):
            a[:4] = b"DLWS"
    case = bytes(a)
    if rng.integers(2):
        op += "+crc"
        case = reseal(case)
    return op, case, i if case == seeds[i] else None


def run_case(case: bytes, expected: np.ndarray | None) -> str:
    """'decoded' or the clean exception's name; raises AssertionError on a finding."""
    from numcodecs_dlwsi import bitstream
    from numcodecs_dlwsi.image_codec import decode

    try:
        image = decode(case)
    except CLEAN as exc:
        return type(exc).__name__
    header, _ = bitstream.unpack(case)
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8, type(image)
    assert image.shape == header.shape, (image.shape, header.shape)
    if expected is not None:
        assert np.array_equal(image, expected), "an unchanged seed decoded differently"
    return "decoded"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mutate(args: argparse.Namespace) -> dict:
    seeds, decoded = make_seeds()
    rng = np.random.default_rng(args.seed)
    base_rss = rss_mb()
    outcomes: collections.Counter = collections.Counter()
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    findings, slowest = [], (0.0, "")
    reached = collections.Counter()  # how deep the resealed cases got
    start = time.perf_counter()
    for n in range(args.cases):
        op, case, seed = mutate(rng, seeds)
        t = time.perf_counter()
        try:
            result = run_case(case, decoded[seed] if seed is not None else None)
        except Exception as exc:  # noqa: BLE001 - every unclean outcome is a finding
            result = f"FINDING {type(exc).__name__}"
            if len(findings) < 50:
                findings.append({"case": n, "op": op, "error": f"{type(exc).__name__}: {exc}",
                                 "hex": case[:96].hex()})
        dt = time.perf_counter() - t
        if dt > slowest[0]:
            slowest = (dt, op)
        if dt > args.case_limit:
            findings.append({"case": n, "op": op, "error": f"took {dt:.1f} s"})
        outcomes[result] += 1
        by_op[op][result] += 1
        if op.endswith("+crc") and result == "ValueError":  # not ModelNotAvailableError
            reached[_stage(case)] += 1
        if rss_mb() - base_rss > args.rss_limit_mb:
            findings.append({"case": n, "op": op, "error": f"peak RSS grew to {rss_mb():.0f} MB"})
            break
        if args.progress and n and n % args.progress == 0:
            print(f"{n} cases, {n / (time.perf_counter() - start):.0f}/s, "
                  f"{dict(outcomes)}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    return {"mode": "mutate", "cases": sum(outcomes.values()), "seconds": round(seconds, 1),
            "cases_per_s": round(sum(outcomes.values()) / seconds, 1),
            "seeds": len(seeds), "outcomes": dict(outcomes),
            "resealed_rejected_at": dict(reached),
            "by_operator": {k: dict(v) for k, v in sorted(by_op.items())},
            "slowest_case_s": round(slowest[0], 3), "slowest_op": slowest[1],
            "peak_rss_mb": round(rss_mb(), 1), "rss_growth_mb": round(rss_mb() - base_rss, 1),
            "findings": findings}


def _stage(case: bytes) -> str:
    """Which check refused a resealed case (a ValueError, not ModelNotAvailableError):
    the header/framing checks, or the payload (entropy decoder, escapes, end marker)."""
    from numcodecs_dlwsi import bitstream

    try:
        bitstream.unpack(case)
    except ValueError:
        return "header/framing"
    return "entropy decoder (payload)"


# ------------------------------------------------------------------------------ atheris


def atheris_child(corpus: Path, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["numcodecs_dlwsi"]):
        from numcodecs_dlwsi import bitstream
        from numcodecs_dlwsi.image_codec import decode
    executions = [0]

    def one_input(data: bytes) -> None:
        executions[0] += 1
        if not data:
            return
        case = reseal(data[1:]) if data[0] & 1 else data[1:]
        try:
            image = decode(case)
        except CLEAN:
            return
        header, _ = bitstream.unpack(case)
        if image.dtype != np.uint8 or image.shape != header.shape:
            raise AssertionError(f"decoded to {image.dtype} {image.shape}, header says "
                                 f"{header.shape}")

    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], one_input)
    atheris.Fuzz()


def run_atheris(args: argparse.Namespace) -> dict:
    seeds, _ = make_seeds()
    with tempfile.TemporaryDirectory(prefix="dlwsi-fuzz-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for k, s in enumerate(seeds):
            (corpus / f"seed-{k}-sealed").write_bytes(b"\x01" + s)
            (corpus / f"seed-{k}-raw").write_bytes(b"\x00" + s)
        flags = [f"-atheris_runs={args.runs}", f"-max_total_time={args.max_time}",
                 f"-rss_limit_mb={int(args.rss_limit_mb) + 1500}",
                 f"-timeout={int(args.case_limit)}",
                 f"-seed={args.seed}", "-print_final_stats=1",
                 f"-artifact_prefix={Path(tmp)}/", "-max_len=20000"]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "atheris-child", str(corpus), *flags],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        log = proc.stderr
        stats = {}
        for line in log.splitlines():
            if line.startswith("stat::"):
                key, _, value = line[6:].partition(":")
                stats[key.strip()] = int(value.strip())
        done = [ln.split() for ln in log.splitlines() if ln.startswith("Done ")]
        if done and "number_of_executed_units" not in stats:  # "Done N in T second(s)"
            stats["number_of_executed_units"] = int(done[-1][1])
            stats["average_exec_per_sec"] = round(int(done[-1][1]) / max(1, int(done[-1][3])))
        crashes = sorted(p.name for p in Path(tmp).iterdir()
                         if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
        cov = [ln for ln in log.splitlines() if " cov: " in ln]
        corpus_files = len(list(corpus.iterdir()))
    return {"mode": "atheris", "returncode": proc.returncode, "seconds": round(seconds, 1),
            "executions": stats.get("number_of_executed_units"),
            "executions_per_s": stats.get("average_exec_per_sec"),
            "peak_rss_mb": stats.get("peak_rss_mb"), "new_units_added": stats.get(
                "new_units_added"), "corpus_files_at_end": corpus_files,
            "last_coverage_line": cov[-1].strip() if cov else None,
            "findings": crashes, "log_tail": log.splitlines()[-15:]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "atheris-child":
        atheris_child(Path(sys.argv[2]), sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["mutate", "atheris"])
    p.add_argument("--cases", type=int, default=100_000, help="mutate: number of cases")
    p.add_argument("--runs", type=int, default=20_000, help="atheris: executions")
    p.add_argument("--max-time", type=int, default=600, help="atheris: seconds at most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--case-limit", type=float, default=20.0, help="seconds per case")
    p.add_argument("--rss-limit-mb", type=float, default=1500.0)
    p.add_argument("--progress", type=int, default=5000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("DLWSI_THREADS", "1")
    result = run_mutate(args) if args.mode == "mutate" else run_atheris(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["findings"] or (args.mode == "atheris" and result["returncode"] != 0):
        sys.exit(1)


if __name__ == "__main__":
    main()
