"""The results pages say what their data says: each page under docs/results is its JSON
rendered by the benchmark that measured it (benchmarks/report.py), never hand-edited."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
REPORT = REPO / "benchmarks" / "report.py"


def _check(*json_paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), "--check", *map(str, json_paths)],
                          capture_output=True, text=True, cwd=REPO)


def test_every_results_page_equals_its_json_rendered():
    proc = _check()
    assert proc.returncode == 0, proc.stderr


def test_every_results_page_has_its_json():
    pages = {p.stem for p in RESULTS.glob("*.md")} - {"README"}
    with_data = {p.stem for p in RESULTS.glob("*.json")}
    assert pages <= with_data, f"pages without data: {sorted(pages - with_data)}"


def test_a_hand_edited_page_is_caught(tmp_path):
    for name in ("zero_loss.json", "zero_loss.md"):
        shutil.copy(RESULTS / name, tmp_path / name)
    page = tmp_path / "zero_loss.md"
    page.write_text(page.read_text().replace("| transcode |", "| transcoded |", 1))
    proc = _check(tmp_path / "zero_loss.json")
    assert proc.returncode == 1
    assert "zero_loss.md differs from its JSON's rendering" in proc.stderr
