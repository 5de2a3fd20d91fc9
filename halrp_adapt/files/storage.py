"""The shelf on disk: one folder per task in PEFT's layout, and an index over them.

```
shelf/
  halrp_index.json              tasks in order, backbone identity, shared options, task summaries
  base_model.safetensors        only when a task trained the backbone itself (train_base)
  <task>/adapter_model.safetensors
  <task>/adapter_config.json    a PEFT adapter config (peft_type "HALRP")
  <task>/task_signature.safetensors   the task's signature for task retrieval, when it has one
  <task>/task_evidence.safetensors    its own-feature evidence for checking candidates, if any
```

Every file is written to a temporary name in its folder and renamed into place, and the index
is read, merged and rewritten under an exclusive lock, so that a crash or a concurrent writer
never leaves a task half-written nor drops another task from the index. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import ReadWriteLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .._version import __version__
from ..adapters.routing import case_twin, check_task_name
from ..config import FORMAT_VERSION, HalrpConfig
from ..method.task_evidence import TaskEvidence
from ..method.task_signature import TaskSignature
from .serialization import backbone_fingerprint, backbone_state, task_state_dict

if TYPE_CHECKING:
    from ..handle.model import HalrpModel

INDEX_NAME = "halrp_index.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
SIGNATURE_NAME = "task_signature.safetensors"
EVIDENCE_NAME = "task_evidence.safetensors"
BASE_NAME = "base_model.safetensors"
LOCK_NAME = ".halrp.lock"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Windows refuses to replace a file another process has open for a moment (a virus scanner, the
# search indexer, a reader without the lock): retry for about a second before giving up.
REPLACE_RETRIES = 10 if sys.platform == "win32" else 0
REPLACE_WAIT_S = 0.1


# ---- writing -----------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write `path` through a temporary file in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _replace(tmp: str, path: Path) -> None:
    for attempt in range(REPLACE_RETRIES + 1):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if attempt == REPLACE_RETRIES:
                raise
            time.sleep(REPLACE_WAIT_S)


def _bytes_writer(data: bytes) -> Callable[[Any], None]:
    """A `write` for `atomic_write` that writes `data` (binds it, e.g. inside a loop)."""
    return lambda f: f.write(data)


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _lock_path(root: Path, create: bool) -> Path | None:
    """The shelf's lock file, created empty when `create`; None when it is absent and not
    created. Never a symbolic link: a hostile shelf could point it at a file elsewhere."""
    path = root / LOCK_NAME
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; refusing to use it.")
    if create:
        # O_NOFOLLOW where the OS has it (not on Windows, where the check above stands alone).
        flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        os.close(os.open(path, flags, 0o644))
    return path if path.is_file() else None


@contextlib.contextmanager
def _held(path: Path, write: bool) -> Iterator[None]:
    # filelock's ReadWriteLock works through SQLite's file locks, the same on every OS
    # (fcntl is POSIX-only, and msvcrt has no shared mode); the file stays empty.
    lock = ReadWriteLock(path, is_singleton=False)
    try:
        try:
            (lock.acquire_write if write else lock.acquire_read)()
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"{path} is not a lock file ({err}); delete it and try again."
            ) from None
        try:
            yield
        finally:
            lock.release()
    finally:
        lock.close()


@contextlib.contextmanager
def index_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on the shelf's index, across processes and platforms."""
    path = _lock_path(root, create=True)
    assert path is not None
    with _held(path, write=True):
        yield


@contextlib.contextmanager
def shared_index_lock(root: Path) -> Iterator[None]:
    """Shared lock for readers of a local shelf, so that a task is never read while a writer
    replaces it. A shelf without a lock file (a Hub snapshot, a copied folder) is read as is."""
    path = _lock_path(root, create=False)
    if path is None or not os.access(path, os.R_OK | os.W_OK):
        # SQLite opens its lock read-write: a shelf this account may only read (another
        # user's, a read-only mount) is read without the lock, as a Hub snapshot is.
        yield
        return
    with _held(path, write=False):
        yield


