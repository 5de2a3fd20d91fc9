"""Through PEFT's API, a call does what it does in PEFT or raises an error naming what to call.

Each test here pins one behaviour that once gave a wrong answer without an error (issue 22),
or one refusal that PEFT's own tests skip for HALRP (tests/test_peft_suite.py), with its error.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

import halrp_adapt
from halrp_adapt import HalrpConfig

from conftest import batches, train_steps


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.lin1 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(self.norm(torch.relu(self.lin0(x))))))


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype)


def config(**options):
    return HalrpConfig(**{"budget": 0.9, **options})


def data(seed=0, n=2):
    return batches(n=n, size=8, shape=(6,), classes=3, seed=seed)


def out(model, x, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(x, **kwargs)


def learn(model, steps=2, seed=0):
    """PEFT's path for one task: estimate, train, end (all reachable on the PeftModel)."""
    model.estimate_ranks(data(seed), steps=1)
    handle = model.base_model.halrp
    train_steps(handle, data(seed), steps=steps)
    model.end_task()


# ---- 1. the config passed in is never changed; each adapter owns a copy ------------------------
def test_a_config_is_not_changed_by_a_task_and_can_be_used_again():
    cfg = config()
    pristine = dataclasses.asdict(copy.deepcopy(cfg))
    model = get_peft_model(net(), cfg)
    learn(model)
    assert dataclasses.asdict(cfg) == pristine
    assert model.peft_config["default"] is not cfg
    assert model.peft_config["default"].rank_pattern  # the task's own copy records its ranks

    model.add_adapter("second", cfg)  # the same object again: a new task to train
    model.set_adapter("second")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("second" in n for n, p in model.named_parameters() if p.requires_grad)
    again = get_peft_model(net(), cfg)  # and on another model
    assert sum(p.numel() for p in again.parameters() if p.requires_grad) > 0
    assert dataclasses.asdict(cfg) == pristine


def test_attach_copies_its_config():
    cfg = config()
    cl = halrp_adapt.attach(net(), config=cfg)
    cl.add_task("a")
    cl.end_task()
    assert cfg.rank_pattern == {} and not cfg.inference_mode and cl.config is not cfg


# ---- 2. active_adapter says what runs ----------------------------------------------------------
def test_add_and_load_adapter_keep_the_active_adapter_and_its_outputs(tmp_path):
    x = torch.randn(4, 6)
    model = get_peft_model(net(), config(init_weights=False))
    default = out(model, x)
    model.add_adapter("other", config(init_weights=False))
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert torch.equal(out(model, x), default)
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path / "other", adapter_name="loaded")
    assert model.active_adapter == "default" and torch.equal(out(model, x), default)
    model.set_adapter("other")
    assert model.active_adapter == "other" and model.base_model.active_adapter == "other"
    other = out(model, x)
    assert not torch.allclose(other, default)
    model.set_adapter("loaded")
    assert torch.equal(out(model, x), other)  # "loaded" is "other" read back


def test_set_adapter_trains_the_adapter_it_activates():
    model = get_peft_model(net(), config())
    model.add_adapter("other", config())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "other" in n)
    model.set_adapter("other")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    model.set_adapter("default")
    assert model.base_model.halrp.open_task == "default"
    learn(model)
    assert not any(p.requires_grad for p in model.parameters())  # a finished task never trains


def test_a_second_adapter_with_other_target_modules_is_refused_and_rolled_back():
    model = get_peft_model(net(), config(target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"`target_modules`=\['lin1'\] selects other layers"):
        model.add_adapter("other", config(target_modules=["lin1"]))
    assert list(model.peft_config) == ["default"]
    assert model.base_model.halrp.tasks == ["default"]
    model.add_adapter("same", config(target_modules="lin0"))  # the same layers, other words
    assert model.base_model.halrp.tasks == ["default", "same"]


# ---- 3. adapter_names= -------------------------------------------------------------------------
def test_adapter_names_runs_each_sample_through_its_adapter():
    x = torch.randn(6, 6)
    model = get_peft_model(net(), config(init_weights=False), adapter_name="a")
    model.add_adapter("b", config(init_weights=False))
    names = ["a", "b", "__base__", "b", "a", "__base__"]
    mixed = out(model, x, adapter_names=names)
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = out(model, x)
    with model.disable_adapter():
        expected["__base__"] = out(model, x)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row])
    assert not torch.allclose(expected["a"], expected["b"])


