"""The bad-input table: every public entry point refuses bad arguments with an exception of a
documented type whose message names the argument and what is allowed, and nothing changes:
not the model, not the handle, not a byte of a saved shelf.

docs/errors.md lists the same cases; `test_docs_list_every_case` keeps the two in step.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import halrp_adapt
from halrp_adapt import HalrpConfig
from halrp_adapt.method.task_signature import PrototypeScorer, SignatureAccumulator
from halrp_adapt.training.recipes import add_training_args, check_training_args, recipe_parser
from halrp_adapt.data.task_splits import TaskData
from halrp_adapt.training.trainer import ContinualTrainer, TrainConfig

from conftest import batches, learn_task, tiny_cnn

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@dataclass
class World:
    """What a case may touch: `idle` (task a finished, none open), `busy` (task a finished,
    task b open with estimated ranks), `fresh` (the same backbone, nothing attached), `other`
    (another backbone) and `shelf` (task a saved)."""

    idle: halrp_adapt.HalrpModel
    busy: halrp_adapt.HalrpModel
    fresh: nn.Module
    other: nn.Module
    shelf: Path
    tmp: Path
    peft: Any  # a PeftModel: adapter "default" (all layers) in training


PEFT_X = torch.randn(2, 3, 8, 8)


@dataclass(frozen=True)
class Case:
    id: str
    action: Callable[[World], Any]
    error: type[BaseException]
    message: str  # a regex that names the argument and what is allowed

    def __str__(self) -> str:
        return self.id


def _recipe_args(argv: list[str]) -> None:
    parser = recipe_parser("a recipe")
    add_training_args(parser, epochs=1, batch_size=8, lr=1e-3, budget=0.05, output_dir="out")
    check_training_args(parser, parser.parse_args(argv))


DATA = batches(n=2)
CASES = [
    # attach
    Case("attach-budget-range", lambda w: halrp_adapt.attach(w.fresh, budget=0),
         ValueError, r"`budget` must be in \(0\.0, 1\.0\]"),
    Case("attach-budget-type", lambda w: halrp_adapt.attach(w.fresh, budget="5%"),
         TypeError, r"`budget` must be a number"),
    Case("attach-unknown-option", lambda w: halrp_adapt.attach(w.fresh, rank=4),
         TypeError, r"unknown option\(s\) \['rank'\]; allowed options: .*'budget'"),
    Case("attach-svd", lambda w: halrp_adapt.attach(w.fresh, svd="qr"),
         ValueError, r"`svd` must be one of \('auto', 'full', 'randomized'\)"),
    Case("attach-explained", lambda w: halrp_adapt.attach(w.fresh, explained=1.2),
         ValueError, r"`explained` must be in \(0\.0, 1\.0\]"),
    Case("attach-upper-rank", lambda w: halrp_adapt.attach(w.fresh, upper_rank=0),
         ValueError, r"`upper_rank` must be >= 1"),
    Case("attach-target-modules", lambda w: halrp_adapt.attach(w.fresh, target_modules=["qkv"]),
         ValueError, r"`target_modules` entries \['qkv'\] match no module .*e\.g\. \['0'"),
    Case("attach-scale-modules", lambda w: halrp_adapt.attach(w.fresh, scale_modules=["qkv"]),
         ValueError, r"`scale_modules` entries \['qkv'\] match no adapted layer"),
    Case("attach-task-signature", lambda w: halrp_adapt.attach(w.fresh, task_signature="pixels"),
         ValueError, r"`task_signature` must be one of \('backbone', 'task', None\)"),
    Case("attach-twice", lambda w: halrp_adapt.attach(w.idle.model),
         ValueError, r"`model` already has HALRP adapters attached"),
    Case("attach-not-a-module", lambda w: halrp_adapt.attach("resnet18"),
         TypeError, r"`model` must be a torch\.nn\.Module"),
    # add_task
    Case("add-task-name", lambda w: w.idle.add_task("a/b"),
         ValueError, r"task name must be 1-128 characters of letters, digits, '_' or '-'"),
    Case("add-task-num-classes", lambda w: w.idle.add_task("c", num_classes=0),
         ValueError, r"`num_classes` must be an int >= 1 or None"),
    Case("add-task-existing", lambda w: w.idle.add_task("a"),
         ValueError, r"task 'a' already exists; existing tasks: \['a'\]"),
    Case("add-task-device-name", lambda w: w.idle.add_task("nul"),
         ValueError, r"task name 'nul' is a device name on Windows \(AUX, COM1, .*\)"),
    Case("add-task-case-twin", lambda w: w.idle.add_task("A"),
         ValueError, r"task name 'A' differs from existing task 'a' only in case"),
    Case("add-task-while-open", lambda w: w.busy.add_task("c"),
         RuntimeError, r"task 'b' is still in training: call end_task\(\)"),
    # estimate_ranks
    Case("estimate-no-task", lambda w: w.idle.estimate_ranks(DATA),
         RuntimeError, r"estimate_ranks\(\) needs a task in training: call add_task"),
    Case("estimate-empty-data", lambda w: w.busy.estimate_ranks([]),
         ValueError, r"`data`: the trial data yielded no batch"),
    Case("estimate-epochs", lambda w: w.busy.estimate_ranks(DATA, epochs=0),
         ValueError, r"`epochs` must be None or an int >= 1, got 0"),
    Case("estimate-steps", lambda w: w.busy.estimate_ranks(DATA, steps=2.5),
         ValueError, r"`steps` must be None or an int >= 1, got 2\.5"),
    Case("estimate-lr", lambda w: w.busy.estimate_ranks(DATA, lr=float("nan")),
         ValueError, r"`lr` must be None or a finite number > 0"),
    Case("estimate-batch-type", lambda w: w.busy.estimate_ranks([torch.randn(2, 3, 8, 8)]),
         TypeError, r"batches `\(inputs, labels\)` or dicts"),
    # end_task, set_task, merge
    Case("end-task-no-task", lambda w: w.idle.end_task(),
         RuntimeError, r"end_task\(\) needs a task in training"),
    Case("end-task-calibration-empty", lambda w: w.busy.end_task(calibration_data=[]),
         ValueError, r"`calibration_data` yielded no batch"),
    Case("end-task-calibration-batch", lambda w: w.busy.end_task(calibration_data=[3]),
         TypeError, r"a batch must be a tensor, a tuple `\(inputs, \.\.\.\)` or a dict"),
    Case("end-task-calibration-cap",
         lambda w: w.busy.end_task(calibration_data=DATA, max_calibration_batches=0),
         ValueError, r"`max_calibration_batches` must be None or an int >= 1, got 0"),
    Case("set-task-unknown", lambda w: w.idle.set_task("zzz"),
         ValueError, r"`name`: unknown task 'zzz'; known tasks: \['a'\]"),
    Case("set-task-type", lambda w: w.idle.set_task(3),
         ValueError, r"`name`: unknown task 3; known tasks: \['a'\]"),
    Case("merge-unknown", lambda w: w.idle.merge("zzz"),
         ValueError, r"`name`: unknown task 'zzz'; known tasks"),
    # through PEFT
    Case("peft-target-modules",
         lambda w: w.peft.add_adapter("x", HalrpConfig(budget=0.5, target_modules=["0"])),
         ValueError, r"`target_modules`=\['0'\] selects other layers than this model's adapters"),
    Case("peft-set-adapter-several",
         lambda w: w.peft.base_model.set_adapter(["default", "default"]),
         ValueError, r"HALRP adapters are not additive.*adapter_names=\[\.\.\.\]"),
    Case("peft-merge-in-place", lambda w: w.peft.merge_adapter(),
         NotImplementedError, r"cannot merge a task in place.*merge_and_unload\(\)"),
    Case("peft-adapter-names-length",
         lambda w: w.peft.eval()(PEFT_X, adapter_names=["default"]),
         ValueError, r"Length of `adapter_names` should be the same as the number of inputs"),
    Case("peft-adapter-names-unknown",
         lambda w: w.peft.eval()(PEFT_X, adapter_names=["default", "zzz"]),
         ValueError, r"Trying to infer with non-existing adapter\(s\): zzz"),
    # task retrieval
    Case("mixed-strategy",
         lambda w: w.idle.forward_tasks([0, 0], torch.randn(2, 3, 8, 8), strategy="fast"),
         ValueError, r"`strategy` must be one of \['auto', 'one-pass', 'grouped'\], got 'fast'"),
    Case("predict-no-signature", lambda w: _one_task_unsigned().predict_tasks(DATA[0][0]),
         ValueError, r"tasks \['b'\] have no task signature.*; tasks with one: \['a'\]"),
    Case("predict-feature-width", lambda w: _scorer_of_width(5).predict_tasks(torch.randn(2, 7)),
         ValueError, r"features of shape \(2, 7\) do not fit .* \(batch, 5\)"),
    Case("add-signature-open", lambda w: w.busy.add_signature("b", DATA),
         RuntimeError, r"task 'b' is still in training: end_task\(\) makes its signature"),
    Case("add-signature-existing", lambda w: w.idle.add_signature("a", DATA),
         ValueError, r"task 'a' already has a signature"),
    Case("trainer-scenario",
         lambda w: ContinualTrainer(w.idle, [], TrainConfig(), scenario="open-set"),
         ValueError, r"`scenario` must be one of \('task-incremental', 'class-incremental'\)"),
    Case("trainer-fsdp-one-process",
         lambda w: ContinualTrainer(w.idle, [TaskData("t", [0, 1], [], [])], TrainConfig(),
                                    fsdp=True),
         ValueError, r"`fsdp`=True shards the backbone over several processes"),
    # save_pretrained
    Case("save-dtype", lambda w: w.idle.save_pretrained(w.shelf, dtype="int8"),
         ValueError, r"`dtype` must be one of \['bfloat16', 'float16', 'float32'\]"),
    Case("save-unknown-task", lambda w: w.idle.save_pretrained(w.shelf, tasks=["zzz"]),
         ValueError, r"`tasks`: unknown task 'zzz'; known tasks: \['a'\]"),
    Case("save-open-task", lambda w: w.busy.save_pretrained(w.shelf, tasks=["b"]),
         ValueError, r"`tasks`: task 'b' is still in training.*finished tasks: \['a'\]"),
    Case("save-into-a-file", lambda w: w.idle.save_pretrained(w.shelf / "halrp_index.json"),
         ValueError, r"`save_directory` .* exists and is not a folder"),
    Case("save-other-backbone", lambda w: _other_handle(w).save_pretrained(w.shelf),
         ValueError, r"`save_directory` .* holds tasks of another backbone"),
    Case("save-case-twin", lambda w: _case_twin_handle(w).save_pretrained(w.shelf),
         ValueError, r"task 'A' differs from task 'a' of `save_directory` .* only in case"),
    # load
    Case("load-unknown-task", lambda w: halrp_adapt.load(w.fresh, w.shelf, tasks=["zzz"]),
         ValueError, r"`tasks`: \['zzz'\] are not in .* it holds \['a'\]"),
    Case("load-task-path", lambda w: halrp_adapt.load(w.fresh, w.shelf, tasks=["../a"]),
         ValueError, r"`tasks`: \['\.\./a'\] are not in"),
    Case("load-not-a-shelf", lambda w: halrp_adapt.load(w.fresh, w.tmp / "nothing/here"),
         FileNotFoundError, r"`path_or_repo_id` .* is neither a folder of saved tasks nor a "
                            r"Hugging Face Hub repo id"),
    Case("load-other-backbone", lambda w: halrp_adapt.load(w.other, w.shelf),
         ValueError, r"`model` is not the backbone these tasks were saved on"),
    # the PEFT config
    Case("config-budget", lambda w: HalrpConfig(budget=2.0),
         ValueError, r"`budget` must be in \(0\.0, 1\.0\]"),
    Case("config-target-modules", lambda w: HalrpConfig(target_modules=3),
         TypeError, r"`target_modules` must be None, a regex string or a list"),
    Case("config-svd", lambda w: HalrpConfig(svd="eig"),
         ValueError, r"`svd` must be one of \('auto', 'full', 'randomized'\)"),
    Case("config-fisher", lambda w: HalrpConfig(fisher="exact"),
         ValueError, r"`fisher` must be one of \('trial', 'pass'\), got 'exact'"),
    Case("config-format-version", lambda w: HalrpConfig(format_version=99),
         ValueError, r"`format_version` 99 .*supported"),
    # the recipes' arguments (argparse exits with status 2 and one line on stderr)
    Case("recipe-budget", lambda w: _recipe_args(["--budget", "1.5"]),
         SystemExit, r"--budget must be in \(0, 1\], got 1\.5"),
    Case("recipe-epochs", lambda w: _recipe_args(["--epochs", "0"]),
         SystemExit, r"--epochs must be >= 1, got 0"),
    Case("recipe-lr", lambda w: _recipe_args(["--lr", "0"]),
         SystemExit, r"--lr must be > 0, got 0\.0"),
    Case("recipe-scenario", lambda w: _recipe_args(["--scenario", "open-set"]),
         SystemExit, r"--scenario: invalid choice: 'open-set' \(choose from"),
    Case("recipe-precision", lambda w: _recipe_args(["--mixed-precision", "fp8"]),
         SystemExit, r"--mixed-precision: invalid choice: 'fp8' \(choose from"),
]


def _one_task_unsigned() -> halrp_adapt.HalrpModel:
    """Task a with a signature, task b ended without calibration data (so without one)."""
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", DATA, num_classes=3)
    cl.add_task("b", num_classes=3)
    cl.end_task()
    return cl.eval()


def _scorer_of_width(width: int) -> PrototypeScorer:
    accumulator = SignatureAccumulator()
    accumulator.update(torch.randn(8, width), torch.arange(8) % 2)
    return PrototypeScorer([accumulator.finish("backbone")])


def _other_handle(w: World) -> halrp_adapt.HalrpModel:
    cl = halrp_adapt.attach(tiny_cnn(seed=1), budget=0.5)
    learn_task(cl, "z", DATA, num_classes=3)
    return cl


def _case_twin_handle(w: World) -> halrp_adapt.HalrpModel:
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "A", DATA, num_classes=3)
    return cl


@pytest.fixture
def world(tmp_path) -> World:
    idle = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(idle, "a", DATA, num_classes=3)
    shelf = tmp_path / "shelf"
    idle.save_pretrained(shelf)
    busy = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(busy, "a", DATA, num_classes=3)
    busy.add_task("b", num_classes=4)
    busy.estimate_ranks(DATA, steps=1)
    from peft import get_peft_model

    peft = get_peft_model(tiny_cnn(seed=2), HalrpConfig(budget=0.5))
    return World(idle, busy, tiny_cnn(), tiny_cnn(seed=1), shelf, tmp_path, peft)


def _model_state(module: nn.Module) -> dict[str, Any]:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    kinds = [(n, type(m).__name__) for n, m in module.named_modules()]
    grads = [(n, p.requires_grad) for n, p in module.named_parameters()]
    return {"state": state, "kinds": kinds, "grads": grads}


def _snapshot(w: World) -> dict[str, Any]:
    files = {str(p.relative_to(w.tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(w.tmp.rglob("*")) if p.is_file() and p.name != ".halrp.lock"}
    handles = {name: {"tasks": list(h.tasks), "open": h.open_task, "active": h.active_task,
                      **_model_state(h)} for name, h in (("idle", w.idle), ("busy", w.busy))}
    peft = {"adapters": list(w.peft.peft_config), "active": w.peft.active_adapter,
            **_model_state(w.peft)}
    return {"files": files, "handles": handles, "fresh": _model_state(w.fresh),
            "other": _model_state(w.other), "peft": peft}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_refused_and_changes_nothing(case, world, capsys):
    before = _snapshot(world)
    with pytest.raises(case.error) as raised:
        case.action(world)
    text = str(raised.value)
    if raised.type is SystemExit:
        assert raised.value.code == 2
        text = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(case.message, text), f"{case.id}: {text!r} does not match {case.message!r}"
    after = _snapshot(world)
    assert after["files"] == before["files"], f"{case.id} changed the saved files"
    for part in ("handles", "fresh", "other", "peft"):
        assert _same(before[part], after[part]), f"{case.id} changed {part}"


def test_the_table_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 25
    prefixes = {case.id.split("-")[0] for case in CASES}
    assert {"attach", "add", "estimate", "end", "set", "save", "load", "config",
            "recipe"} <= prefixes


def test_docs_list_every_case():
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOCS.read_text(), re.MULTILINE))
    assert documented == {case.id for case in CASES}
