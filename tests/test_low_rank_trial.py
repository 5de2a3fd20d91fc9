"""The low-rank trial's parts: dense weight gradients made layer by layer, the SVD of a product,
the Fisher it measures, and estimation on bfloat16 backbones and with gradient checkpointing."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import halrp_adapt
from halrp_adapt.adapters.layers import HalrpConv1D, HalrpConv2d, HalrpLinear
from halrp_adapt.method.decompose import decompose_product
from halrp_adapt.method.fisher import DenseGradientFisher, TrialFisher

from conftest import batches, train_steps


def _conv(**kwargs):
    return nn.Conv2d(3, 5, 3, **kwargs)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Linear(6, 4), (2, 7, 6)),
        (lambda: Conv1D(4, 6), (2, 7, 6)),
        (lambda: _conv(padding=1), (2, 3, 8, 8)),
        (lambda: _conv(stride=2, dilation=2, padding=2, padding_mode="reflect"), (2, 3, 9, 9)),
        (lambda: _conv(padding="same"), (2, 3, 6, 6)),
        (lambda: timm.layers.Conv2dSame(3, 5, 3, stride=2), (2, 3, 7, 7)),
        (lambda: nn.Linear(64, 48), (3, 64)),  # more weight entries than rows squared
    ],
    ids=["linear", "conv1d", "conv2d", "conv2d-reflect-strided", "conv2d-same", "timm-same",
         "linear-gram"],
)
def test_the_dense_weight_gradient_norm_matches_autograd(make, shape):
    torch.manual_seed(0)
    base = make()
    x = torch.randn(*shape)
    out = base(x)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, base.weight, grad_out)
    layer = {nn.Linear: HalrpLinear, Conv1D: HalrpConv1D}.get(type(base), HalrpConv2d)(base)
    got = layer.weight_gradient_norm2(x, grad_out)
    torch.testing.assert_close(got, expected.pow(2).sum(), rtol=1e-4, atol=1e-6)


def test_decompose_product_is_the_svd_of_the_product():
    torch.manual_seed(0)
    B, A = torch.randn(9, 3), torch.randn(3, 7)
    spectrum = decompose_product(B, A)
    full = torch.linalg.svdvals((B @ A).double())
    torch.testing.assert_close(spectrum.S, full[:3])
    torch.testing.assert_close((spectrum.U * spectrum.S) @ spectrum.Vh, (B @ A).double())
    assert spectrum.energy == pytest.approx(float((B @ A).double().pow(2).sum()))


def test_the_dense_gradient_fisher_equals_the_trial_fisher_of_the_same_weights():
    """The same statistic two ways: gradients of a dense weight (TrialFisher), and the layer's
    effective weight through scales and factors (DenseGradientFisher)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    cl = halrp_adapt.attach(net, budget=1.0, init_weights=False, task_heads=False)
    cl.add_task("t")
    plain = cl.merge("t")
    data = batches(n=3, size=4, shape=(5,), classes=3, seed=1)
    dense = TrialFisher({"0": plain[0].weight}, total_steps=3)
    probed = DenseGradientFisher({"0": cl.adapter_layers()["0"]}, total_steps=3)
    with probed.attached():
        for step, (x, y) in enumerate(data):
            for model, fisher in ((plain, dense), (cl.model, probed)):
                model.zero_grad()
                if fisher is probed:
                    probed.before_step(step)
                nn.functional.cross_entropy(model(x), y).backward()
                fisher.after_backward(step, batch_size=4)
    assert probed.result()["0"] == pytest.approx(dense.result()["0"], rel=1e-4)


def test_estimation_on_a_bfloat16_backbone_keeps_float32_task_tensors_that_move():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))
    cl = halrp_adapt.attach(net.to(torch.bfloat16), budget=0.9)
    cl.add_task("t", num_classes=3)
    data = [(x.to(torch.bfloat16), y) for x, y in batches(n=4, size=8, shape=(8,), seed=2)]
    cl.estimate_ranks(data, steps=4, lr=1e-4)
    assert {p.dtype for p in cl.trainable_parameters()} == {torch.float32}
    r = cl.adapter_layers()["0"].halrp_r["t"]
    assert not torch.equal(r, torch.ones_like(r))  # moved by 1e-4 steps: bf16 could not
    train_steps(cl, data, steps=2, lr=1e-4)
    cl.end_task()
    merged = cl.merge("t").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    cl.eval()
    with torch.no_grad(), cl.task("t"):
        torch.testing.assert_close(merged(data[0][0]).float(), cl(data[0][0]).float(),
                                   atol=0.05, rtol=0.05)


