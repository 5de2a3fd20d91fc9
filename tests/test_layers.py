"""Adapter layers: merged == adapted, the conv low-rank path, routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from halrp_adapt import HalrpConv1D, HalrpConv2d, HalrpLinear


def _randomise(layer, task: str, rank: int) -> None:
    layer.add_task(task)
    m, n = layer.out_features, layer.in_features
    layer.set_scales(task, torch.rand(m) + 0.5, torch.rand(n) + 0.5)
    if layer.supports_low_rank:
        layer.set_low_rank(task, torch.randn(rank, n) * 0.1, torch.randn(m, rank) * 0.1)
    if task in layer.halrp_bias:
        layer.set_bias(task, torch.randn(m))
    layer.set_active_task(task)


CASES = [
    ("linear", lambda: HalrpLinear(nn.Linear(12, 7)), (5, 12)),
    ("linear-3d-input", lambda: HalrpLinear(nn.Linear(12, 7, bias=False)), (2, 4, 12)),
    ("conv-s2-p1", lambda: HalrpConv2d(nn.Conv2d(4, 6, 3, stride=2, padding=1)), (2, 4, 9, 9)),
    ("conv-dilated", lambda: HalrpConv2d(nn.Conv2d(4, 6, 3, padding=2, dilation=2)),
     (2, 4, 8, 8)),
    ("conv-reflect", lambda: HalrpConv2d(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")),
     (2, 4, 8, 8)),
    ("conv-rect-same", lambda: HalrpConv2d(nn.Conv2d(4, 6, (3, 5), padding="same")),
     (2, 4, 7, 9)),
    ("conv-grouped", lambda: HalrpConv2d(nn.Conv2d(4, 8, 3, padding=1, groups=2)),
     (2, 4, 6, 6)),
    ("conv-depthwise", lambda: HalrpConv2d(nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)),
     (2, 6, 7, 7)),
    ("conv-depthwise-multiplier",
     lambda: HalrpConv2d(nn.Conv2d(3, 6, 3, padding=1, groups=3)), (2, 3, 6, 6)),
    ("conv-1x1", lambda: HalrpConv2d(nn.Conv2d(4, 6, 1)), (2, 4, 5, 5)),
    ("conv-1x1-s2", lambda: HalrpConv2d(nn.Conv2d(4, 6, 1, stride=2, bias=False)), (2, 4, 7, 7)),
    ("conv-1x1-p1", lambda: HalrpConv2d(nn.Conv2d(4, 6, 1, padding=1)), (2, 4, 5, 5)),
    ("conv1d-gpt2", lambda: HalrpConv1D(Conv1D(7, 12)), (3, 5, 12)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_merged_equals_adapted(name, make, shape):
    layer = make()
    _randomise(layer, "t", rank=3)
    x = torch.randn(*shape)
    merged = layer.merged_layer("t")
    assert type(merged) is type(layer.base_layer)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)
    # the merged weight really differs from the base: the test is not vacuous
    assert not torch.allclose(merged.weight, layer.base_layer.weight)
    # both exact forms of the forward agree, whichever one task_forward picks for this input
    if isinstance(layer, HalrpConv2d) and layer.handles_forward_of(layer.base_layer):
        return
    torch.testing.assert_close(layer.activation_forward(x, "t"), layer.folded_forward(x, "t"),
                               atol=1e-5, rtol=1e-5)


def test_conv_low_rank_path_equals_merged_kernel_form():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=False)
    layer = HalrpConv2d(conv)
    A, B = torch.randn(2, 5), torch.randn(7, 2)
    x = torch.randn(2, 5, 9, 9)
    kernel = (B @ A)[:, :, None, None].expand(7, 5, 3, 3)
    expected = F.conv2d(x, kernel, stride=2, padding=1)
    torch.testing.assert_close(layer.low_rank_forward(x, A, B), expected, atol=1e-5, rtol=1e-5)


def test_no_active_task_is_the_base_layer():
    base = nn.Linear(6, 3)
    layer = HalrpLinear(base)
    _randomise(layer, "t", rank=2)
    layer.set_active_task(None)
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))


def test_identity_task_equals_base():
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = HalrpConv2d(base)
    layer.add_task("t")
    layer.set_active_task("t")
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=1e-6)


def test_grouped_conv_refuses_low_rank():
    layer = HalrpConv2d(nn.Conv2d(4, 4, 3, groups=4))
    layer.add_task("t")
    with pytest.raises(ValueError, match="groups=4"):
        layer.set_low_rank("t", torch.zeros(1, 4), torch.zeros(4, 1))


def test_conv1d_canonical_is_out_by_in():
    layer = HalrpConv1D(Conv1D(7, 12))  # nf=7 outputs, nx=12 inputs, weight 12 x 7
    assert (layer.out_features, layer.in_features) == (7, 12)
    assert layer.canonical(layer.weight).shape == (7, 12, 1)
    assert torch.equal(layer.from_canonical(layer.canonical(layer.weight)), layer.weight)


def test_timm_same_padding_conv_merges_exactly():
    from timm.layers.conv2d_same import Conv2dSame

    layer = HalrpConv2d(Conv2dSame(4, 6, 3, stride=2))
    _randomise(layer, "t", rank=2)
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(layer.merged_layer("t")(x), layer(x), atol=1e-5, rtol=1e-5)


def test_conv_subclass_with_its_own_forward_is_not_wrapped():
    from timm.layers import StdConv2d

    from halrp_adapt.adapters.registry import adapter_class_for

    assert adapter_class_for(StdConv2d(3, 4, 3)) is None  # weight standardisation in forward
    assert adapter_class_for(nn.Conv2d(3, 4, 3)) is HalrpConv2d
