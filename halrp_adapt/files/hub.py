"""The Hugging Face Hub: push a shelf of tasks, fetch only the tasks asked for, a model card.

Downloads go through `huggingface_hub` (`snapshot_download` with `allow_patterns`), so
`HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and tokens work as everywhere else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .storage import BASE_NAME, INDEX_NAME, read_index, save_pretrained

if TYPE_CHECKING:
    from ..handle.model import HalrpModel

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def resolve_source(
    path_or_repo_id: str | os.PathLike,
    tasks: Sequence[str] | None,
    revision: str | None,
    **hub_kwargs: Any,
) -> tuple[Path, Path]:
    """(folder, trusted folder): a local folder holding the index and the requested tasks, and
    the folder every file must resolve into. A local folder trusts itself only; a Hub snapshot
    (only the requested tasks' files downloaded) trusts its repo's cache folder, where the
    snapshot's links point."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path, path
    repo_id = str(path_or_repo_id)
    if path.exists() or not REPO_ID.match(repo_id) or ".." in repo_id:
        raise FileNotFoundError(
            f"`path_or_repo_id` {repo_id!r} is neither a folder of saved "
            "tasks nor a Hugging Face Hub repo id ('org/name')."
        )
    from huggingface_hub import snapshot_download

    # The index first, then the tasks from the very same commit, so that a push in between
    # cannot mix two states of the repo.
    first = Path(
        snapshot_download(repo_id, revision=revision, allow_patterns=[INDEX_NAME], **hub_kwargs)
    )
    if not (first / INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"{repo_id} (revision {revision or 'main'}) has no "
            f"{INDEX_NAME}: it is not a shelf of HALRP tasks."
        )
    repo_cache = first.parent.parent
    index = read_index(first, trusted=repo_cache)
    names = list(index["tasks"]) if tasks is None else list(tasks)
    patterns = [INDEX_NAME] + [f"{t}/*" for t in names if t in index["tasks"]]
    if index.get("base_weights"):
        patterns.append(BASE_NAME)
    snapshot = Path(
        snapshot_download(repo_id, revision=first.name, allow_patterns=patterns, **hub_kwargs)
    )
    return snapshot, repo_cache


def push_to_hub(
    handle: HalrpModel,
    repo_id: str,
    tasks: Sequence[str] | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
) -> Any:
    """Upload `tasks` (default: every finished one) to `repo_id` in one commit, keeping the
    tasks already there, with a regenerated model card. Returns the commit info."""
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise ValueError(f"`repo_id` must look like 'org/name', got {repo_id!r}.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            remote = hf_hub_download(
                repo_id, INDEX_NAME, revision=revision, token=token, cache_dir=root / ".cache"
            )
            shutil.copyfile(remote, root / INDEX_NAME)
        except (EntryNotFoundError, RevisionNotFoundError):
            pass
        names = save_pretrained(handle, root, tasks=tasks, dtype=dtype)
        index = read_index(root)
        (root / "README.md").write_text(model_card(handle, index), encoding="utf-8")
        uploads = [INDEX_NAME, "README.md"] + [
            f"{n}/{f.name}" for n in names for f in sorted((root / n).iterdir())
        ]
        if index.get("base_weights") and (root / BASE_NAME).exists():
            uploads.append(BASE_NAME)
        operations = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(root / p)) for p in uploads
        ]
        message = commit_message or f"Add HALRP tasks {', '.join(names)}"
        return api.create_commit(
            repo_id, operations=operations, commit_message=message, revision=revision
        )


def base_model_id(handle: HalrpModel) -> str | None:
    """The backbone's Hub id when it is known: the `base_model_name_or_path` option, else a
    transformers model's `name_or_path`. (timm's `pretrained_cfg` names a Hub id even for
    random weights, so it is not trusted.)"""
    model = handle.model
    candidates = [
        handle.config.base_model_name_or_path,
        getattr(getattr(model, "config", None), "_name_or_path", None),
    ]
    for candidate in candidates:
        if isinstance(candidate, str) and REPO_ID.match(candidate):
            return candidate
    return None


def model_card(handle: HalrpModel, index: dict[str, Any]) -> str:
    """README.md for a shelf: Hub metadata, a table of tasks, and how to load them."""
    base = base_model_id(handle)
    meta = [
        "---",
        "library_name: halrp-adapt",
        "tags:",
        "- halrp",
        "- continual-learning",
        "- peft",
        "- task-adapters",
    ]
    if base:
        meta.append(f"base_model: {base}")
    meta.append("---")
    rows = ["| task | classes | mean rank | growth | accuracy |", "|---|---|---|---|---|"]
    for name in index["tasks"]:
        info = index["task_info"].get(name, {})
        accuracy = info.get("metrics", {}).get("accuracy")
        rows.append(
            f"| {name} | {info.get('num_classes') or '-'} | "
            f"{info.get('mean_rank', 0):.1f} | {info.get('growth', 0):.4f} | "
            f"{'-' if accuracy is None else f'{accuracy:.2f}'} |"
        )
    options = json.dumps(index["options"], indent=2)
    body = [
        f"# HALRP task adapters for `{index['backbone']['class']}`",
        "",
        f"{len(index['tasks'])} task(s) learned one after another with HALRP (Hessian Aware "
        "Low-Rank Perturbation, arXiv 2311.15161) on a frozen backbone of "
        f"{index['backbone']['params']:,} parameters. Each task stores per-layer scales, "
        "low-rank factors, biases, norms and its own head; growth is its stored parameters "
        "over the backbone's (head apart).",
        "",
        *rows,
        "",
        "## Load",
        "",
        "```python",
        "import halrp_adapt",
        "model = ...  # the same backbone, with the same pretrained weights",
        f'cl = halrp_adapt.load(model, "<this repo id>", tasks=["{index["tasks"][0]}"])'
        if index["tasks"]
        else 'cl = halrp_adapt.load(model, "<this repo id>")',
        "```",
        "",
        "## Options",
        "",
        "```json",
        options,
        "```",
        "",
    ]
    return "\n".join(meta + [""] + body)
