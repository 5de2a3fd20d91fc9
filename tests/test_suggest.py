"""`suggest_lora_config`: HALRP's allocation as a plain PEFT LoRA rank pattern."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import halrp_adapt

from conftest import batches, tiny_cnn


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


def _lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_pattern_fits_the_budget_and_peft_takes_it():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    config = halrp_adapt.suggest_lora_config(model, _data(), budget=0.05, trial_epochs=2,
                                             modules_to_save=["6"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert config.rank_pattern and set(config.alpha_pattern) == set(config.rank_pattern)
    peft_model = get_peft_model(model, config)
    ranks = {n.removeprefix("base_model.model."): m.r["default"]
             for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(ranks) <= {"0", "2", "4"}, ranks  # never the head
    assert sorted(ranks.values()) == sorted(config.rank_pattern.values())
    assert 0 < _lora_params(peft_model) <= 0.05 * total
    for name, module in peft_model.named_modules():  # LoRA's scale alpha / r is uniform
        if hasattr(module, "scaling"):
            assert module.scaling["default"] == pytest.approx(8 / config.r)


def test_more_budget_gives_more_rank():
    small = halrp_adapt.suggest_lora_config(_mlp(), _data(), budget=0.02, explained=0.999)
    large = halrp_adapt.suggest_lora_config(_mlp(), _data(), budget=0.2, explained=0.999)
    assert sum(large.rank_pattern.values()) > sum(small.rank_pattern.values())


def test_convs_and_their_lora_cost():
    model = tiny_cnn()
    total = sum(p.numel() for p in model.parameters())
    config = halrp_adapt.suggest_lora_config(model, batches(n=2), budget=0.2)
    peft_model = get_peft_model(model, config)
    assert _lora_params(peft_model) <= 0.2 * total
    assert any(isinstance(m, nn.Conv2d) for n, m in peft_model.named_modules()
               if n.endswith("lora_A.default"))


def test_bad_input():
    with pytest.raises(ValueError, match=r"`budget` must be in \(0\.0, 1\.0\]"):
        halrp_adapt.suggest_lora_config(_mlp(), _data(), budget=0)
    with pytest.raises(ValueError, match="leaves no room for even one rank"):
        halrp_adapt.suggest_lora_config(_mlp(), _data(), budget=1e-5)
    with pytest.raises(ValueError, match="`data`: the trial data yielded no batch"):
        halrp_adapt.suggest_lora_config(_mlp(), [], budget=0.05)
