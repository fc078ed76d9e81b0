"""Results pages: every benchmark's JSON and the Markdown page rendered from it alone.

A benchmark run with ``--json docs/results/NAME.json`` writes that file and, beside it,
``NAME.md``: the command that produced it, the package version, date and machine, and the
tables, all taken from the JSON. A page is never edited by hand; after a change to a
renderer, re-render every page from its stored JSON:

    python benchmarks/report.py                  # every docs/results/*.json with a page
    python benchmarks/report.py --check          # exit 1 naming each page that differs
    python benchmarks/report.py docs/results/rd.json

Each benchmark module titles its page (``title``) and renders its body (``render``); the
JSON's ``benchmark`` field names the module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = REPO / "docs" / "results"


def machine() -> str:
    """'2-core AMD EPYC, 24 GiB': the CPU, its usable cores and memory."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return f"{cores}-core {name}, {memory:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        return f"{cores}-core {name}"


def provenance(benchmark: str, argv: list[str] | None = None) -> dict:
    """What a page says about how its numbers were made: the command as typed from the
    repository root (with the ``DLWSI_*`` settings in force), the package version, the
    date (UTC) and the machine."""
    from numcodecs_dlwsi import __version__

    args = sys.argv[1:] if argv is None else argv
    # the codec's own settings change what is measured: they belong to the command
    environment = [f"{key}={value}" for key, value in sorted(os.environ.items())
                   if key.startswith("DLWSI_")]
    return {"benchmark": benchmark,
            "command": shlex.join([*environment, "python", f"benchmarks/{benchmark}.py",
                                   *args]),
            "package": __version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": machine()}


def table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A Markdown table; cells are written as given (format numbers before)."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(value: float | None, digits: int = 1) -> str:
    """A signed percentage, or 'n/a' where there is none (curves that do not overlap)."""
    return "n/a" if value is None else f"{value:+.{digits}f}%"


def _wrapped_command(command: str, width: int = 88) -> str:
    """The command split over lines with shell continuations, for reading."""
    words, lines, line = shlex.split(command), [], ""
    for word in words:
        word = shlex.quote(word)
        if line and len(line) + 1 + len(word) > width:
            lines.append(line + " \\")
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _module(benchmark: str) -> object:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(benchmark)


def render_page(results: dict, json_name: str) -> str:
    """The whole page of one JSON: title, provenance, command, the benchmark's body."""
    module = _module(results["benchmark"])
    title: Callable[[dict], str] = module.title
    body: Callable[[dict], str] = module.render
    return "\n".join([
        f"# {title(results)}", "",
        f"Measured with numcodecs-dlwsi {results['package']} on {results['date']}, "
        f"{results['machine']}. Rendered from [{json_name}]({json_name}) by "
        "`python benchmarks/report.py`; the command below measures it again.", "",
        "```bash", _wrapped_command(results["command"]), "```", "",
        *([f"Note: {results['note']}", ""] if results.get("note") else []),
        body(results).rstrip(), ""])


def publish(json_path: Path, results: dict) -> Path:
    """Write ``results`` to ``json_path`` and its page beside it; return the page's path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    page = json_path.with_suffix(".md")
    page.write_text(render_page(results, json_path.name))
    return page


def finish(results: dict, json_path: Path | None, render: Callable[[dict], str]) -> None:
    """Print a run's page body; with ``json_path``, write the JSON and its page too."""
    print(render(results))
    if json_path:
        print(f"wrote {publish(json_path, results)}", file=sys.stderr)


def pages(paths: list[Path]) -> Iterable[tuple[Path, str]]:
    """(page path, rendered text) for each JSON that names its benchmark."""
    for path in paths:
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"report.py: {path}: not a readable results file ({exc})"
                             ) from None
        if isinstance(results, dict) and "command" in results:
            yield path.with_suffix(".md"), render_page(results, path.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path,
                        help="results files (default: every docs/results/*.json with a page)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each page that differs from its "
                             "JSON's rendering")
    args = parser.parse_args()
    stale = []
    for page, text in pages(args.json or sorted(RESULTS.glob("*.json"))):
        current = page.read_text() if page.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(page)
        else:
            page.write_text(text)
            print(f"wrote {page.relative_to(REPO) if page.is_relative_to(REPO) else page}")
    for page in stale:
        print(f"report.py: {page} differs from its JSON's rendering; run "
              "python benchmarks/report.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
