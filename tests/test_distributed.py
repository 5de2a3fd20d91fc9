"""FSDP2 wrapping keeps HALRP's task parameters (2 CPU ranks, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fsdp_step.py"


def test_task_parameters_survive_fsdp_wrapping():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", "29547", str(SCRIPT)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    trainable = set(result["trainable"])
    assert trainable and any(".halrp_A.a" in n for n in trainable)
    assert set(result["still_trainable"]) == trainable
    assert trainable <= set(result["sharded"])  # sharded by FSDP, not dropped
    assert set(result["changed"]) == trainable  # only the task's parameters moved
