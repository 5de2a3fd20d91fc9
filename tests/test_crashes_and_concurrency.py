"""Real processes: SIGKILL during save_pretrained leaves every saved task loadable, two writers
share one shelf without losing a task, and a reader never sees a half-written shelf."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import halrp_adapt
from halrp_adapt.files.storage import read_index

from conftest import KILLED_RETURNCODE, tiny_cnn

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _writer(shelf: Path, prefix: str, count: int, forever: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPTS / "shelf_writer.py"), str(shelf),
                             prefix, str(count)] + (["--forever"] if forever else []),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _saved(lines: list[str]) -> dict[str, str]:
    return dict(line.split()[1:3] for line in lines if line.startswith("SAVED "))


def _check_shelf(shelf: Path, digests: dict[str, str]) -> list[str]:
    """Every task in the index loads, with the tensors its writer reported."""
    sys.path.insert(0, str(SCRIPTS))
    from shelf_writer import task_digest

    index = read_index(shelf)
    assert set(digests) <= set(index["tasks"]), "a task reported saved is missing"
    for name in index["tasks"]:
        handle = halrp_adapt.load(tiny_cnn(), shelf, tasks=[name])
        if name in digests:
            assert task_digest(handle, name) == digests[name], f"task {name} changed"
    return index["tasks"]


@pytest.mark.parametrize("saves_before_kill,delay", [(1, 0.0), (4, 0.013), (7, 0.031)])
def test_kill_during_save_keeps_every_saved_task(tmp_path, saves_before_kill, delay):
    shelf = tmp_path / "shelf"
    writer = _writer(shelf, "t", 4, forever=True)
    lines = []
    while len(lines) < saves_before_kill:
        line = writer.stdout.readline()
        assert line, writer.stderr.read()[-2000:]
        lines.append(line)
    time.sleep(delay)  # land somewhere inside the next save
    writer.kill()
    writer.wait()
    assert writer.returncode == KILLED_RETURNCODE
    tasks = _check_shelf(shelf, _saved(lines))
    assert len(tasks) >= min(saves_before_kill, 4)


def test_two_writers_into_one_shelf(tmp_path):
    shelf = tmp_path / "shelf"
    writers = [_writer(shelf, prefix, 4) for prefix in ("p", "q")]
    outputs = [w.communicate(timeout=300) for w in writers]
    assert all(w.returncode == 0 for w in writers), [err[-2000:] for _, err in outputs]
    digests = {}
    for out, _ in outputs:
        digests.update(_saved(out.splitlines()))
    assert sorted(_check_shelf(shelf, digests)) == sorted(f"{p}{i}" for p in "pq"
                                                          for i in range(4))


def test_reader_while_a_writer_saves(tmp_path):
    shelf, stop = tmp_path / "shelf", tmp_path / "stop"
    writer = _writer(shelf, "w", 6)
    reader = subprocess.Popen([sys.executable, str(SCRIPTS / "shelf_reader.py"), str(shelf),
                               str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV)
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    stop.touch()
    read_out, read_err = reader.communicate(timeout=300)
    assert reader.returncode == 0, read_err[-2000:]
    loads, errors = int(read_out.split()[1]), int(read_out.split()[3])
    assert errors == 0, read_out
    assert loads >= 1
    _check_shelf(shelf, _saved(out.splitlines()))