def _checkpointed_llama_estimate(checkpointing: str | None):
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config)
    if checkpointing is not None:
        reentrant = checkpointing == "reentrant"
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            lm.enable_input_require_grads()
    cl = halrp_adapt.attach(lm, budget=0.5, trial_rank=4)
    cl.add_task("t")
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 48, (2, 8), generator=g),
             "labels": torch.randint(0, 48, (2, 8), generator=g)} for _ in range(3)]

    def loss(model, batch):
        return model(**batch).loss

    torch.manual_seed(2)
    ranks = cl.estimate_ranks(data, loss_fn=loss, steps=3)
    return cl, data, loss, ranks


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_estimation_and_training_with_gradient_checkpointing(checkpointing):
    plain, _, _, plain_ranks = _checkpointed_llama_estimate(None)
    cl, data, loss, ranks = _checkpointed_llama_estimate(checkpointing)
    fisher, expected = cl._tasks["t"].estimate.fisher, plain._tasks["t"].estimate.fisher
    assert fisher.keys() == expected.keys() and all(v > 0 for v in fisher.values())
    for name in fisher:  # measured once per layer and step, as without checkpointing
        assert fisher[name] == pytest.approx(expected[name], rel=1e-3), name
    assert ranks == plain_ranks
    train_steps(cl, data, steps=2, loss_fn=loss)
    assert cl.end_task().growth <= 0.5


# ---- the lean backward of the scaled path (`adapters/layers/scaled.py`) ----------------------
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Linear(4, 3), (2, 5, 4)),
        (lambda: Conv1D(3, 4), (2, 5, 4)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 7, 7)),
        (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (2, 4, 6, 6)),
        (lambda: nn.Conv2d(4, 6, 1, groups=2), (2, 4, 5, 5)),
        (lambda: nn.Conv2d(4, 6, 1, stride=2), (2, 4, 7, 7)),
        (lambda: timm.layers.Conv2dSame(4, 6, 3, stride=2), (2, 4, 7, 7)),
        # weights larger than the activation: the scales go on the activation, not on W0
        (lambda: nn.Linear(16, 12), (1, 2, 16)),
        (lambda: nn.Conv2d(8, 8, 3, padding=1), (1, 8, 3, 3)),
    ],
    ids=["linear", "conv1d", "conv2d-strided", "depthwise-dilated", "grouped-1x1", "strided-1x1",
         "timm-same",
         "linear-wide", "conv2d-wide"],
)
@pytest.mark.parametrize(
    "parts", ["r s bias A", "r s", "bias A", "s", "r s bias A inplace", "r s bias A tiny-r"]
)
def test_the_lean_backward_is_autograd_s(make, shape, parts):
    from halrp_adapt.adapters.layers.scaled import AdaptedForward

    torch.manual_seed(0)
    base = make().double()
    layer = {nn.Linear: HalrpLinear, Conv1D: HalrpConv1D}.get(type(base), HalrpConv2d)(base)
    assert layer.lean_backward
    x = torch.randn(*shape, dtype=torch.float64)
    if isinstance(layer, HalrpConv2d) and layer.pad is not None:
        x = layer.pad(base, x)
    words = parts.split()
    r = torch.rand(layer.out_features, dtype=torch.float64) + 0.5 if "r" in words else None
    if "tiny-r" in words:  # too small to divide the output by: the product is recomputed
        r = r * 1e-3
    s = torch.rand(layer.in_features, dtype=torch.float64) + 0.5 if "s" in words else None
    b = torch.randn(layer.out_features, dtype=torch.float64) if "bias" in words else None
    A = B = None
    if "A" in words and layer.supports_low_rank:
        A = torch.randn(2, layer.in_features, dtype=torch.float64)
        B = torch.randn(layer.out_features, 2, dtype=torch.float64)
    tensors = [t.requires_grad_() if t is not None else None for t in (x, r, s, b, A, B)]

    def lean(*ts):
        out = AdaptedForward.apply(*ts, layer)
        if "inplace" in words:  # the next layer changes the output in place (an in-place ReLU)
            out.relu_()
        return out

    def plain(x, r, s, b, A, B):
        y = layer.scaled_forward(x, r, s, b)
        out = y if A is None else y + layer.low_rank_forward(x, A, B)
        return out.relu() if "inplace" in words else out

    # gradcheck differentiates one graph twice: the second recomputes op(s x) (rounding apart)
    assert torch.autograd.gradcheck(lean, tuple(tensors), nondet_tol=1e-12)
    probe = torch.randn_like(plain(*tensors))
    got = torch.autograd.grad((lean(*tensors) * probe).sum(), [t for t in tensors if t is not None])
    want = torch.autograd.grad((plain(*tensors) * probe).sum(),
                               [t for t in tensors if t is not None])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_the_lean_backward_keeps_fewer_activations_than_plain_autograd():
    """Saved-tensor bytes of a task's training forward on a small CNN: the lean step keeps
    no activation of its own beyond what the norms and activations keep anyway."""
    from halrp_adapt.adapters.layers import HalrpLayer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    cl = halrp_adapt.attach(net, budget=0.9, init_weights=False)
    cl.add_task("t", num_classes=4)
    cl.train()
    x = torch.randn(8, 3, 16, 16)

    def saved():
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cl(x).sum()
        return sum(storages.values())

    lean = saved()
    try:
        HalrpLayer.lean_backward = False
        for layer in cl.adapter_layers().values():
            layer.__dict__.pop("lean_backward", None)
        plain = saved()
    finally:
        HalrpLayer.lean_backward = True
    activations = 8 * 16 * 16 * 16 * 4  # one (8, 16, 16, 16) float32 tensor
    assert plain - lean >= 3 * activations  # s*x and conv(s*x) of the first conv, and more


