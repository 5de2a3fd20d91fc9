"""Pre-seed an empty venv with the distributions a pip install plan names, by hard links.

Used by `check_user_install.sh`: the user's `pip install .` needs a CUDA build of torch of
about 5.5 GB, and CI machines do not always have the disk for a second copy beside `.venv`.
pip's own `--dry-run --report` plan (made in the empty venv) says which distribution and
version an empty install takes; each one that this interpreter's environment (`.venv`) holds
at exactly that version is linked file by file from its RECORD, so it costs no disk. pip then
runs `pip install .` as usual and installs whatever was not seeded. Console scripts are copied
with their `#!` line pointed at the new venv, so none of them runs `.venv`'s interpreter.

Run it with `.venv`'s python:

    .venv/bin/python scripts/seed_venv.py plan.json /tmp/venv
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name as _canonical  # .venv has it (accelerate's)


def _planned(report_path: Path) -> dict[str, str]:
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return {
        _canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report["install"]
    }


def _place(source: Path, target: Path, source_prefix: Path, target_prefix: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    if source.parent.name == "bin":
        script = source.read_bytes()
        if script.startswith(b"#!"):
            old, new = (os.fsencode(prefix / "bin") for prefix in (source_prefix, target_prefix))
            target.write_bytes(script.replace(old, new))
            shutil.copymode(source, target)
            return
    try:
        os.link(source, target)
    except OSError:  # another file system: a plain copy still works, it only costs disk
        shutil.copy2(source, target)


def seed(report_path: Path, target_prefix: Path, skip: set[str]) -> tuple[int, list[str]]:
    """Link every planned distribution held here at the planned version.

    Returns how many were seeded and the names left for pip to install.
    """
    planned = _planned(report_path)
    source_prefix = Path(sys.prefix).resolve()
    seeded = 0
    for dist in metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        if name in skip or planned.get(name) != dist.version or dist.files is None:
            continue
        for record in dist.files:
            source = Path(str(dist.locate_file(record))).resolve()
            if not source.is_file():
                continue
            try:
                relative = source.relative_to(source_prefix)
            except ValueError:
                continue
            _place(source, target_prefix / relative, source_prefix, target_prefix)
        seeded += 1
        planned.pop(name)  # a name found twice on the path is seeded once
    return seeded, sorted(planned)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: seed_venv.py PLAN.json VENV [SKIP_NAME ...]")
    report, target = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    skip = {_canonical(name) for name in sys.argv[3:]}
    seeded, left = seed(report, target, skip)
    print(
        f"user install: seeded {seeded} of {seeded + len(left)} planned distributions "
        f"from {sys.prefix}; pip installs {', '.join(left) or 'none'}"
    )


if __name__ == "__main__":
    main()