def save_pretrained(
    handle: HalrpModel,
    save_directory: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    dtype: str = "float32",
) -> list[str]:
    """Write `tasks` (default: every finished task) into `save_directory`; return their names.

    Other tasks' folders are never touched; the index keeps every task it listed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}.")
    names = _tasks_to_save(handle, tasks)
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"`save_directory` {str(root)!r} exists and is not a folder.")
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise PermissionError(f"`save_directory` {str(root)!r} is not writable.")
    fingerprint = backbone_fingerprint(handle.model, handle.head_name)
    with index_lock(root):
        index = read_index(root) if (root / INDEX_NAME).exists() else new_index(handle)
        if index["backbone"]["fingerprint"] != fingerprint:
            raise ValueError(
                f"`save_directory` {str(root)!r} holds tasks of another backbone "
                f"(fingerprint "
                f"{index['backbone']['fingerprint'][:12]}...); save into a new "
                "folder."
            )
        for name in names:
            twin = case_twin(name, index["tasks"])
            if twin is not None:
                raise ValueError(
                    f"task {name!r} differs from task {twin!r} of `save_directory` "
                    f"{str(root)!r} only in case; on macOS and Windows both would share one "
                    "folder. Save into another folder, or rename the task."
                )
        if (
            any(handle._tasks[t].trains_base for t in handle.tasks)
            and not (root / BASE_NAME).exists()
        ):
            base = {
                k: v.detach().to("cpu").contiguous()
                for k, v in backbone_state(handle.model, handle.head_name).items()
            }
            atomic_write(root / BASE_NAME, lambda f: f.write(safetensors_bytes(base)))
            index["base_weights"] = BASE_NAME

        for name in names:
            config = handle.task_config(name)
            config.backbone_fingerprint = fingerprint
            folder = root / name
            _check_inside(root, folder)
            folder.mkdir(exist_ok=True)
            tensors = task_state_dict(handle, name, DTYPES[dtype])
            meta = {"format": "pt", "halrp_format_version": str(FORMAT_VERSION), "task": name}
            blob = safetensors_bytes(tensors, metadata=meta)
            config_bytes = _json_bytes(config.to_dict())
            files = {WEIGHTS_NAME: blob, CONFIG_NAME: config_bytes}
            signature = handle.task_signature(name)
            if signature is not None:
                files[SIGNATURE_NAME] = safetensors_bytes(
                    {k: v.contiguous() for k, v in signature.to_tensors().items()},
                    metadata={"format": "pt", "features": signature.features, "task": name},
                )
            elif (folder / SIGNATURE_NAME).exists():
                (folder / SIGNATURE_NAME).unlink()  # a stale one from an older save
            evidence = handle.task_evidence(name)
            if evidence is not None:
                files[EVIDENCE_NAME] = safetensors_bytes(
                    {k: v.contiguous() for k, v in evidence.to_tensors().items()},
                    metadata={"format": "pt", "task": name},
                )
            elif (folder / EVIDENCE_NAME).exists():
                (folder / EVIDENCE_NAME).unlink()
            for file_name, data in files.items():
                atomic_write(folder / file_name, _bytes_writer(data))
            if name not in index["tasks"]:
                index["tasks"].append(name)
            index["task_info"][name] = {
                **_summary(handle, name),
                "files": {file_name: file_record(data) for file_name, data in files.items()},
            }
        atomic_write(root / INDEX_NAME, lambda f: f.write(_json_bytes(index)))
    return names


def file_record(data: bytes) -> dict[str, Any]:
    """What the index keeps of a file so that `halrp-adapt verify` can check it."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _tasks_to_save(handle: HalrpModel, tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return [t for t in handle.tasks if handle._tasks[t].finished]
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(tasks)
    for name in names:
        info = handle._info(name, argument="tasks")
        if not info.finished:
            raise ValueError(
                f"`tasks`: task {name!r} is still in training: call end_task() "
                "before saving it; finished tasks: "
                f"{[t for t in handle.tasks if handle._tasks[t].finished]}."
            )
    return names


def new_index(handle: HalrpModel) -> dict[str, Any]:

    return {
        "format_version": FORMAT_VERSION,
        "library": "halrp_adapt",
        "library_version": __version__,
        "backbone": {
            "class": handle.base_class,
            "params": handle.backbone_params,
            "fingerprint": backbone_fingerprint(handle.model, handle.head_name),
        },
        "options": handle.config.options(),
        "base_weights": None,
        "tasks": [],
        "task_info": {},
    }


def _summary(handle: HalrpModel, name: str) -> dict[str, Any]:
    stats = handle.task_stats(name)
    ranks = list(stats.ranks.values())
    return {
        "num_classes": handle._tasks[name].config.num_classes,
        "growth": stats.growth,
        "mean_rank": sum(ranks) / len(ranks) if ranks else 0.0,
        "metrics": dict(handle._tasks[name].config.metrics),
    }


# ---- reading -----------------------------------------------------------------------------------
def _check_inside(root: Path, path: Path) -> None:
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise ValueError(f"{path} points outside {root} (a symbolic link?); refusing to use it.")


