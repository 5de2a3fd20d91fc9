"""Load every task of SHELF onto a fresh `tiny_cnn()` over and over until STOP_FILE exists;
print `READS <loads> ERRORS <errors>` and the first error, if any.

    python tests/scripts/shelf_reader.py SHELF STOP_FILE
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import halrp_adapt  # noqa: E402

from conftest import tiny_cnn  # noqa: E402


def main() -> None:
    shelf, stop = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    loads, errors, first = 0, 0, ""
    while not stop.exists() or loads == 0:
        if not (shelf / "halrp_index.json").exists():
            time.sleep(0.01)  # the writer is still starting
            continue
        try:
            halrp_adapt.load(tiny_cnn(), shelf)
            loads += 1
        except Exception as err:  # every failure counts; the test shows the first
            errors += 1
            first = first or f"{type(err).__name__}: {err}"
    print(f"READS {loads} ERRORS {errors} {first}", flush=True)


if __name__ == "__main__":
    main()
