"""Learn tasks on `tiny_cnn()` and save each into SHELF as soon as it ends, printing
`SAVED <task> <sha256 of its tensors>` after each save. With --forever, then save every task
again and again until killed (the crash test kills it with SIGKILL at some point).

    python tests/scripts/shelf_writer.py SHELF PREFIX COUNT [--forever]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import halrp_adapt  # noqa: E402
from halrp_adapt.files.serialization import task_state_dict  # noqa: E402

from conftest import batches, learn_task, tiny_cnn  # noqa: E402


def task_digest(handle: halrp_adapt.HalrpModel, name: str) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(task_state_dict(handle, name).items()):
        digest.update(key.encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shelf")
    parser.add_argument("prefix")
    parser.add_argument("count", type=int)
    parser.add_argument("--forever", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    for i in range(args.count):
        name = f"{args.prefix}{i}"
        learn_task(cl, name, batches(n=2, seed=100 + i), num_classes=3)
        cl.save_pretrained(args.shelf, tasks=[name])
        print(f"SAVED {name} {task_digest(cl, name)}", flush=True)
    while args.forever:
        for name in cl.tasks:
            cl.save_pretrained(args.shelf, tasks=[name])
            print(f"SAVED {name} {task_digest(cl, name)}", flush=True)


if __name__ == "__main__":
    main()
