"""HALRP through PEFT's and transformers' own APIs: one adapter = one task."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from peft import PeftModel, get_peft_model

import halrp_adapt
from halrp_adapt import HalrpConfig, HalrpTuner

from conftest import batches, learn_pruned_task, outputs_of, train_steps


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10)


@pytest.fixture(scope="module")
def vit_shelf(tmp_path_factory):
    root = tmp_path_factory.mktemp("shelf")
    cl = halrp_adapt.attach(_vit(), budget=0.05)
    for i, name in enumerate(["t1", "t2", "t3"]):
        learn_pruned_task(cl, name, batches(n=1, size=4, shape=(3, 32, 32), seed=i),
                          num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    outputs = outputs_of(cl, x)
    cl.save_pretrained(root)
    return root, x, outputs


def test_peft_model_from_pretrained_reproduces_a_task(vit_shelf):
    root, x, outputs = vit_shelf
    model = PeftModel.from_pretrained(_vit(), str(root), subfolder="t2", adapter_name="t2")
    assert isinstance(model.base_model, HalrpTuner)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), outputs["t2"])


def test_load_set_delete_and_merge_adapters(vit_shelf):
    root, x, outputs = vit_shelf
    model = PeftModel.from_pretrained(_vit(), str(root / "t1"), adapter_name="t1")
    model.load_adapter(str(root / "t3"), adapter_name="t3")
    model.eval()
    model.set_adapter("t3")
    with torch.no_grad():
        assert torch.equal(model(x), outputs["t3"])
        model.set_adapter("t1")
        assert torch.equal(model(x), outputs["t1"])
    with pytest.raises(ValueError, match="HALRP adapters are not additive"):
        model.base_model.set_adapter(["t1", "t3"])
    with model.disable_adapter(), torch.no_grad():
        base = model(x)
    assert base.shape == (2, 10)  # the backbone's own head
    model.delete_adapter("t1")
    assert list(model.peft_config) == ["t3"] and model.base_model.halrp.tasks == ["t3"]
    merged = model.merge_and_unload()
    assert not any(isinstance(m, halrp_adapt.HalrpLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), outputs["t3"], atol=1e-5, rtol=1e-5)


def test_get_peft_model_trains_a_task_with_the_same_layers(tmp_path):
    model = get_peft_model(_vit(), HalrpConfig(budget=0.05, num_classes=3))
    handle = model.base_model.halrp
    assert handle.open_task == "default"
    data = batches(n=2, size=4, shape=(3, 32, 32))
    handle.estimate_ranks(data, steps=1)
    train_steps(handle, data, steps=1)
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
        {id(p) for p in handle.trainable_parameters()}
    handle.end_task()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.save_pretrained(str(tmp_path))  # PEFT's own writer
    reloaded = PeftModel.from_pretrained(_vit(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), before)


def test_transformers_load_adapter(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)

    def make():
        torch.manual_seed(0)
        return transformers.GPT2ForSequenceClassification(config)

    def data(i):
        g = torch.Generator().manual_seed(i)
        return [{"input_ids": torch.randint(1, 64, (4, 10), generator=g),
                 "labels": torch.randint(0, 3, (4,), generator=g)}]

    cl = halrp_adapt.attach(make(), budget=0.2)
    learn_pruned_task(cl, "sst", data(0), num_classes=3)
    inputs = {"input_ids": torch.randint(1, 64, (2, 10))}
    expected = outputs_of(cl, inputs)["sst"]
    cl.save_pretrained(tmp_path)
    model = make().eval()
    model.load_adapter(str(tmp_path / "sst"), adapter_name="sst")
    model.set_adapter("sst")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