def _read_json(path: Path, what: str, limit: int = 16 << 20) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}.")
    if path.stat().st_size > limit:
        raise ValueError(f"{path}: {what} is larger than {limit} bytes; refusing to read it.")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}.")
    return data


def read_index(root: Path, trusted: Path | None = None) -> dict[str, Any]:
    """The shelf's index, checked field by field. Files must resolve inside `trusted`
    (default `root`; a Hub snapshot's files are links into its repo's cache folder)."""
    path = root / INDEX_NAME
    _check_inside(trusted or root, path)
    index = _read_json(path, "the shelf index")
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: `format_version` {index.get('format_version')!r} is not "
            f"supported (this halrp_adapt reads version {FORMAT_VERSION})."
        )
    tasks = index.get("tasks")
    if not isinstance(tasks, list) or len(set(map(str, tasks))) != len(tasks):
        raise ValueError(f"{path}: `tasks` must be a list of distinct task names.")
    for name in tasks:
        try:
            check_task_name(name)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    backbone = index.get("backbone")
    if not (
        isinstance(backbone, dict)
        and isinstance(backbone.get("fingerprint"), str)
        and isinstance(backbone.get("params"), int)
        and isinstance(backbone.get("class"), str)
    ):
        raise ValueError(
            f"{path}: `backbone` must hold `class` (str), `params` (int) and `fingerprint` (str)."
        )
    if not isinstance(index.get("options"), dict):
        raise ValueError(f"{path}: `options` must be a JSON object of HalrpConfig options.")
    if index.get("base_weights") not in (None, BASE_NAME):
        raise ValueError(f"{path}: `base_weights` must be null or {BASE_NAME!r}.")
    if not isinstance(index.get("task_info", {}), dict):
        raise ValueError(f"{path}: `task_info` must be a JSON object.")
    index.setdefault("task_info", {})
    return index


def read_task_config(root: Path, task: str, trusted: Path | None = None) -> HalrpConfig:
    """A task's adapter_config.json as a HalrpConfig; unknown fields and wrong types refused."""
    path = root / task / CONFIG_NAME
    _check_inside(trusted or root, path)
    data = _read_json(path, f"the config of task {task!r}")
    if data.get("peft_type") != "HALRP":
        raise ValueError(f"{path}: `peft_type` must be 'HALRP', got {data.get('peft_type')!r}.")
    allowed = {f for f in HalrpConfig.__dataclass_fields__}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; allowed: {sorted(allowed)}.")
    _check_task_field_types(path, data)
    try:
        return HalrpConfig(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def _check_task_field_types(path: Path, data: dict[str, Any]) -> None:
    expected = {
        "rank_pattern": dict,
        "sparse_pattern": dict,
        "metrics": dict,
        "trains_base": bool,
        "inference_mode": bool,
    }
    for name, kind in expected.items():
        if name in data and not isinstance(data[name], kind):
            raise ValueError(
                f"{path}: `{name}` must be a {kind.__name__}, got {type(data[name]).__name__}."
            )
    for name in ("rank_pattern", "sparse_pattern"):
        for key, value in data.get(name, {}).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{path}: `{name}[{key!r}]` must be an int >= 0, got {value!r}.")
    classes = data.get("num_classes")
    if classes is not None and (
        isinstance(classes, bool) or not isinstance(classes, int) or classes < 1
    ):
        raise ValueError(f"{path}: `num_classes` must be null or an int >= 1, got {classes!r}.")


def read_signature(root: Path, task: str, trusted: Path | None = None) -> TaskSignature | None:
    """Task `task`'s saved signature, or None when it was saved without one."""
    path = root / task / SIGNATURE_NAME
    if not path.exists():
        return None
    trusted = trusted or root
    tensors = read_tensors(path, trusted)
    with safe_open(str(path), framework="pt") as f:
        features = (f.metadata() or {}).get("features", "")
    return TaskSignature.from_tensors(tensors, features, source=str(path))


def read_evidence(root: Path, task: str, trusted: Path | None = None) -> TaskEvidence | None:
    """Task `task`'s saved evidence, or None when it was saved without any (older versions)."""
    path = root / task / EVIDENCE_NAME
    if not path.exists():
        return None
    return TaskEvidence.from_tensors(read_tensors(path, trusted or root), source=str(path))


def read_tensors(path: Path, trusted: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never a pickle); a broken file is a ValueError.

    The tensors are copies, not views of a memory map of the file: a mapped file cannot be
    replaced on Windows, and a shelf is saved back into while its loaded tasks are alive.
    """
    _check_inside(trusted, path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file not found: {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key).clone() for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}).") from None