def test_adapter_names_errors_are_peft_s():
    model = get_peft_model(net(), config(), adapter_name="a")
    x = torch.randn(3, 6)
    model.eval()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(x, adapter_names=["a", "a"])
    with pytest.raises(ValueError, match="non-existing adapter.*: nope"):
        model(x, adapter_names=["a", "nope", "a"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in train"):
        model(x, adapter_names=["a", "a", "a"])


# ---- 4. half precision: adapters autocast to float32, as PEFT does -----------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbones_get_float32_adapters_that_train(dtype):
    model = get_peft_model(net(dtype), config())
    handle = model.base_model.halrp
    assert {p.dtype for n, p in model.named_parameters() if "halrp_" in n} == {torch.float32}
    x = torch.randn(4, 6).to(dtype)
    assert out(model, x).dtype == dtype
    r = handle.adapter_layers()["lin0"].halrp_r["default"]
    before = r.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(5):
        loss = model(x).float().logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(r.detach(), before)  # bf16 cannot hold 1 + 1e-4: fp32 can
    with torch.no_grad():
        torch.testing.assert_close(
            handle.merge("default").eval()(x).float(), out(model, x).float(), atol=0.1, rtol=0.05
        )


def test_no_autocast_keeps_the_backbone_s_dtype_and_runs():
    model = get_peft_model(net(torch.bfloat16), config(init_weights=False),
                           autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "halrp_" in n} == {torch.bfloat16}
    x = torch.randn(4, 6).to(torch.bfloat16)
    assert torch.isfinite(out(model, x)).all()
    cl = halrp_adapt.attach(net(torch.float16), budget=0.9, autocast_adapter_dtype=False)
    cl.add_task("a")
    assert {p.dtype for p in cl.trainable_parameters()} == {torch.float16}


# ---- 5. merging and unloading ------------------------------------------------------------------
def test_safe_merge_refuses_nan_weights_and_leaves_the_model_adapted():
    model = get_peft_model(net(), config())
    with torch.no_grad():
        model.base_model.halrp.adapter_layers()["lin1"].halrp_r["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter "
                                         "default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.base_model.model.lin1, halrp_adapt.HalrpLayer)


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unloaded_models_carry_no_peft_config(how):
    x = torch.randn(2, 6)
    model = get_peft_model(net(), config(init_weights=False))
    adapted = out(model, x)
    plain = getattr(model, how)()
    assert not hasattr(plain, "peft_config")
    assert not any(isinstance(m, halrp_adapt.HalrpLayer) for m in plain.modules())
    if how == "merge_and_unload":
        torch.testing.assert_close(out(plain, x), adapted)
    else:
        assert torch.equal(out(plain, x), out(net(), x))


def test_in_place_merges_and_additive_adapters_are_refused_with_what_to_call():
    model = get_peft_model(net(), config())
    model.add_adapter("other", config())
    with pytest.raises(NotImplementedError, match=r"merge_and_unload\(\)"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="never merges in place"):
        model.unmerge_adapter()
    with pytest.raises(ValueError, match=r"not additive.*adapter_names=\[\.\.\.\]"):
        model.base_model.set_adapter(["default", "other"])


# ---- 6. low_cpu_mem_usage, in/out features -----------------------------------------------------
def test_low_cpu_mem_usage_makes_adapters_on_meta_and_loads_them(tmp_path):
    x = torch.randn(3, 6)
    model = get_peft_model(net(), config(init_weights=False))
    expected = out(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(net(), tmp_path, low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert torch.equal(out(loaded, x), expected)
    injected = inject_adapter_in_model(config(), net(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in injected.parameters()}


def test_every_adapter_layer_exposes_in_and_out_features():
    model = get_peft_model(net(), config())
    routed = [m for m in model.modules() if isinstance(m, halrp_adapt.adapters.routing.TaskRouted)]
    assert {type(m).__name__ for m in routed} == {"HalrpLinear", "TaskNorm", "TaskHead"}
    sizes = {type(m).__name__: (m.in_features, m.out_features) for m in routed}
    assert sizes["TaskNorm"] == (12, 12) and sizes["TaskHead"] == (12, 3)


# ---- 7. HALRP's own steps from a PeftModel -----------------------------------------------------
def test_halrp_steps_are_reachable_on_the_peft_model_and_errors_name_them(tmp_path):
    model = get_peft_model(net(), config(num_classes=3))
    learn(model)
    assert model.report().tasks["default"].finished
    with pytest.raises(RuntimeError, match=r"end_task\(\) needs a task in training: call "
                                           r"add_task\(name\) first \(through PEFT: add_adapter"):
        model.end_task()
    model.add_adapter("next", config(num_classes=3))
    with pytest.raises(RuntimeError, match=r"set_adapter\('next'\) trains"):
        model.regularization_loss()
    model.set_adapter("next")
    learn(model, seed=1)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(net(), tmp_path)
    reloaded.load_adapter(tmp_path / "next", adapter_name="next")
    x = torch.randn(2, 6)
    for name in ("default", "next"):
        model.set_adapter(name)
        reloaded.set_adapter(name)
        assert torch.equal(out(reloaded, x), out(model, x))


def test_generate_with_adapter_names_on_a_gpt2():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    model = get_peft_model(lm, config(task_type="CAUSAL_LM", budget=0.5, init_weights=False),
                           adapter_name="a").eval()
    ids = torch.randint(0, 32, (2, 4))
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["a", "__base__"], max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
        alone = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False,
                               pad_token_id=0)
        with model.disable_adapter():
            base = model.generate(input_ids=ids[1:], max_new_tokens=3, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(mixed[0], alone[0]) and torch.equal(mixed[1], base[0])


def test_each_adapter_keeps_to_its_own_budget():
    model = get_peft_model(net(), config(budget=0.9))
    learn(model)
    with pytest.raises(ValueError, match=r"`budget`=1e-05 allows .* smallest budget that works"):
        model.add_adapter("tiny", config(budget=1e-5))
    assert "tiny" not in model.peft_config
    model.add_adapter("small", config(budget=0.4))
    model.set_adapter("small")
    learn(model, seed=1)
    report = model.report()
    assert report.tasks["small"].growth <= 0.4 < report.tasks["default"].growth
