"""Fetch PEFT's own test files for the installed PEFT version (tests/test_peft_suite.py runs them).

PEFT publishes its tests in its source distribution on PyPI, so the files come from the
package registry, unchanged, at exactly the installed version; nothing of PEFT's code is kept in
this repository. They land in `.venv/peft-suite/peft-<version>/` (ignored by git) with
`SOURCE.json`, which records where they came from (version, file name and sha256 of the sdist).

    python scripts/fetch_peft_suite.py            # idempotent: does nothing when present
    python scripts/fetch_peft_suite.py --dest DIR

Exit status 0 when the files are there; 1, with the reason, when they could not be fetched
(offline, say): the suite's tests then skip, unless HALRP_REQUIRE_PEFT_SUITE=1 (CI) makes that
a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".venv" / "peft-suite"
# What the suite reads: the shared tester, its helpers and the two model matrices it builds on.
FILES = ("testing_common.py", "testing_utils.py", "test_custom_models.py", "test_decoder_models.py")


def suite_dir(dest: Path, peft_version: str) -> Path:
    return dest / f"peft-{peft_version}"


def fetch(dest: Path, peft_version: str) -> Path:
    target = suite_dir(dest, peft_version)
    if (target / "SOURCE.json").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"peft=={peft_version}",
                "--dest",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("peft-*.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest))  # same file system: the rename is atomic
        with tarfile.open(sdist) as archive:
            prefix = f"peft-{peft_version}/"
            wanted = [prefix + "LICENSE"] + [prefix + "tests/" + name for name in FILES]
            members = [m for m in archive.getmembers() if m.name in wanted and m.isfile()]
            missing = sorted(set(wanted) - {m.name for m in members})
            if missing:
                raise RuntimeError(f"{sdist.name} lacks {missing}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 refuses unsafe members
                archive.extractall(staging, members=members, filter="data")
            else:
                archive.extractall(staging, members=members)
        extracted = staging / f"peft-{peft_version}"
        source = {
            "package": "peft",
            "version": peft_version,
            "sdist": sdist.name,
            "sha256": digest,
            "files": ["tests/" + name for name in FILES],
        }
        text = json.dumps(source, indent=2) + "\n"
        (extracted / "SOURCE.json").write_text(text, encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        extracted.rename(target)
        staging.rmdir()
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args()
    peft_version = version("peft")
    try:
        target = fetch(args.dest, peft_version)
    except (subprocess.CalledProcessError, OSError, RuntimeError, ValueError) as err:
        print(f"could not fetch PEFT {peft_version}'s tests: {err}", file=sys.stderr)
        return 1
    print(f"PEFT {peft_version}'s tests in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
