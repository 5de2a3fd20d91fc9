"""Task shelves on disk: round trips, bytes, bad files, crashes."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import transformers

import halrp_adapt
from halrp_adapt.files.storage import (
    BASE_NAME,
    CONFIG_NAME,
    EVIDENCE_NAME,
    INDEX_NAME,
    SIGNATURE_NAME,
    WEIGHTS_NAME,
)

from conftest import (batches, learn_pruned_task, learn_task, load_fails, outputs_of,
                      tiny_cnn)


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10)


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def _gpt2_classifier():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
    return transformers.GPT2ForSequenceClassification(config)


def _image_data(i):
    return batches(n=1, size=4, shape=(3, 32, 32), classes=3, seed=i)


def _text_data(i):
    g = torch.Generator().manual_seed(i)
    return [{"input_ids": torch.randint(1, 64, (4, 10), generator=g),
             "labels": torch.randint(0, 3, (4,), generator=g)}]


CASES = {
    "vit": (_vit, _image_data, torch.randn(3, 3, 32, 32), 0.05),
    "resnet-batchnorm": (_resnet, _image_data, torch.randn(3, 3, 32, 32), 0.05),
    "gpt2-transformers": (_gpt2_classifier, _text_data,
                          {"input_ids": torch.randint(1, 64, (2, 10))}, 0.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_of_a_subset_of_tasks(case, tmp_path):
    make, data, inputs, budget = CASES[case]
    cl = halrp_adapt.attach(make(), budget=budget)
    for i, name in enumerate(["t1", "t2", "t3"]):
        learn_pruned_task(cl, name, data(i), num_classes=3)
    assert any(cl.adapter_layers()[n].halrp_A_values for n in cl.adapter_layers())  # compact
    before = outputs_of(cl, inputs)
    assert cl.save_pretrained(tmp_path) == ["t1", "t2", "t3"]
    loaded = halrp_adapt.load(make(), tmp_path, tasks=["t1", "t3"])
    assert loaded.tasks == ["t1", "t3"]
    after = outputs_of(loaded, inputs)
    for name in ("t1", "t3"):
        assert torch.equal(after[name], before[name]), name
    if case == "resnet-batchnorm":
        norm = loaded.task_norms()["bn1"].halrp_norm["t3"]
        assert torch.equal(norm.running_var, cl.task_norms()["bn1"].halrp_norm["t3"].running_var)


def test_layout_index_and_peft_naming(tmp_path):
    cl = halrp_adapt.attach(_vit(), budget=0.05)
    learn_pruned_task(cl, "t1", _image_data(0), num_classes=3)
    learn_pruned_task(cl, "t2", _image_data(1), num_classes=3)
    cl.record_metrics("t1", accuracy=87.5)
    cl.save_pretrained(tmp_path)
    assert sorted(p.name for p in (tmp_path / "t1").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, SIGNATURE_NAME, EVIDENCE_NAME]
    )
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["tasks"] == ["t1", "t2"] and index["backbone"]["params"] == cl.backbone_params
    assert index["task_info"]["t2"]["metrics"] == {}  # each task keeps its own figures
    assert index["backbone"]["class"].endswith("VisionTransformer")
    assert index["task_info"]["t1"]["metrics"] == {"accuracy": 87.5}
    config = json.loads((tmp_path / "t1" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "HALRP" and config["num_classes"] == 3
    assert config["rank_pattern"] == {k: v for k, v in cl.report().tasks["t1"].ranks.items() if v}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t1" / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("base_model.model.") and ".t1" not in k for k in keys)
    assert "base_model.model.head.halrp_head.weight" in keys
    assert "base_model.model.blocks.0.norm1.halrp_norm.weight" in keys


def test_saving_one_task_leaves_the_others_untouched(tmp_path):
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    cl.save_pretrained(tmp_path)
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "a").iterdir()}
    learn_task(cl, "b", batches(seed=2), num_classes=3)
    assert cl.save_pretrained(tmp_path, tasks=["b"]) == ["b"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "a").iterdir()} == stamp
    assert json.loads((tmp_path / INDEX_NAME).read_text())["tasks"] == ["a", "b"]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's memory map")
def test_a_loaded_shelf_keeps_none_of_its_files_mapped_and_takes_a_save_back(tmp_path):
    """Windows refuses to replace a mapped file; saving back into the shelf a handle was loaded
    from rewrites each loaded task's files, so loading must copy, never keep a view."""
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    cl.save_pretrained(tmp_path)
    assert (tmp_path / "a" / SIGNATURE_NAME).exists()
    loaded = halrp_adapt.load(tiny_cnn(), tmp_path)
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = maps.read()
    assert str(tmp_path) not in mapped
    learn_task(loaded, "b", batches(seed=2), num_classes=3)
    assert loaded.save_pretrained(tmp_path) == ["a", "b"]