def test_the_lean_backward_lets_go_of_the_output_and_a_retained_graph_still_differentiates():
    """A training loop's `loss` keeps the graph alive through the next forward: the node must
    not keep the layer's output after its backward; a second backward recomputes it."""
    from halrp_adapt.adapters.layers.scaled import AdaptedForward

    torch.manual_seed(0)
    layer = HalrpLinear(nn.Linear(4, 3).double())
    x = torch.randn(5, 4, dtype=torch.float64)
    r = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    s = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    y = AdaptedForward.apply(x, r, s, None, None, None, layer)
    assert y.grad_fn.out is not None
    first = torch.autograd.grad(y.square().sum(), [r, s], retain_graph=True)
    assert y.grad_fn.out is None
    second = torch.autograd.grad(y.square().sum(), [r, s])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("low_rank", [True, False])
def test_the_lean_backward_under_autocast_matches_plain_autograd(low_rank):
    """Under a bfloat16 autocast the gradients arrive in bfloat16 while the task's tensors are
    float32: the backward runs under the forward's autocast and returns each input's dtype."""
    from halrp_adapt.adapters.layers.scaled import AdaptedForward

    torch.manual_seed(0)
    layer = HalrpLinear(nn.Linear(16, 12))
    x = torch.randn(4, 16)
    r, s, b = torch.rand(12) + 0.5, torch.rand(16) + 0.5, torch.randn(12)
    A, B = (torch.randn(3, 16), torch.randn(12, 3)) if low_rank else (None, None)
    tensors = [t.requires_grad_() if t is not None else None for t in (x, r, s, b, A, B)]
    wanted = [t for t in tensors if t is not None]

    def plain(x, r, s, b, A, B):
        y = layer.scaled_forward(x, r, s, b)
        return y if A is None else y + layer.low_rank_forward(x, A, B)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean_out = AdaptedForward.apply(*tensors, layer)
        plain_out = plain(*tensors)
    assert lean_out.dtype == torch.bfloat16  # autocast's dtype, as a PEFT LoRA layer's output
    torch.testing.assert_close(lean_out.float(), plain_out.float(), rtol=0.02, atol=0.05)
    got = torch.autograd.grad(lean_out.float().square().sum(), wanted)
    want = torch.autograd.grad(plain_out.float().square().sum(), wanted)
    for g, w, t in zip(got, want, wanted, strict=True):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05 * float(w.abs().max()))


def test_layers_whose_padding_has_no_transposed_conv_keep_plain_autograd():
    assert not HalrpConv2d(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")).lean_backward
    assert not HalrpConv2d(nn.Conv2d(3, 4, 3, padding="same")).lean_backward


def test_a_task_that_trains_the_backbone_gets_its_weight_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    cl = halrp_adapt.attach(net, budget=0.9, train_base=True)
    cl.add_task("base", num_classes=2)
    cl.train()
    cl(torch.randn(2, 3, 8, 8)).sum().backward()
    conv = cl.adapter_layers()["0"]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
