"""Push to and load from a Hub over real HTTP (a loopback Hub the tests start)."""

from __future__ import annotations

import timm
import torch

import halrp_adapt
from halrp_adapt.files.storage import INDEX_NAME

from conftest import batches, learn_pruned_task, outputs_of


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10)


def _learned(names):
    cl = halrp_adapt.attach(_vit(), budget=0.05)
    for i, name in enumerate(names):
        learn_pruned_task(cl, name, batches(n=1, size=4, shape=(3, 32, 32), seed=i),
                          num_classes=3)
        cl.record_metrics(name, accuracy=80.0 + i)
    return cl


def test_push_then_load_one_task_of_three(online):
    hub = online
    cl = _learned(["t1", "t2", "t3"])
    x = torch.randn(2, 3, 32, 32)
    expected = outputs_of(cl, x)
    info = cl.push_to_hub("org/three-tasks", commit_message="three tasks")
    assert info.oid == hub.commits("org/three-tasks")[-1]
    files = hub.files("org/three-tasks")
    assert {"README.md", INDEX_NAME, "t1/adapter_model.safetensors",
            "t3/adapter_config.json"} <= set(files)
    card = files["README.md"].decode()
    assert "library_name: halrp-adapt" in card
    assert "| t2 | 3 |" in card and "| 81.00 |" in card and "| 82.00 |" in card

    hub.requests.clear()
    loaded = halrp_adapt.load(_vit(), "org/three-tasks", tasks=["t2"])
    fetched = hub.downloads("org/three-tasks")
    assert sorted(fetched) == sorted([INDEX_NAME, "t2/adapter_config.json",
                                      "t2/adapter_model.safetensors",
                                      "t2/task_signature.safetensors",
                                      "t2/task_evidence.safetensors"]), fetched
    assert loaded.tasks == ["t2"]
    sent, back = cl.task_signature("t2"), loaded.task_signature("t2")
    assert sent is not None and back is not None and torch.equal(back.means, sent.means)
    assert torch.equal(outputs_of(loaded, x)["t2"], expected["t2"])


def test_revision_pins_a_commit_and_pushes_keep_earlier_tasks(online):
    hub = online
    cl = _learned(["a", "b"])
    first = cl.push_to_hub("org/pinned", tasks=["a"]).oid
    cl.push_to_hub("org/pinned", tasks=["b"])
    head_files = hub.files("org/pinned")
    assert {"a/adapter_model.safetensors", "b/adapter_model.safetensors"} <= set(head_files)
    assert halrp_adapt.load(_vit(), "org/pinned").tasks == ["a", "b"]
    assert halrp_adapt.load(_vit(), "org/pinned", revision=first).tasks == ["a"]


def test_missing_repo_and_missing_task(online):
    import pytest
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        halrp_adapt.load(_vit(), "org/does-not-exist")
    cl = _learned(["only"])
    cl.push_to_hub("org/one-task")
    with pytest.raises(ValueError, match=r"`tasks`: \['other'\] are not in org/one-task"):
        halrp_adapt.load(_vit(), "org/one-task", tasks=["other"])