def test_a_shelf_saved_before_the_portable_name_rules_still_loads(tmp_path, monkeypatch):
    """`nul` and a case-only twin are refused for new tasks, never for saved ones."""
    from halrp_adapt.adapters import routing
    from halrp_adapt.handle import model as handle_model

    monkeypatch.setattr(handle_model, "check_new_task_name",
                        lambda name, existing: routing.check_task_name(name))
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    for seed, name in enumerate(["nul", "a", "A"]):
        learn_task(cl, name, batches(seed=seed), num_classes=3)
    cl.save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="device name on Windows"):
        halrp_adapt.attach(tiny_cnn(), budget=0.5).add_task("nul")
    assert halrp_adapt.load(tiny_cnn(), tmp_path).tasks == ["nul", "a", "A"]


@pytest.mark.parametrize("budget", [0.05, 0.01])
def test_bytes_per_task_follow_the_budget(budget, tmp_path):
    model = _resnet()
    backbone_bytes = 4 * sum(p.numel() for n, p in model.named_parameters()
                             if not n.startswith("fc."))
    cl = halrp_adapt.attach(model, budget=budget, explained=1.0)
    learn_pruned_task(cl, "t", _image_data(0), num_classes=3)
    cl.save_pretrained(tmp_path)
    size = (tmp_path / "t" / WEIGHTS_NAME).stat().st_size
    assert size <= budget * backbone_bytes + 64 * 1024, (size, budget * backbone_bytes)
    cl.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert (tmp_path / "bf16" / "t" / WEIGHTS_NAME).stat().st_size < 0.8 * size  # masks stay


def test_train_base_shelf_carries_its_backbone(tmp_path):
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, train_base=True)
    learn_task(cl, "base", batches(), num_classes=3)
    learn_task(cl, "next", batches(seed=3), num_classes=3)
    x = torch.randn(4, 3, 8, 8)
    before = outputs_of(cl, x)
    cl.save_pretrained(tmp_path)
    assert (tmp_path / BASE_NAME).exists()
    loaded = halrp_adapt.load(tiny_cnn(seed=7), tmp_path)  # another untrained CNN
    after = outputs_of(loaded, x)
    assert all(torch.equal(after[t], before[t]) for t in before)


# ---- bad input and bad files -----------------------------------------------------------------
def test_missing_task(shelf):
    load_fails(shelf, r"`tasks`: \['c'\] are not in .* it holds \['a', 'b'\]", tasks=["c"])


def test_truncated_safetensors(shelf):
    path = shelf / "b" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    load_fails(shelf, "not a readable safetensors file")


def test_corrupted_safetensors_header(shelf):
    path = shelf / "a" / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    load_fails(shelf, "not a readable safetensors file")


def _rewrite_tensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_tensor_of_wrong_shape(shelf):
    key = "base_model.model.11.halrp_head.weight"
    _rewrite_tensors(shelf / "b" / WEIGHTS_NAME, lambda t: t.update({key: torch.zeros(4, 32)}))
    load_fails(shelf, r"tensor base_model.model.11.halrp_head.weight has shape \(4, 32\)")


def test_tensor_with_nan(shelf):
    def poison(t):
        key = next(k for k in t if k.endswith("halrp_r"))
        t[key][0] = float("nan")
    _rewrite_tensors(shelf / "a" / WEIGHTS_NAME, poison)
    load_fails(shelf, "holds NaN or infinite values")


def test_extra_tensor(shelf):
    _rewrite_tensors(shelf / "a" / WEIGHTS_NAME,
                     lambda t: t.update({"base_model.model.0.evil": torch.zeros(1)}))
    load_fails(shelf, r"unexpected \['base_model.model.0.evil'\]")


def test_config_of_unknown_format_version(shelf):
    path = shelf / "a" / CONFIG_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    load_fails(shelf, "`format_version` 99 is not supported")


