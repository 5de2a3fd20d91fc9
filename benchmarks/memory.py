"""Study 11: peak memory of a task's whole life, HALRP (each trial) against PEFT LoRA and a full
fine-tune, and what that means for a 7B model.

Each measurement runs in a fresh process (`--child`), which builds the backbone, then lives one
task and reports its peak resident memory (`ru_maxrss`) and its current RSS after building the
model (the part every method shares):
- `lora`: PEFT LoRA, rank 8 on every layer HALRP adapts (grouped convs aside, which LoRA
  cannot take at rank 8), its own head trained as
  `modules_to_save` where the model has a head of its own; 3 training steps;
- `full`: every parameter trained with Adam; 3 steps;
- `halrp` (the default low-rank trial) and `halrp-full` (trial="full", the paper's): attach,
  add_task, estimate_ranks (3 trial steps), 3 training steps with the regularisation,
  end_task with the task's batches (norm statistics, signature).

Backbones (random weights: memory does not depend on their values): a timm ViT-S/16 at 224 px,
EfficientNet-Lite0 at 224 px, and a 135M-parameter Llama-shaped causal LM (SmolLM-135M's
shape: 30 layers, hidden 576, tied embeddings) on 8 sequences of 64 tokens; all float32.
The 7B table is arithmetic from these measured parts (see `extrapolate`). Writes
benchmarks/results/memory.json (memory_quick.json with --quick).

    python benchmarks/memory.py           # about 15 minutes on 2 CPU cores
    python benchmarks/memory.py --quick   # tiny models, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lora", "full", "halrp", "halrp-full")
STEPS = 3
TARGET = 1.3  # a task's peak over LoRA's training peak


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1024 / 1024


# ---- backbones -------------------------------------------------------------------------------
def make_backbone(kind: str, quick: bool):
    """(model, batches, loss_fn, head name or None)."""
    import timm
    import transformers

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "vit":
        size, batch = (32, 4) if quick else (224, 8)
        model = timm.create_model("vit_tiny_patch16_224" if quick else "vit_small_patch16_224",
                                  pretrained=False, img_size=size, num_classes=10,
                                  **({"patch_size": 8, "depth": 2} if quick else {}))
        data = [(torch.randn(batch, 3, size, size, generator=g),
                 torch.randint(0, 10, (batch,), generator=g)) for _ in range(STEPS)]
        return model, data, None, "head"
    if kind == "cnn":
        size, batch = (32, 4) if quick else (224, 16)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
        data = [(torch.randn(batch, 3, size, size, generator=g),
                 torch.randint(0, 10, (batch,), generator=g)) for _ in range(STEPS)]
        return model, data, None, "classifier"
    if kind == "lm":
        shape = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
                 if quick else
                 dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
        config = transformers.LlamaConfig(tie_word_embeddings=True, max_position_embeddings=128,
                                          **shape)
        model = transformers.LlamaForCausalLM(config)
        tokens, batch = (16, 2) if quick else (64, 8)
        data = []
        for _ in range(STEPS):
            ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g)
            data.append({"input_ids": ids, "labels": ids})
        return model, data, lm_loss, None
    raise ValueError(f"unknown backbone {kind!r}")


def lm_loss(model, batch):
    return model(**batch).loss


def classification_loss(model, batch):
    x, y = batch
    out = model(x)
    return torch.nn.functional.cross_entropy(getattr(out, "logits", out), y)


# ---- one task's life, per method -------------------------------------------------------------
def train(model, params, data, loss_fn, extra=None) -> None:
    optimizer = torch.optim.Adam(params, lr=1e-4)
    model.train()
    for batch in data:
        loss = loss_fn(model, batch) + (extra() if extra is not None else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def live(kind: str, method: str, quick: bool) -> dict:
    import halrp_adapt

    model, data, loss_fn, head = make_backbone(kind, quick)
    loss_fn = loss_fn or classification_loss
    shared_mb = current_rss_mb()  # the backbone built: what every method holds anyway
    start = time.perf_counter()
    if method == "full":
        train(model, list(model.parameters()), data, loss_fn)
        trained = sum(p.numel() for p in model.parameters())
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        # the layers HALRP would adapt, found on the model itself (a second model would count)
        probe = halrp_adapt.attach(model, budget=1.0)
        # (PEFT's LoRA cannot take a grouped conv at rank 8: those keep HALRP's scales only)
        targets = [n for n, layer in probe.adapter_layers().items() if layer.supports_low_rank]
        model = probe.unload()
        lora = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=8, target_modules=targets,
            modules_to_save=[head] if head else None))
        params = [p for p in lora.parameters() if p.requires_grad]
        train(lora, params, data, loss_fn)
        trained = sum(p.numel() for p in params)
    else:
        trial = "full" if method == "halrp-full" else "low-rank"
        budget = 0.2 if quick else (0.02 if kind == "lm" else 0.05)
        cl = halrp_adapt.attach(model, budget=budget, trial=trial)
        cl.add_task("t", num_classes=10 if head else None)
        cl.estimate_ranks(data, loss_fn=loss_fn, steps=STEPS)
        params = cl.trainable_parameters()
        train(cl, params, data, loss_fn, cl.regularization_loss)
        trained = sum(p.numel() for p in params)
        cl.end_task(calibration_data=data)
    return {"backbone": kind, "method": method, "peak_rss_mb": peak_rss_mb(),
            "shared_rss_mb": shared_mb, "trained_params": trained,
            "seconds": time.perf_counter() - start}


def run_child(kind: str, method: str, quick: bool, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, method, "--threads", str(threads)]
    if quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind}/{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- 7B arithmetic ---------------------------------------------------------------------------
LLAMA_7B = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32)


def linear_shapes(layers: int, hidden: int, intermediate: int, kv: int | None = None):
    kv = kv or hidden
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                 (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return per_layer * layers


def extrapolate(lm_rows: dict, lm_shape: dict, tokens: int) -> dict:
    """Peak bytes of one task on a 7B Llama, bf16 weights, from the parts measured on the 135M
    LM: weights, what each method trains (parameters, gradients and Adam's two moments in
    float32 for task tensors, bf16 gradients and fp32 moments for a full fine-tune), the
    full trial's merged copy, and activations per token and unit of width x depth measured as
    LoRA's peak minus the shared RSS minus LoRA's own tensors."""
    gib = 1024**3
    n7 = 6.74e9
    weights = 2 * n7  # bf16
    big = linear_shapes(LLAMA_7B["layers"], LLAMA_7B["hidden"], LLAMA_7B["intermediate"])
    lora_params = sum(8 * (o + i) for o, i in big)
    scales = sum(o + i for o, i in big)
    trial_rank = 32
    low_rank_trial = sum(min(trial_rank, o, i) * (o + i) for o, i in big) + scales
    norms = LLAMA_7B["layers"] * 2 * LLAMA_7B["hidden"] + LLAMA_7B["hidden"]
    lora = lm_rows["lora"]
    small = linear_shapes(lm_shape["num_hidden_layers"], lm_shape["hidden_size"],
                          lm_shape["intermediate_size"],
                          lm_shape["hidden_size"] * lm_shape["num_key_value_heads"]
                          // lm_shape["num_attention_heads"])
    small_lora_bytes = 4 * 4 * sum(8 * (o + i) for o, i in small)  # fp32 param, grad, 2 moments
    activation_mb = lora["peak_rss_mb"] - lora["shared_rss_mb"] - small_lora_bytes / 1024**2
    unit = activation_mb * 1024**2 / (tokens * lm_shape["num_hidden_layers"]
                                     * lm_shape["hidden_size"] * 4)  # per fp32 value-slot
    activations = unit * tokens * LLAMA_7B["layers"] * LLAMA_7B["hidden"] * 2  # bf16
    task_state = 4 * 4  # fp32: value, gradient, Adam's two moments
    rows = {
        "lora": weights + lora_params * task_state + activations,
        "full": weights + n7 * (2 + 2 + 8) + activations,  # bf16 grads, fp32 moments
        "halrp": weights + (low_rank_trial + norms) * task_state + activations,
        "halrp-full": weights + 2 * n7 + n7 * (2 + 8) + activations,  # copy, grads, moments
    }
    return {"assumptions": {
        "params": n7, "weights": "bf16", "tokens_per_batch": tokens,
        "activation_bytes_per_token_per_layer_per_hidden_unit_fp32": unit,
        "lora_rank": 8, "trial_rank": trial_rank,
        "task_tensors": "fp32 with gradient and Adam moments"},
        "gib": {k: v / gib for k, v in rows.items()},
        "over_lora": {k: v / rows["lora"] for k, v in rows.items()},
        "parts_gib": {"weights": weights / gib, "activations": activations / gib,
                      "lora_tensors": lora_params * task_state / gib,
                      "halrp_low_rank_trial_tensors": (low_rank_trial + norms) * task_state / gib}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("BACKBONE", "METHOD"), default=None)
    parser.add_argument("--backbones", default="vit,cnn,lm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(live(*args.child, args.quick)))
        return {}
    rows = []
    for kind in args.backbones.split(","):
        for method in METHODS:
            row = run_child(kind, method, args.quick, args.threads)
            rows.append(row)
            print(f"{kind:<4} {method:<10} peak {row['peak_rss_mb']:8.0f} MB  (shared "
                  f"{row['shared_rss_mb']:.0f} MB, {row['seconds']:.0f} s)", flush=True)
    by = {(r["backbone"], r["method"]): r for r in rows}
    ratios = {kind: {m: by[kind, m]["peak_rss_mb"] / by[kind, "lora"]["peak_rss_mb"]
                     for m in METHODS}
              for kind in args.backbones.split(",")}
    out: dict = {"command": "python benchmarks/memory.py" + (" --quick" if args.quick else ""),
                 "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                 "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
                 "rows": rows, "over_lora": ratios}
    if "lm" in ratios:
        lm_shape = (dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         num_key_value_heads=2, num_attention_heads=4) if args.quick else
                    dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                         num_key_value_heads=3, num_attention_heads=9))
        out["llama_7b"] = extrapolate({m: by["lm", m] for m in METHODS}, lm_shape,
                                      tokens=32 if args.quick else 512)
    out["targets"] = {f"halrp_peak_at_most_{TARGET}x_lora_on_every_backbone":
                      all(r["halrp"] <= TARGET for r in ratios.values())}
    for kind, r in ratios.items():
        print(f"{kind:<4} over LoRA: " + ", ".join(f"{m} {v:.2f}x" for m, v in r.items()))
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in
                                 out["targets"].items()))
    RESULTS.mkdir(exist_ok=True)
    name = "memory_quick" if args.quick else "memory"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
