"""A task merged into a plain model that loads without halrp_adapt."""

from __future__ import annotations

import json

import timm
import torch
import transformers
from safetensors.torch import load_file

import halrp_adapt

from conftest import batches, learn_pruned_task, outputs_of, tiny_cnn


def test_timm_model_exported_with_save_for_hf(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=2, num_classes=10)
    cl = halrp_adapt.attach(vit, budget=0.05)
    learn_pruned_task(cl, "t", batches(n=1, size=4, shape=(3, 32, 32)), num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    expected = outputs_of(cl, x)["t"]
    cl.save_merged("t", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 3
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=3)
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_transformers_model_exported_with_save_pretrained(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
    torch.manual_seed(0)
    cl = halrp_adapt.attach(transformers.GPT2ForSequenceClassification(config), budget=0.2)
    data = [{"input_ids": torch.randint(1, 64, (4, 10)), "labels": torch.randint(0, 4, (4,))}]
    learn_pruned_task(cl, "t", data, num_classes=4)
    inputs = {"input_ids": torch.randint(1, 64, (2, 10))}
    expected = outputs_of(cl, inputs)["t"]
    cl.save_merged("t", tmp_path)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert plain.config.num_labels == 4
    assert not any(isinstance(m, halrp_adapt.HalrpLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_plain_model_exported_as_a_state_dict(tmp_path):
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_pruned_task(cl, "t", batches(), num_classes=3)
    x = torch.randn(2, 3, 8, 8)
    expected = outputs_of(cl, x)["t"]
    cl.save_merged("t", tmp_path)
    plain = tiny_cnn(num_classes=3)
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-5, rtol=1e-5)
