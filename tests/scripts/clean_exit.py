"""End a multi-process test script without gloo's exit race.

After `destroy_process_group` the gloo group can still be referenced (a DTensor's device mesh
holds it), so its worker threads are torn down by interpreter-exit destructors in no fixed
order; now and then one is destroyed while joinable and the process aborts with "terminate
called without an active exception" after all its work is done. Every rank waits for the
others, drops the group, flushes, and leaves with `os._exit`, which runs no destructors.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def finish_distributed(code: int = 0) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
