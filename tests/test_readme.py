"""The README's commands are the ones CI runs and the ones that exist."""

from __future__ import annotations

import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_demo_command_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && vitdistill demo" in readme
