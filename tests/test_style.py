"""One formatter and linter configuration (pyproject.toml), which the code passes."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_code_is_formatted_and_lint_clean():
    for command in (["format", "--check"], ["check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, str(REPO)], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
