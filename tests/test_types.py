"""The type hints stay checked: mypy over agent and hw, with the project's config (hw.* strict).

A hint that no checker reads drifts from the code; this keeps every one of them read on each
run. mypy's cache goes to tmp_path, never into the checkout (CI fails on stray files there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow      # a cold mypy run over 80-odd modules takes several seconds
def test_mypy_reports_no_errors(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy-cache"), "--no-color-output", "agent", "hw"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    if done.returncode != 0:
        pytest.fail(f"mypy agent hw (exit {done.returncode}):\n{done.stdout}{done.stderr}", pytrace=False)
    assert "Success" in done.stdout, done.stdout + done.stderr
