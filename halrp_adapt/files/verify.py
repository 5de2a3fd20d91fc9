"""Check every file of a shelf against its index, without a backbone: `verify_shelf`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .serialization import PEFT_PREFIX
from .storage import (
    CONFIG_NAME,
    INDEX_NAME,
    LOCK_NAME,
    SIGNATURE_NAME,
    WEIGHTS_NAME,
    read_evidence,
    read_index,
    read_signature,
    read_task_config,
    read_tensors,
    shared_index_lock,
)


@dataclass
class Verification:
    """What `verify_shelf` found: `problems` make the shelf unusable as indexed; `notes` are
    harmless leftovers (e.g. the folder of a save that crashed before its index entry)."""

    tasks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shelf(root: str | Path, trusted: Path | None = None) -> Verification:
    """Read the index, then each task's config and tensors: checksums and sizes against the
    index, tensors finite, a factor for every layer the config gives a rank.

    Example:
        >>> import tempfile, torch, halrp_adapt
        >>> cl = halrp_adapt.attach(torch.nn.Sequential(torch.nn.Linear(4, 4),
        ...                                             torch.nn.Linear(4, 2)), budget=0.9)
        >>> cl.add_task("a"); _ = cl.end_task()
        >>> shelf = tempfile.mkdtemp(); _ = cl.save_pretrained(shelf)
        >>> verify_shelf(shelf).ok
        True
    """
    root = Path(root)
    with shared_index_lock(root):  # a save running meanwhile is seen whole or not at all
        return _verify(root, trusted)


def _verify(root: Path, trusted: Path | None) -> Verification:
    result = Verification()
    try:
        index = read_index(root, trusted)
    except (OSError, ValueError) as err:
        result.problems.append(f"index: {err}")
        return result
    result.tasks = list(index["tasks"])
    for task in result.tasks:
        result.problems += [f"{task}: {p}" for p in _task_problems(root, task, index, trusted)]
    known = set(result.tasks) | {
        INDEX_NAME,
        LOCK_NAME,
        "base_model.safetensors",
        "README.md",
        ".gitattributes",
    }
    for path in sorted(root.iterdir()):
        if path.name.endswith(".tmp") or (path.is_dir() and path.name not in known):
            result.notes.append(f"{path.name}: not in the index (left by an interrupted save?)")
    return result


def _task_problems(root: Path, task: str, index: dict, trusted: Path | None) -> list[str]:
    problems = []
    recorded = index["task_info"].get(task, {}).get("files", {})
    optional = [SIGNATURE_NAME] if SIGNATURE_NAME in recorded else []
    for name in (WEIGHTS_NAME, CONFIG_NAME, *optional):
        path = root / task / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        record = recorded.get(name)
        if record is None:
            continue  # shelves written before checksums were recorded
        data = path.read_bytes()
        if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get(
            "sha256"
        ):
            problems.append(
                f"{name} differs from the index ({len(data)} bytes, "
                f"{record.get('bytes')} recorded; checksum mismatch)"
            )
    if problems:
        return problems
    try:
        config = read_task_config(root, task, trusted)
        tensors = read_tensors(root / task / WEIGHTS_NAME, trusted or root)
        read_signature(root, task, trusted)
        read_evidence(root, task, trusted)
    except (OSError, ValueError) as err:
        return [str(err)]
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        problems.append(f"tensors with NaN or infinite values: {bad[:3]}")
    for layer, rank in (config.rank_pattern or {}).items():
        if rank and not any(k.startswith(f"{PEFT_PREFIX}{layer}.halrp_A") for k in tensors):
            problems.append(f"layer {layer} has rank {rank} in the config but no factor A")
    return problems
