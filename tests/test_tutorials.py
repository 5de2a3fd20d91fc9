"""docs/tutorials/*.md run as written: their Python blocks as one script, then each
`halrp-adapt` line of their bash blocks, in a fresh folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "docs" / "tutorials").glob("*.md"))


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(page, tmp_path):
    text = page.read_text()
    code = "\n".join(_blocks(text, "python"))
    assert code, f"{page.name} has no Python block"
    (tmp_path / "tutorial.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "tutorial.py"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for block in _blocks(text, "bash"):
        for line in block.splitlines():
            if line.startswith("halrp-adapt "):
                args = shlex.split(line)[1:]
                run = subprocess.run([sys.executable, "-m", "halrp_adapt.cli", *args],
                                     cwd=tmp_path, capture_output=True, text=True, env=env,
                                     timeout=600)
                assert run.returncode == 0, f"{line}\n{run.stdout}\n{run.stderr[-3000:]}"


def test_every_tutorial_is_linked_from_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for page in TUTORIALS:
        assert f"docs/tutorials/{page.name}" in readme