def test_index_of_unknown_format_version(shelf):
    path = shelf / INDEX_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 2
    path.write_text(json.dumps(data))
    load_fails(shelf, "`format_version` 2 is not supported")


@pytest.mark.parametrize("name", ["a/b", "..", "x\x00y"])
def test_task_names_with_path_parts_in_the_index(shelf, name):
    path = shelf / INDEX_NAME
    data = json.loads(path.read_text())
    data["tasks"].append(name)
    path.write_text(json.dumps(data))
    load_fails(shelf, "task name must be 1-128 characters")


@pytest.mark.parametrize("name", ["a/b", "..", "x\x00y"])
def test_task_names_with_path_parts_when_loading(shelf, name):
    load_fails(shelf, "are not in", tasks=[name])


def test_backbone_of_another_architecture(shelf):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 64, 5))
    load_fails(shelf, "is not the backbone these tasks were saved on", model=other)


def test_backbone_with_other_weights(shelf):
    load_fails(shelf, "is not the backbone these tasks were saved on", model=tiny_cnn(seed=1))


def test_not_a_shelf(tmp_path):
    load_fails(tmp_path, "the shelf index not found", exc=FileNotFoundError)
    load_fails("no such folder here", "neither a folder of saved tasks nor a Hugging Face",
                exc=FileNotFoundError)


def test_save_errors(tmp_path):
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    with pytest.raises(ValueError, match=r"`dtype` must be one of \['bfloat16', 'float16'"):
        cl.save_pretrained(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        cl.save_pretrained(tmp_path, tasks=["zz"])
    cl.add_task("open", num_classes=3)
    with pytest.raises(ValueError, match="task 'open' is still in training"):
        cl.save_pretrained(tmp_path, tasks=["open"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        cl.save_pretrained(tmp_path / "file")
    assert not list(tmp_path.glob("*/" + WEIGHTS_NAME))


def test_another_backbone_cannot_save_into_a_shelf(shelf):
    cl = halrp_adapt.attach(tiny_cnn(seed=5), budget=0.5)
    learn_task(cl, "c", batches(), num_classes=3)
    with pytest.raises(ValueError, match="holds tasks of another backbone"):
        cl.save_pretrained(shelf)
    assert not (shelf / "c").exists()


@pytest.mark.parametrize("busy_for", [2, 99])
def test_a_file_held_open_for_a_moment_is_replaced_after_a_wait(busy_for, tmp_path, monkeypatch):
    """Windows: a replace fails while another process holds the file open; retried, then
    given up with the error, the temporary file removed."""
    from halrp_adapt.files import storage

    monkeypatch.setattr(storage, "REPLACE_RETRIES", 3)
    monkeypatch.setattr(storage, "REPLACE_WAIT_S", 0.0)
    real_replace, calls = os.replace, []

    def busy(src, dst):
        calls.append(dst)
        if len(calls) <= busy_for:
            raise PermissionError(13, "The process cannot access the file (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", busy)
    target = tmp_path / "f.bin"
    if busy_for < 3:
        storage.atomic_write(target, lambda f: f.write(b"new"))
        assert target.read_bytes() == b"new" and len(calls) == busy_for + 1
    else:
        with pytest.raises(PermissionError, match="simulated"):
            storage.atomic_write(target, lambda f: f.write(b"new"))
        assert len(calls) == 4 and not target.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_crash_during_save_keeps_earlier_tasks(shelf, monkeypatch):
    cl = halrp_adapt.load(tiny_cnn(), shelf)
    learn_task(cl, "c", batches(seed=4), num_classes=3)
    index_before = (shelf / INDEX_NAME).read_bytes()
    real_replace = os.replace
    calls = []

    def crash_on_config(src, dst):
        calls.append(dst)
        if str(dst).endswith(CONFIG_NAME):
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(OSError, match="simulated"):
        cl.save_pretrained(shelf, tasks=["c"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert (shelf / INDEX_NAME).read_bytes() == index_before
    assert not [p for p in shelf.rglob("*.tmp")], "temporary files left behind"
    loaded = halrp_adapt.load(tiny_cnn(), shelf)
    assert loaded.tasks == ["a", "b"]


def test_symlink_pointing_outside_the_shelf(shelf, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (shelf / "b" / WEIGHTS_NAME).rename(outside / WEIGHTS_NAME)
    (shelf / "b" / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)
    load_fails(shelf, "points outside .* refusing to use it")
