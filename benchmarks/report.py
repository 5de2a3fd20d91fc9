"""Write benchmarks/README.md from the committed results (benchmarks/results/*.json).

Every figure in that page comes from a results file, and every results file records the
command that produced it, its date and machine: rerun the command, then this script.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# Why a target is missed when it is: the mechanism behind the figure, as measured.
MISSED_BECAUSE = {
    "acc_at_least_reference_plus_1": lambda d: (
        f"ACC {d['ours']['acc']:.2f} against the reference's {d['anchor']['acc']:.2f} "
        f"({d['ours']['acc'] - d['anchor']['acc']:+.2f}): level within one repeat's spread of "
        f"final per-task accuracies ({min(d['ours']['final_accuracy']):.2f} to "
        f"{max(d['ours']['final_accuracy']):.2f}). A full point would need a change to the "
        "method; no variant in study 8's ablations gains more on average than the noise "
        "between identical runs"),
    "growth_at_most_half_reference": lambda d: (
        f"{d['ours']['growth_after_tasks'][-1]:.3f} after task "
        f"{len(d['ours']['growth_after_tasks']) + 1}, against half the reference's "
        f"{0.5 * d['anchor']['growth_after_tasks'][len(d['ours']['growth_after_tasks']) - 1]:.3f}; "
        "the recipe's budget of 0.06 per task (the reference's own total growth, spread over "
        "nine adapted tasks) sets it. Half would be a budget near 0.034 per task, whose cost "
        "in ACC was not measured"),
    "wall_time_at_most_0.3x": lambda d: (
        f"{d['ours']['wall_s'] / d['anchor']['wall_s']:.2f}x ({d['ours']['wall_s']:.0f} s). "
        "The same protocol took 1498 s (0.22x) on 2026-11-24 on another 2-core machine "
        "(kernel build v657, this one v595); the difference was not isolated: the machines "
        "differ, and each task now also recomputes its BatchNorm statistics in one pass"),
    "acc_at_least_reference": lambda d: (
        f"by {d['anchor']['acc'] - d['ours']['acc']:.2f} points in one repeat, less than the "
        f"spread of the final per-task accuracies ({min(d['ours']['final_accuracy']):.2f} to "
        f"{max(d['ours']['final_accuracy']):.2f}); one repeat cannot tell the two apart, and "
        f"ours spends {d['ours']['growth_after_tasks'][-1]:.3f} growth where the reference "
        f"spends {d['anchor']['growth_after_tasks'][len(d['ours']['growth_after_tasks']) - 1]:.3f}"),
    "halrp_within_1_point_of_full_ft": lambda d: (
        f"{d['summary']['full_ft']['acc'][0] - d['summary']['halrp']['acc'][0]:.1f} points "
        f"below a full copy per task, which trains "
        f"{d['summary']['full_ft']['params_per_task'] / d['summary']['halrp']['params_per_task']:.0f}x "
        "HALRP's parameters per task; on 32 px grayscale clothing images, far from ImageNet, two "
        "epochs of a 5% perturbation do not reach a full fine-tune"),
    "halrp_mopd_lowest": lambda d: _mopd_reason(d),
    "train_step_at_most_1.10x": lambda d: (
        "HALRP trains per task what LoRA leaves frozen: the scales r, s on every adapted layer "
        "(a pass over each layer's input and output, forward and backward, with reductions "
        "for their gradients), its biases and its norms' affine parameters; the breakdown "
        "above puts the scales' gradients at about 0.09-0.11x of LoRA's step, and the rest "
        "(about 0.08x with only factors and head trained, as LoRA) in applying the scales and "
        "routing per-task norms. Bias fusion, one output scale on depthwise convs, no window "
        "sum on 1x1 convs and the flat regularisation took the step from 1.155x / 1.289x to "
        "these figures. Folding the scales into the weight costs a whole weight gradient per "
        "layer: measured slower even on EfficientNet's depthwise convs (1.22x folding the 3x3 "
        "ones, 1.73x with the 5x5 ones, against 1.18x). `torch.compile` on this CPU keeps the "
        "gap (study 6's dry run); whether it fuses the scale passes on a GPU is study 6's "
        "open figure"),
    "estimation_at_most_0.20x_trial_vit_s_b": lambda d: (
        ", ".join(f"{e['model']} {e['estimation_over_trial_default']:.2f}x"
                  for e in d["estimation"])),
}


def _mopd_reason(d: dict) -> str:
    opd = d["summary"]["halrp"]["order_robustness"]["OPD"]
    worst = max(opd, key=opd.get)
    finals = []
    for run in d["runs"]:
        names = list(run["classes"])
        for i, n in enumerate(names):
            if "-".join(map(str, sorted(run["classes"][n]))) == worst:
                finals.append((i + 1, run["halrp"]["matrix"][-1][i]))
    ordinal = {1: "1st", 2: "2nd", 3: "3rd"}
    shown = ", ".join(f"{acc:.1f} learned {ordinal.get(pos, f'{pos}th')}" for pos, acc in finals)
    return (f"HALRP's spread comes from one task, classes {worst} ({shown}); every other "
            f"task varies by at most {max(v for k, v in opd.items() if k != worst):.1f} "
            "points. Tasks never change after they end (BWT 0), so the spread is run-to-run "
            "variance of that task's own trial and training (the random stream differs with "
            "its position), not forgetting")


def _targets(targets: dict, data: dict | None = None) -> list[str]:
    lines = []
    for name, ok in targets.items():
        line = f"- {name.replace('_', ' ')}: **{'met' if ok else 'missed'}**"
        if not ok and name in MISSED_BECAUSE and data is not None:
            line += ": " + MISSED_BECAUSE[name](data)
        lines.append(line)
    return lines


def _provenance(data: dict) -> str:
    return f"`{data['command']}` ({data['date']}, {data['machine']})"


def pmnist(data: dict) -> list[str]:
    a, o = data["anchor"], data["ours"]
    n = len(o["growth_after_tasks"])
    rows = [("ACC (%)", a["acc"], o["acc"]), ("BWT (points)", a["bwt"], o["bwt"]),
            (f"growth after task {n} (reference's count)", a["growth_after_tasks"][n - 1],
             o["growth_after_tasks"][-1]),
            ("wall time (s)", a["wall_s"], o["wall_s"]),
            ("peak RSS (GB)", a["peak_rss_gb"], o["peak_rss_gb"])]
    lines = ["## 1. Paper protocol: Permuted Fashion-MNIST, LeNet, 10 tasks", "",
             f"Command: {_provenance(data)}. Anchor: {a['protocol']} "
             "(benchmarks/anchors.json, measured on this machine).", "",
             "| figure | reference code | halrp_adapt | ratio |", "|---|---|---|---|"]
    for label, ref, mine in rows:
        ratio = f"{mine / ref:.3f}" if ref else "-"
        lines.append(f"| {label} | {ref:g} | {mine:.3f} | {ratio} |")
    lines += ["", "Growth after each task (reference's count: dense scales, nonzero factors, "
              "biases, norm affine parameters and heads over the base with its head):", "",
              "| after task | " + " | ".join(str(i + 1) for i in range(n)) + " |",
              "|---" * (n + 1) + "|",
              "| reference | " + " | ".join(f"{g:.3f}" for g in a["growth_after_tasks"][:n]) + " |",
              "| halrp_adapt | " + " | ".join(f"{g:.3f}" for g in o["growth_after_tasks"]) + " |",
              "", "Final accuracy per task: " + " ".join(f"{x:.2f}" for x in o["final_accuracy"]),
              "", "![pmnist](results/pmnist_lenet.png)", "", *_targets(data["targets"], data), ""]
    return lines


def methods(data: dict, title: str) -> list[str]:
    summary = data["summary"]
    orders = len(next(iter(summary.values()))["acc"])
    settings = data["settings"]
    if "calibrate" not in settings:  # the shared protocol (benchmarks/protocol), equal compute
        norms = (f"Every method makes {settings['epochs']} passes over each task's data "
                 "(HALRP's trial pass counts). BatchNorm running statistics are recomputed with "
                 "the final weights when each task ends for every method that keeps its own "
                 "(HALRP: `end_task(calibration_data=...)`, the others: `update_bn`); a method "
                 "whose budget cannot hold its own runs the backbone's frozen (HALRP here: its "
                 "copies would take half of the 0.05 budget)")
    elif settings["calibrate"]:
        norms = ("BatchNorm running statistics recomputed with the final weights when each task "
                 "ends, for every method (HALRP: `end_task(calibration_data=...)`, the others: "
                 "`update_bn`)")
    else:
        norms = "BatchNorm running statistics as gathered during training (`--no-calibration`)"
    lines = [title, "", f"Command: {_provenance(data)}. {norms}.", "",
             "| method | ACC (first order) | BWT | parameters per task | wall s |"
             + (" MOPD | AOPD |" if orders > 1 else ""),
             "|---|---|---|---|---|" + ("---|---|" if orders > 1 else "")]
    for name, s in summary.items():
        line = (f"| {name} | {s['acc'][0]:.2f} | {s['bwt'][0]:+.2f} | "
                f"{s['params_per_task']:,.0f} | {s['wall_s'][0]:.0f} |")
        if orders > 1:
            o = s["order_robustness"]
            line += f" {o['MOPD']:.2f} | {o['AOPD']:.2f} |"
        lines.append(line)
    png = "pretrained_methods.png" if orders == 1 else "order_robustness.png"
    lines += ["", f"![methods](results/{png})", "", *_targets(data["targets"], data), ""]
    return lines


def speed(data: dict) -> list[str]:
    lines = ["## 4. Speed and memory", "", f"Command: {_provenance(data)}; "
             f"{data['threads']} threads, medians of alternating blocks after warm-up.", "",
             "| backbone | train step HALRP / LoRA | merged / plain inference | "
             "unmerged HALRP / LoRA inference | HALRP step |", "|---|---|---|---|---|"]
    for s in data["steps"]:
        lines.append(f"| {s['model']} ({s['image_size']} px, batch {s['batch']}, rank "
                     f"{s['rank']}) | {s['train_ratio']:.3f} | {s['merged_vs_plain']:.3f} | "
                     f"{s['unmerged_halrp_vs_lora']:.3f} | "
                     f"{s['train_step_s']['halrp'] * 1e3:.0f} ms |")
    if data.get("step_breakdown"):
        labels = list(data["step_breakdown"][0]["over_lora"])
        lines += ["", "Where the step's extra time goes: HALRP's step with fewer of the task's "
                  "parameters trained (the scales are still applied), over LoRA's step, measured "
                  "side by side:", "", "| backbone | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for b in data["step_breakdown"]:
            lines.append(f"| {b['model']} | " + " | ".join(
                f"{b['over_lora'][k]:.3f}" for k in labels) + " |")
    lines += ["", "Rank estimation over one trial epoch (40 batches of 16 at 64 px), three ways "
              "on the same data and weights: the reference's (the full trial on a merged copy, "
              "a Fisher pass on a 20% validation split, full SVDs), the full trial with the "
              "Fisher from its last 20% of steps and truncated SVDs (`trial=\"full\"`), and "
              "the default low-rank trial (on the model itself: scales, biases, norms, head and "
              "rank-32 factors; the Fisher from each layer's dense gradient over the last 20% of "
              "steps; exact SVDs of the factors' product). Cost = Fisher + scales and SVDs + "
              "allocation, plus any time the trial took beyond the reference's, over the "
              "reference's trial; whole = everything, trial included, over the same:", "",
              "| backbone | parameters | reference trial s | reference cost | full: trial s / "
              "cost / whole | low-rank: trial s / cost / whole | explained ranks as the "
              "reference's (full, low-rank) | explained ranks, total (reference, full, "
              "low-rank) |",
              "|---|---|---|---|---|---|---|---|"]
    for e in data["estimation"]:
        ref, full, new = e["seconds_reference"], e["seconds_full"], e["seconds_default"]
        totals = e["rank_total"]
        lines.append(
            f"| {e['model']} | {e['backbone_params']:,} | {ref['trial']:.2f} | "
            f"**{e['estimation_over_trial_reference']:.3f}x** | "
            f"{full['trial']:.2f} / **{e['estimation_over_trial_full']:.3f}x** / "
            f"{e['whole_estimation_over_trial_full']:.2f}x | "
            f"{new['trial']:.2f} / **{e['estimation_over_trial_default']:.3f}x** / "
            f"{e['whole_estimation_over_trial_default']:.2f}x | "
            f"{100 * e['rank_agreement_full']:.0f}%, {100 * e['rank_agreement_default']:.0f}% | "
            f"{totals['reference']}, {totals['full']}, {totals['default']} |")
    lines += ["", "Random images and labels: the ranks show what the two ways choose from the "
              "same trial, not a quality figure (the quality ablation in study 8 has those).",
              "", "One residual-like matrix per shape (a rank-64 part plus a flat tail), full SVD "
              "against the truncated randomized SVD (rank cap 100, 10 extra triplets, 4 power "
              "iterations):", "", "| shape | full s | randomized s | speed-up | largest "
              "singular-value error / sigma_1 |", "|---|---|---|---|---|"]
    for row in data["svd"]:
        m, n = row["shape"]
        lines.append(f"| {m} x {n} | {row['full_s']:.3f} | {row['randomized_s']:.3f} | "
                     f"{row['speedup']:.1f}x | {row['max_relative_sigma_error']:.1e} |")
    lines.append("")
    for m in data["peak_memory"]:
        lines.append(f"Peak RSS of 3 training steps, {m['model']}: HALRP "
                     f"{m['peak_rss_mb']['halrp']:.0f} MB, LoRA {m['peak_rss_mb']['lora']:.0f} MB, "
                     f"ratio {m['ratio']:.3f}.")
    lines += ["", *_targets(data["targets"], data), ""]
    return lines


def bytes_section(data: dict) -> list[str]:
    lines = ["## 5. Bytes on disk per task", "", f"Command: {_provenance(data)}. Each task is "
             "made to fill its budget (worst case).", "",
             "| backbone | budget | dtype | file bytes | / backbone fp32 bytes | growth | "
             "signature bytes (/ backbone) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        signature = (f"{r['signature_bytes']:,} ({r['signature_over_backbone']:.4f})"
                     if "signature_bytes" in r else "-")
        lines.append(f"| {r['model']} | {r['budget']} | {r['dtype']} | {r['file_bytes']:,} | "
                     f"{r['bytes_over_backbone']:.4f} | {r['growth']:.4f} | {signature} |")
    strict = all(r["bytes_over_backbone"] <= r["budget"] for r in data["rows"]
                 if r["dtype"] == "float32")
    slack = all(r["within_budget_plus_64KiB"] for r in data["rows"])
    lines += ["", f"- bytes / backbone bytes <= budget (fp32): **{'met' if strict else 'missed'}**"
              + ("" if strict else ": the file also holds the task's head (outside the "
                 "parameter budget by definition), the compact factors' bit masks and the "
                 "header"),
              f"- within budget x backbone bytes + 64 KiB: **{'met' if slack else 'missed'}**", ""]
    return lines


def soak(data: dict) -> list[str]:
    lines = ["## Soak: 50 tasks on one backbone", "", f"Command: {_provenance(data)}. Tiny data "
             "per task (2 batches of 8 images, 16 px), budget 0.1 per task; slopes are least "
             "squares over the tasks after the first five.", "",
             "| backbone | tasks | s per task | time slope (s per task) | RSS slope (MB per "
             "task) | task bytes (mean) | total growth (limit) | old tasks bit-identical | "
             "load all s | load one s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        mean_bytes = sum(r["task_bytes"]) / len(r["task_bytes"])
        lines.append(f"| {r['model']} ({r['backbone_params']:,} params) | {r['tasks']} | "
                     f"{r['time_mean_s']:.3f} | {r['time_slope_s_per_task']:+.5f} | "
                     f"{r['rss_slope_mb_per_task']:+.3f} | {mean_bytes / 1024:.0f} KiB | "
                     f"{r['total_growth']:.3f} ({r['growth_limit']:g}) | "
                     f"{r['old_tasks_bit_identical']} | {r['load_all_s']:.2f} | "
                     f"{r['load_one_s']:.3f} |")
    reads = data["runs"][0]["files_read_loading_one"]
    lines += ["", f"Loading one task out of {data['runs'][0]['tasks']} opens only: "
              + ", ".join(f"`{p}`" for p in reads) + ".", ""]
    return lines


def suggest(data: dict) -> list[str]:
    lines = ["## LoRA with HALRP's suggested ranks", "", f"Command: {_provenance(data)}. "
             f"Budget {data['budget']} of each model's parameters for the suggestion, "
             f"{data['epochs']} epochs, trial of {data['trial_steps']} steps (its time is in "
             "the suggestion's wall time); uniform LoRA gets the smallest rank with at least "
             "the suggestion's LoRA parameters (any gap favours it), AdaLoRA that rank as its "
             "target (1.5x initially). Same data, seed, learning rate and steps for all.", "",
             "| backbone | method | accuracy | LoRA parameters | wall s |", "|---|---|---|---|---|"]
    for study in data["studies"]:
        for method, row in study["methods"].items():
            label = method + (f" (rank {row['rank']})" if "rank" in row else "")
            lines.append(f"| {study['backbone']} | {label} | {row['acc']:.2f} | "
                         f"{row['lora_params']:,} | {row['wall_s']:.1f} |")
    lines.append("")
    for study in data["studies"]:
        m = study["methods"]
        best = max(m, key=lambda k: m[k]["acc"])
        lines.append(f"- {study['backbone']}: suggested {m['suggested']['acc']:.2f} vs uniform "
                     f"{m['uniform']['acc']:.2f} vs AdaLoRA {m['adalora']['acc']:.2f}; best: "
                     f"**{best}**")
    return lines + [""]


def mixed(data: dict) -> list[str]:
    sec = data["seconds"]
    single = sec["single_task"]
    rows = [("one task, whole batch (reference)", "single_task"),
            ("one pass (`task_ids=`, eval default)", "one_pass"),
            ("grouped (`strategy=\"grouped\"`)", "grouped"),
            ("loop over tasks (whole batch each)", "loop_over_tasks"),
            ("loop over samples", "loop_over_samples")]
    ratio = data["one_pass_over_single_task"]
    verdict = "met" if ratio <= data["target_one_pass_over_single_task"] else "missed"
    return ["## Mixed-task batches", "", f"Command: {_provenance(data)}. {data['model']} at "
            f"{data['image_size']} px, {data['tasks']} tasks, batch {data['batch']}, eval mode, "
            "medians.", "", "| way | ms per batch | / one task's forward |", "|---|---|---|",
            *[f"| {label} | {sec[key] * 1e3:.1f} | {sec[key] / single:.2f} |"
              for label, key in rows], "",
            f"- one pass at most {data['target_one_pass_over_single_task']}x one task's forward "
            f"of the whole batch: **{verdict}** ({ratio:.2f}x); largest difference from the "
            f"grouped path {data['one_pass_max_abs_difference']:.1e}", ""]


def norm_statistics(data: dict) -> list[str]:
    lines = ["## 7. Norm statistics that match the kept weights", "",
             f"Command: {_provenance(data)}. HALRP on EfficientNet-Lite0, Split Fashion-MNIST "
             "5 x 2 (study 2's data and seed); each finished task's test accuracy in eval mode "
             "beside its accuracy with batch statistics (train-mode BatchNorm on a merged copy, "
             "nothing kept).", "",
             "| end_task | task | eval mode | batch statistics | gap |", "|---|---|---|---|---|"]
    labels = {"stale": "without data (statistics from training)",
              "recomputed": "`calibration_data=` (recomputed)"}
    for name, result in data["results"].items():
        for row in result["tasks"]:
            lines.append(f"| {labels[name]} | {row['task']} | {row['eval_mode']:.2f} | "
                         f"{row['batch_statistics']:.2f} | {row['gap']:+.2f} |")
    lines += ["", " ".join(f"{labels[n]}: ACC {r['acc']:.2f}, largest gap "
                           f"{r['max_abs_gap']:.2f} points." for n, r in data["results"].items()),
              "", *_targets(data["targets"], data), ""]
    return lines


BACKBONES = {"lite0-split-fmnist": "EfficientNet-Lite0", "lite1-permuted-fmnist":
             "EfficientNet-Lite1", "lite0-split-digits": "EfficientNet-Lite0",
             "minilm-topics": "all-MiniLM-L6-v2",
             "vit-split-fmnist": "ViT (demo, trained by task 1)"}


def _quality_missed(name: str, d: dict) -> str:
    table, overall = d["summary"]["table"], d["summary"]["overall_acc"]
    if name == "halrp_acc_at_least_lora_on_every_sequence":
        behind = [s for s, r in table.items() if r["halrp"]["acc_mean"] < r["lora"]["acc_mean"]]
        return "behind on " + "; ".join(
            f"{s} ({table[s]['halrp']['acc_mean']:.2f} vs {table[s]['lora']['acc_mean']:.2f}, sd "
            f"{table[s]['halrp']['acc_sd']:.1f} / {table[s]['lora']['acc_sd']:.1f} over "
            f"{table[s]['halrp']['seeds']} seed(s); a full fine-tune reaches "
            f"{table[s]['full_ft']['acc_mean']:.2f}; stored parameters per task HALRP "
            f"{table[s]['halrp']['params_per_task']:,.0f}, LoRA "
            f"{table[s]['lora']['params_per_task']:,.0f})" for s in behind) + (
            ". Where the inputs are far from the backbone's pretraining (permuted pixels) "
            "LoRA learns at lr 1e-2, where HALRP's factors diverge; where HALRP's explained "
            "share is reached under the budget, LoRA, sized to the whole budget, stores more")
    if name == "halrp_within_2_points_of_full_ft_on_average":
        gaps = {s: r["full_ft"]["acc_mean"] - r["halrp"]["acc_mean"] for s, r in table.items()}
        near = [s for s, g in gaps.items() if g <= 2]
        return (f"{overall['full_ft'] - overall['halrp']:.1f} points on average (per sequence: "
                + ", ".join(f"{s} {g:.1f}" for s, g in gaps.items()) + "); within 2 points on "
                + (", ".join(near) or "none") + ", far where the inputs are far from the "
                "backbone's pretraining: 5% of the backbone per task does not carry that far")
    if name == "halrp_mopd_lowest_of_isolation_methods":
        noise = _noise(d)
        return "; ".join(
            f"{s}: " + ", ".join(f"{m} {r[m]['order_robustness']['MOPD']:.1f}"
                                 for m in ("halrp", "lora", "adalora", "full_ft"))
            for s, r in table.items() if "order_robustness" in r["halrp"]) + (
            f" (one order per method and seed; identical runs differ by up to "
            f"{max(noise):.2f} points)" if noise else "")
    return ""


def _noise(data: dict) -> list[float]:
    pairs = []
    for s, runs in data["sequences"].items():
        ablations = runs.get("ablations", {})
        for seed, row in ablations.get("default", {}).items():
            if seed in runs["seeds"]:
                pairs.append(abs(row["acc"] - runs["seeds"][seed]["halrp"]["acc"]))
            paper = ablations.get("paper trial lr (1e-3)", {}).get(seed)
            if paper is not None and s.startswith("lite"):
                pairs.append(abs(row["acc"] - paper["acc"]))
    return pairs


def quality(data: dict) -> list[str]:
    summary, table = data["summary"], data["summary"]["table"]
    methods = list(next(iter(table.values())))
    settings = data.get("settings", {})
    epochs, batches = settings.get("epochs", 2), settings.get("max_train_batches")
    size = f", at most {batches} training batches per task" if batches else ""
    lines = ["## 8. Quality across backbones, sequences, seeds and orders", "",
             f"`benchmarks/quality.py`: every method gets the same data{size}, passes over it "
             f"({epochs}; equal compute: HALRP's trial fine-tune is one of them, so it trains "
             f"{epochs - 1} after it), batches ({settings.get('batch_size', 64)}) and "
             "learning-rate sweep (1e-4, 1e-3, 1e-2, chosen on a 15% validation split of each "
             "task's training data at seed 0, never on the test set); ACC is the mean over "
             "seeds 0-2 at the chosen rate. LoRA's and AdaLoRA's ranks are sized to the same "
             f"budget ({settings.get('budget', 0.05):g} of the backbone), counted as HALRP "
             "counts its own (norm running statistics included, heads apart); HALRP stores "
             "less where its explained share is reached first. Where each sequence ran:", ""]
    for s, runs in data["sequences"].items():
        for where in runs.get("ran_on", []):
            lines.append(f"- {s}: `{where['command']}` on {where['machine']}")
    if data.get("note"):
        lines += ["", data["note"]]
    sources = data.get("merged_from", [])
    parts = sorted({str(Path(p).parent) + "/*.json" for p in sources if "quality_parts" in p})
    if sources:
        lines += ["", "Merged with `python benchmarks/quality.py --merge "
                  + " ".join(parts + [p for p in sources if "quality_parts" not in p]) + "`."]
    noise = _noise(data)
    if noise:
        lines += ["", "Noise: the same configuration run twice (HALRP at its chosen rate, in the "
                  "sweep and again as the ablations' default; and, on the CNN sequences, the "
                  "default beside `trial_lr=1e-3`, which is what the default picks there) "
                  f"differs by {max(noise):.2f} points at most (mean {sum(noise) / len(noise):.2f}"
                  f", {len(noise)} pairs): these runs are not bit-reproducible (GPU kernels; the "
                  "CPU run did not use `--deterministic`). Differences below that are not "
                  "findings."]
    lines += ["",
              "| sequence | backbone | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for s, row in table.items():
        cells = [f"{row[m]['acc_mean']:.2f} ± {row[m]['acc_sd']:.1f} (n={row[m]['seeds']}, "
                 f"lr {row[m]['lr']:g})" for m in methods]
        lines.append(f"| {s} | {BACKBONES.get(s, '')} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | " + " | ".join(
        f"**{summary['overall_acc'][m]:.2f}**" for m in methods) + " |")
    lines += ["", "Parameters stored per task (mean over seeds):", "",
              "| sequence | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for s, row in table.items():
        lines.append(f"| {s} | " + " | ".join(f"{row[m]['params_per_task']:,.0f}"
                                               for m in methods) + " |")
    if all(row[m].get("task_s") is not None for row in table.values() for m in methods):
        lines += ["", "Wall seconds per task (mean over tasks and seeds; HALRP's include its "
                  "trial and rank estimation):", "",
                  "| sequence | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for s, row in table.items():
            lines.append(f"| {s} | " + " | ".join(f"{row[m]['task_s']:.1f}"
                                                   for m in methods) + " |")
    ordered = [s for s in table if "order_robustness" in table[s]["halrp"]]
    if ordered:
        lines += ["", "Order robustness (seed 0, the task order as split plus 4 random orders):",
                  "", "| sequence | " + " | ".join(f"{m} MOPD / AOPD" for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for s in ordered:
            lines.append(f"| {s} | " + " | ".join(
                f"{table[s][m]['order_robustness']['MOPD']:.1f} / "
                f"{table[s][m]['order_robustness']['AOPD']:.1f}" for m in methods) + " |")
    if summary["ablations"]:
        names = sorted({s for per in summary["ablations"].values() for s in per})
        counts = {s: len(next(iter(data["sequences"][s]["ablations"].values()))) for s in names}
        base = summary["ablations"].get("default", {})
        lines += ["", "Ablations (HALRP only, at its chosen rate; ACC mean over the seeds run, "
                  "n per sequence in the header; the mean and its change are over the sequences "
                  "every variant ran on):", "",
                  "| variant | " + " | ".join(f"{s} (n={counts[s]})" for s in names)
                  + " | mean | vs default |", "|---|" + "---|" * (len(names) + 2)]
        for label, per in summary["ablations"].items():
            common = [s for s in names if s in per and s in base]
            mean = sum(per[s] for s in common) / len(common)
            delta = mean - sum(base[s] for s in common) / len(common)
            lines.append(f"| {label} | " + " | ".join(
                f"{per[s]:.2f}" if s in per else "" for s in names)
                + f" | {mean:.2f} | {delta:+.2f} |")
    lines += ["", "![quality](results/quality.png)", ""]
    for name, ok in summary["targets"].items():
        line = f"- {name.replace('_', ' ')}: **{'met' if ok else 'missed'}**"
        if not ok:
            line += ": " + _quality_missed(name, data)
        lines.append(line)
    return lines + [""]


def budget_split(data: dict) -> list[str]:
    """Study 8's budget-split ablations: `scale_modules` variants, deltas paired by seed."""
    names = sorted(data["acc"])
    labels = ["default"] + list(data["delta_vs_default"])
    lines = ["### Budget split: which layers get dense scales", "",
             f"Table: `{data['command']}` ({data['date']}). {data['note']} A layer without "
             "scales gives what they cost to its factors, so every variant stores the same "
             "parameters per task. Each cell is ACC, mean over the seeds run (n), and the change "
             "against the default run of the same seeds; the last column averages the changes "
             "over the sequences the variant ran on.", "",
             "| variant | " + " | ".join(
                 f"{s} (n={len(data['acc'][s]['default'])})" for s in names)
             + " | mean change |", "|---|" + "---|" * (len(names) + 1)]
    for label in labels:
        cells = []
        for s in names:
            by_seed = data["acc"][s].get(label)
            if not by_seed:
                cells.append("")
                continue
            mean = sum(by_seed.values()) / len(by_seed)
            change = data["delta_vs_default"].get(label, {}).get(s)
            cells.append(f"{mean:.2f}" + (f" ({change:+.2f})" if change is not None else ""))
        total = data["mean_delta"].get(label)
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + (f"{total:+.2f}" if total is not None else "") + " |")
    return lines + [""]


def estimation_quality(data: dict) -> list[str]:
    """Study 8's estimation ablation: the default (Fisher from the trial, truncated SVDs)
    against the reference's estimation, paired by seed."""
    label = "reference estimation (Fisher pass + full SVD)"
    names = sorted(data["acc"])
    lines = ["### Rank estimation: the Fisher from the trial against the reference's pass", "",
             f"Table: `{data['command']}` ({data['date']}). {data['note']}", "",
             "| sequence | seeds | default ACC | reference estimation ACC | change | layers "
             "with equal ranks | mean rank difference (default mean rank) | estimation s "
             "without the trial, default / reference |", "|---|---|---|---|---|---|---|---|"]
    seconds = data.get("estimate_s_without_trial", {})
    for s in names:
        base, ref = data["acc"][s].get("default", {}), data["acc"][s].get(label, {})
        seeds = sorted(set(base) & set(ref))
        if not seeds:
            continue
        agree = data["rank_agreement"].get(label, {}).get(s, {})
        mean = lambda d: sum(d[k] for k in seeds) / len(seeds)  # noqa: E731
        lines.append(
            f"| {s} | {len(seeds)} | {mean(base):.2f} | {mean(ref):.2f} | "
            f"{mean(base) - mean(ref):+.2f} | {100 * agree.get('equal', float('nan')):.0f}% | "
            f"{agree.get('mean_abs_difference', float('nan')):.2f} "
            f"({agree.get('default_mean_rank', float('nan')):.1f}) | "
            f"{seconds.get('default', {}).get(s, float('nan')):.2f} / "
            f"{seconds.get(label, {}).get(s, float('nan')):.2f} |")
    change = -data["mean_delta"][label] if label in data["mean_delta"] else float("nan")
    lines += ["", f"Mean change of ACC, default minus reference, over the sequences: "
              f"{change:+.2f} points (identical runs of study 8 differ by up to 0.84). The "
              "ranks compared are the explained-share ranks, before the budget cuts them, "
              "layer by layer over every estimated task. Where they differ most (the "
              "EfficientNet sequences, whose BatchNorm layers use batch statistics in the "
              "trial's train mode and running ones in the pass's eval mode) the two Fisher "
              "estimates weight the layers differently and the explained share is reached at "
              "other ranks; the budget then binds both, and accuracy does not drop.", ""]
    return lines


def trial_quality(data: dict) -> list[str]:
    """Study 8's trial ablation: the default low-rank trial against the full trial (the
    default up to issue 23), paired by seed."""
    label = "full trial (merged copy and dense Adam)"
    names = sorted(data["acc"])
    lines = ["### Rank estimation: the low-rank trial against the full trial", "",
             f"Table: `{data['command']}` ({data['date']}). {data['note']}", "",
             "| sequence | seeds | low-rank trial ACC (default) | full trial ACC | change | "
             "layers with equal ranks | mean rank difference (low-rank mean rank) | estimation "
             "s without the trial, low-rank / full |", "|---|---|---|---|---|---|---|---|"]
    seconds = data.get("estimate_s_without_trial", {})
    for s in names:
        base, other = data["acc"][s].get("default", {}), data["acc"][s].get(label, {})
        seeds = sorted(set(base) & set(other))
        if not seeds:
            continue
        agree = data["rank_agreement"].get(label, {}).get(s, {})
        mean = lambda d: sum(d[k] for k in seeds) / len(seeds)  # noqa: E731
        lines.append(
            f"| {s} | {len(seeds)} | {mean(base):.2f} | {mean(other):.2f} | "
            f"{mean(base) - mean(other):+.2f} | {100 * agree.get('equal', float('nan')):.0f}% | "
            f"{agree.get('mean_abs_difference', float('nan')):.2f} "
            f"({agree.get('default_mean_rank', float('nan')):.1f}) | "
            f"{seconds.get('default', {}).get(s, float('nan')):.2f} / "
            f"{seconds.get(label, {}).get(s, float('nan')):.2f} |")
    change = -data["mean_delta"][label] if label in data["mean_delta"] else float("nan")
    per_seed = [data["acc"][s]["default"][k] - data["acc"][s][label][k]
                for s in names for k in data["acc"][s].get("default", {})
                if k in data["acc"][s].get(label, {})]
    spread = f"{min(per_seed):+.2f} to {max(per_seed):+.2f}" if per_seed else "none"
    lines += ["", f"Mean change of ACC, low-rank minus full trial, over the sequences: "
              f"{change:+.2f} points; per seed and sequence, {spread} (identical runs of study "
              "8 differ by up to 0.84). Ranks are the explained-share ranks before the budget "
              "cuts them, layer by layer over every estimated task.", ""]
    return lines


def memory(data: dict) -> list[str]:
    rows = {(r["backbone"], r["method"]): r for r in data["rows"]}
    names = {"vit": "ViT-S/16, 224 px, batch 8", "cnn": "EfficientNet-Lite0, 224 px, batch 16",
             "lm": "135M Llama-shaped causal LM, 8 x 64 tokens"}
    methods = ("lora", "halrp", "halrp-full", "full")
    lines = ["## 11. Memory of a task's whole life", "",
             f"Command: {_provenance(data)}. Each cell is the peak RSS of a fresh process that "
             "builds the backbone (float32, random weights) and lives one task: PEFT LoRA r8 "
             "(on every layer HALRP adapts but grouped convs, head as `modules_to_save`) and a "
             "full fine-tune with Adam train 3 steps; HALRP runs attach, add_task, "
             "estimate_ranks (3 trial steps), 3 training steps and end_task with the task's "
             "batches, with the default low-rank trial (`halrp`) or the paper's full trial "
             "(`halrp-full`). Shared: the RSS once the backbone is built (the imports and the "
             "weights), which every method holds.", "",
             "| backbone | shared MB | " + " | ".join(f"{m} MB (x LoRA)" for m in methods)
             + " |", "|---|---|" + "---|" * len(methods)]
    for kind, ratios in data["over_lora"].items():
        cells = " | ".join(f"{rows[kind, m]['peak_rss_mb']:.0f} ({ratios[m]:.2f}x)"
                           for m in methods)
        lines.append(f"| {names.get(kind, kind)} | {rows[kind, 'lora']['shared_rss_mb']:.0f} | "
                     f"{cells} |")
    # Time at equal passes over the data: HALRP's life makes 2 x 3 training steps (the trial
    # counts) and one calibration forward; LoRA's and the full fine-tune's, 3 steps.
    lines += ["", "Time of the same lives (seconds, after the backbone is built; 3-step runs, so "
              "one-time costs weigh heavily). HALRP makes 3 trial steps and 3 training steps, "
              "LoRA 3 steps: *x LoRA at equal passes* divides HALRP's time by twice LoRA's.", "",
              "| backbone | LoRA s | HALRP s | x LoRA at equal passes | HALRP full trial s "
              "| x LoRA at equal passes |", "|---|---|---|---|---|---|"]
    for kind in data["over_lora"]:
        lora_s = rows[kind, "lora"]["seconds"]
        low, full = rows[kind, "halrp"]["seconds"], rows[kind, "halrp-full"]["seconds"]
        lines.append(f"| {names.get(kind, kind)} | {lora_s:.1f} | {low:.1f} | "
                     f"{low / (2 * lora_s):.2f} | {full:.1f} | {full / (2 * lora_s):.2f} |")
    seven = data.get("llama_7b")
    if seven:
        a = seven["assumptions"]
        parts = seven["parts_gib"]
        lines += ["", "A 7B Llama (6.74 B parameters, 32 layers, hidden 4096, MLP 11008), as "
                  "arithmetic from the parts above: bf16 weights "
                  f"({parts['weights']:.1f} GiB); activations scaled from the LM's measured "
                  f"LoRA activations per token, layer and hidden unit "
                  f"({a['activation_bytes_per_token_per_layer_per_hidden_unit_fp32']:.1f} bytes "
                  f"in fp32, halved in bf16) to {a['tokens_per_batch']} tokens "
                  f"({parts['activations']:.1f} GiB); task tensors in fp32 with their gradient "
                  f"and two Adam moments (LoRA r8 {parts['lora_tensors']:.2f} GiB, the low-rank "
                  f"trial's scales and rank-{a['trial_rank']} factors "
                  f"{parts['halrp_low_rank_trial_tensors']:.2f} GiB); a full fine-tune's bf16 "
                  "gradients and fp32 moments; the full trial's merged copy, its gradients and "
                  "moments. HALRP's training step keeps no more activations than LoRA's "
                  "(`adapters/layers/scaled.py`), so the activations are LoRA's for both.", "",
                  "| method | GiB | x LoRA |", "|---|---|---|"]
        for m in methods:
            lines.append(f"| {m} | {seven['gib'][m]:.1f} | {seven['over_lora'][m]:.2f} |")
    lines += ["", *_targets(data["targets"], data), ""]
    return lines


CI_LABELS = {"halrp auto (default: top 2 x evidence)": "HALRP, `task_ids=\"auto\"` (default: "
                                                      "unsure inputs re-checked by 2 candidates' "
                                                      "evidence)",
             "halrp+retrieval (backbone)": "HALRP, task found by the frozen features alone "
                                           "(retrieval_candidates=1)",
             "halrp+retrieval (task)": "HALRP, task found (each task's features)",
             "oracle": "HALRP told the task (oracle)",
             "prototype": "prototype classifier, frozen backbone",
             "lifted-feature ridge, frozen backbone": "lifted-feature ridge (RanPAC-style), "
                                                      "frozen backbone",
             "seq_ft": "sequential fine-tuning, growing head",
             "halrp+retrieval, head x prototypes": "HALRP, task found, head x prototypes "
                                                   "(measured, not a default)",
             "halrp, top-2 x evidence, all checked": "HALRP, top 2 x evidence, every input "
                                                     "checked (measured)",
             "halrp, top-3 x evidence": "HALRP, top 3 x evidence (measured)",
             "halrp, top-2 x evidence, weight 1": "HALRP, top 2 x evidence, weight 1 (measured)",
             "halrp, top-2 x evidence, weight 10": "HALRP, top 2 x evidence, weight 10 "
                                                   "(measured)",
             "halrp, top-2 x head confidence (uncalibrated)": "HALRP, top 2 x raw head "
                                                              "confidence (the earlier rule)"}


def _ci_missed(table: dict, detail: dict) -> str:
    """Which comparisons are lost, and the mechanism, from the figures themselves."""
    best = next(iter(CI_LABELS))
    behind, why = [], []
    for name, peers in detail.items():
        lost = [(peer, metric) for peer, by_metric in peers.items()
                for metric, ok in by_metric.items() if not ok]
        for peer, metric in lost:
            row = table[name][metric]
            behind.append(f"{name} {metric} vs {peer} ({row[best]:.2f} vs {row[peer]:.2f})")
        if lost:
            r = table[name]
            oracle = r["last"]["oracle"]
            coverage = r.get("top_k_coverage_last", {}).get("2")
            why.append(
                f"{name}: HALRP told the task is right on {oracle:.1f}% after the last task "
                + (f"and the right task is among the 2 candidates for {coverage:.1f}%, "
                   if coverage is not None else "")
                + f"but `task_ids=\"auto\"` gets {r['last'][best]:.1f}%: a sample is right "
                "only when its task is found and its task's head is right, while the frozen-"
                "feature classifiers lose only the samples whose class they miss")
    return "behind on " + "; ".join(behind) + (". Why: " + "; ".join(why) if why else "")


def class_incremental(data: dict) -> list[str]:
    table, targets = data["summary"]["table"], data["summary"]["targets"]
    seeds = sorted({r["seeds"] for r in table.values()})
    lines = ["## 10. Task-agnostic inference (class-incremental)", "",
             f"Command: {_provenance(data)}. Study 8's sequences, data, epochs and batches; "
             "HALRP at the learning rate study 8 chose on validation; sequential fine-tuning's "
             "rate swept on validation at seed 0. After each task, every seen task's test data "
             "is scored over all classes seen so far, without task names. Means over "
             f"{'/'.join(map(str, seeds))} seeds.", "",
             "Average over the steps / after the last task (%):", "",
             "| method | " + " | ".join(f"{n} ({BACKBONES.get(n, n)})" for n in table) + " |",
             "|---|" + "---|" * len(table)]
    for method, label in CI_LABELS.items():
        if any(method not in r["average"] for r in table.values()):
            continue
        lines.append(f"| {label} | " + " | ".join(
            f"{r['average'][method]:.2f} / {r['last'][method]:.2f}" for r in table.values())
            + " |")
    lines += ["", "Task signature designs (HALRP's CI accuracy when the task is found that way; "
              "`task_signature`, `signature_rank`): task found after the last task / CI average "
              "/ CI last, and the signature's KiB per task:", "",
              "| design | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for design in next(iter(table.values()))["retrieval"]:
        lines.append(f"| {design} | " + " | ".join(
            f"{r['retrieval'][design]:.1f} / {r['designs_average'][design]:.2f} / "
            f"{r['designs_last'][design]:.2f} / {r['signature_bytes'][design] / 1024:,.0f} KiB"
            for r in table.values()) + " |")
    lines.append("| (the task's own adapters, float32) | " + " | ".join(
        f"{r['stored_bytes_per_task'] / 1024:,.0f} KiB" for r in table.values()) + " |")
    if all("lifted_bytes_per_task" in r for r in table.values()):
        lines.append("| (the lifted-feature ridge's statistics, float32) | " + " | ".join(
            f"{r['lifted_bytes_per_task'] / 1024:,.0f} KiB" for r in table.values()) + " |")
    if all("top_k_coverage_last" in r for r in table.values()):
        ks = list(next(iter(table.values()))["top_k_coverage_last"])
        lines += ["", "How often the right task is among the top k of the frozen features' "
                  "task posterior (each task's class posteriors summed), average over the steps "
                  "/ after the last task (%):", "",
                  "| k | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
        for k in ks:
            lines.append(f"| {k} | " + " | ".join(
                f"{r['top_k_coverage_average'][k]:.1f} / {r['top_k_coverage_last'][k]:.1f}"
                for r in table.values()) + " |")
    lines += ["", "Cost per batch, seed 0 after the last task, medians of calls interleaved in "
              "one process (ratio to one task's forward of the same batch):", "",
              "| call | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    calls = {"retrieval_backbone": "find the task: backbone features",
             "retrieval_task": "find the task: each task's features",
             "auto_forward_backbone": "`task_ids=\"auto\"`, 1 candidate: find + route + "
                                      "forward",
             "auto_default": "`task_ids=\"auto\"` as attached by default (2 candidates, "
                             "unsure inputs checked)",
             "candidates_top_2": "top 2 tasks, every input through both",
             "candidates_top_3": "top 3 tasks, every input through all 3"}
    for key, label in calls.items():
        if any(r["cost_ratio"] and key not in r["cost_ratio"] for r in table.values()):
            continue
        lines.append(f"| {label} | " + " | ".join(
            f"{r['cost_ratio'][key]:.2f}x" if r["cost_ratio"] else "-" for r in table.values())
            + " |")
    lines.append("")
    for name, value in targets.items():
        line = f"- {name.replace('_', ' ')}: **{'met' if value['met'] else 'missed'}**"
        if not value["met"] and "detail" in value:
            line += ": " + _ci_missed(table, value["detail"])
        if "ratios" in value:
            line += " (" + ", ".join(f"{n} {v:.2f}x" for n, v in value["ratios"].items()) + ")"
        lines.append(line)
    note = data.get("note")
    return lines + ([f"", note] if note else []) + [""]


def retrieval_designs(data: dict) -> list[str]:
    table = data["table"]
    seeds = sorted({r["seeds"] for r in table.values()})
    names = list(table)
    lines = ["### 10b. Which evidence finds the task: designs replayed on study 10's features", "",
             f"Command: `{data['command']}` ({data['date']}). Study 10's training (same "
             "protocol, seeds and rates); per test sample the frozen features, each task's head "
             "logits and adapted features, and whether the task's head is right are collected "
             "once, then each design is replayed on them (a sample is right when its task is "
             "picked and its head is right). Means over "
             f"{'/'.join(map(str, seeds))} seeds; average over the steps / after the last task "
             "(%). The replayed default and k=1 rows match study 10's rows run through the model "
             "within 0.3 points (equal on the ViT and, for k=1, on Lite0; the rest is float "
             "rounding of the one-pass forward near decisions, and on MiniLM a training run that "
             "differs slightly).", "",
             "| design | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    designs = [d for d in table[names[0]] if d != "seeds"]
    for design in designs:
        lines.append(f"| {design} | " + " | ".join(
            f"{table[n][design]['average']:.2f} / {table[n][design]['last']:.2f}" for n in names)
            + " |")
    return lines + [""]


def _gpu_dry_run(data: dict | None) -> list[str]:
    if not data:
        return []
    compiled = data.get("compile", {})
    works = (f"`torch.compile` of the adapted model works (first training step with "
             f"compilation {compiled['compile_s']:.0f} s) and the compiled step is "
             f"{compiled['train_ratio']:.2f}x compiled LoRA's "
             f"({compiled['train_step_s']['halrp'] * 1e3:.0f} ms against "
             f"{compiled['train_step_s']['lora'] * 1e3:.0f} ms)") if compiled.get("works") else (
        f"`torch.compile` of the adapted model failed: {compiled.get('error')}")
    return [f"The same script on this CPU machine, as a dry run (`{data['command']}`, "
            f"{data['date']}): {works}. On a CPU, compiling does not close the step's gap to "
            "LoRA; its other figures here (unpaired timings, a 4-batch trial) are not the "
            "study's.", ""]


def gpu(data: dict) -> list[str]:
    step, inf = data["train_step_s"], data["inference_s"]
    peaks = data["peak_bytes"]
    lines = ["## 6. GPU", "", f"Command: `{data['command']}` ({data['date']}, {data['device']}, "
             f"torch {data['torch']}). {data['model']} at {data['image_size']} px, batch "
             f"{data['batch']}, {data['dtype']} autocast, rank {data['rank']}.", "",
             "| figure | HALRP | LoRA | ratio |", "|---|---|---|---|",
             f"| training step | {step['halrp'] * 1e3:.1f} ms | {step['lora'] * 1e3:.1f} ms | "
             f"{data['train_ratio']:.3f} |"]
    if peaks["lora"]:
        lines.append(f"| peak memory | {peaks['halrp'] / 2**30:.2f} GiB | "
                     f"{peaks['lora'] / 2**30:.2f} GiB | {data['peak_ratio']:.3f} |")
    lines += [f"| unmerged inference | {inf['halrp'] * 1e3:.1f} ms | {inf['lora'] * 1e3:.1f} ms "
              f"| {data['unmerged_halrp_vs_lora']:.3f} |",
              f"| merged inference vs the plain model | {inf['merged'] * 1e3:.1f} ms | "
              f"{inf['plain'] * 1e3:.1f} ms (plain) | {data['merged_vs_plain']:.3f} |", "",
              f"Rank estimation without the trial, over a trial epoch: reference "
              f"{data['estimation_over_trial_reference']:.3f}x, default "
              f"{data['estimation_over_trial_default']:.3f}x."]
    compiled = data.get("compile")
    if compiled:
        if compiled["works"]:
            lines.append(f"`torch.compile` of the adapted model: works (first step with "
                         f"compilation {compiled['compile_s']:.0f} s); compiled step HALRP / "
                         f"LoRA {compiled['train_ratio']:.3f}.")
        else:
            lines.append(f"`torch.compile` of the adapted model fails: {compiled['error']}")
    return lines + ["", *_targets(data["targets"]), ""]


FRONTIER_ORDER = ("halrp", "lora", "dora", "ia3", "adalora", "pissa", "eva", "full_ft")


def frontier(data: dict) -> list[str]:
    """Study 12: ACC against stored parameters per task, every method at every budget."""
    summary, settings = data["summary"], data["settings"]
    budgets = [str(b) for b in settings["budgets"]]
    methods = [m for m in FRONTIER_ORDER if any(m in summary["table"].get(b, {})
                                                  for b in budgets)]
    variants = sorted({m for per in summary["table"].values() for m in per
                       if m.startswith("halrp[")})
    seqs = list(data["sequences"])
    lines = ["## 12. The frontier: accuracy at every budget, at equal compute", "",
             f"Command: `{data['command']}` ({data['date']}; parts from "
             f"{', '.join(data['machines'])}; merged from `{data['parts']}`). "
             f"Every method learns the same {settings.get('max_tasks')} tasks of at most "
             f"{settings.get('max_train_batches')} training batches of {settings['batch_size']} "
             f"per sequence, {settings['epochs']} passes over each (HALRP's trial pass counts), "
             "the learning rate chosen on validation at seed 0 at budget "
             f"{settings['sweep_budget']} from {settings['lrs']} and reused, seeds "
             f"0-{settings['seeds'] - 1}. Stored parameters per task are counted as HALRP counts "
             "its own (the adapter, norm copies with their running statistics; heads apart), "
             "and each peer is sized to the budget by `protocol.peers.plan_peer`. Sequences: "
             + ", ".join(f"{n} ({data['sequences'][n].get('backbone', '')})".replace(" ()", "")
                         for n in seqs) + ".", "",
             "Mean ACC over the sequences each method ran (n = sequences x seeds; the sets "
             "differ between methods while the study is incomplete: compare with the paired "
             "lead below):", "",
             "| budget | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for b in budgets:
        per = summary["table"].get(b, {})
        cells = []
        for m in methods:
            by_seq = summary["table"].get(b, {}).get(m, {})
            if by_seq:
                n = sum(v["seeds"] for v in by_seq.values())
                mean = sum(v["acc"] for v in by_seq.values()) / len(by_seq)
                cells.append(f"{mean:.2f} (n={n})")
            else:
                cells.append("-")
        del per
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Per sequence (ACC, mean over seeds; stored parameters per task below):", ""]
    for name in seqs:
        lines += [f"**{name}**", "", "| budget | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for b in budgets:
            cells = []
            for m in methods:
                row = summary["table"].get(b, {}).get(m, {}).get(name)
                cells.append(f"{row['acc']:.2f} ({row['stored_params']:,.0f})" if row else "-")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    lead = summary["halrp_lead"]
    if lead:
        lines += ["HALRP's lead over each peer (ACC points, paired by sequence):", "",
                  "| budget | " + " | ".join(m for m in methods if m not in ("halrp", "full_ft"))
                  + " |", "|---|" + "---|" * (len(methods) - 2)]
        for b in budgets:
            lines.append(f"| {b} | " + " | ".join(
                f"{lead[b][m]:+.2f}" if m in lead.get(b, {}) else "-"
                for m in methods if m not in ("halrp", "full_ft")) + " |")
        lines.append("")
    if variants:
        lines += ["HALRP variants: change in ACC against the default, paired by sequence and "
                  "seed (the variants ran the seeds below; n = sequence-seed pairs; '-': the "
                  "variant refused the budget):", "",
                  "| budget | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for b in budgets:
            cells = []
            for v in variants:
                pairs = [(row["acc"], base[seed]["acc"])
                         for seq in data["sequences"].values()
                         for seed, row in seq["runs"].get(v, {}).get(b, {}).items()
                         if row is not None
                         and (base := seq["runs"].get("halrp", {}).get(b, {})).get(seed)]
                cells.append(f"{sum(a - d for a, d in pairs) / len(pairs):+.2f} (n={len(pairs)})"
                             if pairs else "-")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    noise = summary["noise"]
    if noise["pairs"]:
        lines += [f"Noise: identical runs differ by up to {noise['max']:.2f} points "
                  f"(mean {noise['mean']:.2f}, {noise['pairs']} pairs); smaller differences are "
                  "not findings.", ""]
    lines += ["![frontier](results/frontier.png)", ""]
    said = {True: "met", False: "missed", None: "not measured yet"}
    for key, ok in summary["targets"].items():
        line = f"- {key.replace('_', ' ')}: **{said[ok]}**"
        if ok is False and key in FRONTIER_MISSED_BECAUSE:
            line += ": " + FRONTIER_MISSED_BECAUSE[key](summary)
        lines.append(line)
    lines.append("")
    return lines


def _frontier_gap(summary: dict, budget: str, peer: str) -> str:
    """Where HALRP trails `peer` most at `budget`: the sequence, both ACCs, and HALRP's stored
    parameters against what the budget allows (a full copy's parameters x budget)."""
    rows = summary["table"][budget]
    common = [s for s in rows["halrp"] if s in rows.get(peer, {})]
    worst = min(common, key=lambda s: rows["halrp"][s]["acc"] - rows[peer][s]["acc"])
    ours, theirs = rows["halrp"][worst], rows[peer][worst]
    full = rows.get("full_ft", {}).get(worst)
    allowed = f" of the {float(budget) * full['stored_params']:,.0f} allowed" if full else ""
    where = "most on" if ours["acc"] < theirs["acc"] else "its smallest lead on"
    return (f"{peer} {summary['halrp_lead'][budget][peer]:+.2f} at {budget}, {where} {worst} "
            f"(HALRP {ours['acc']:.2f} storing {ours['stored_params']:,.0f}{allowed}; {peer} "
            f"{theirs['acc']:.2f} storing {theirs['stored_params']:,.0f})")


def _frontier_behind(summary: dict, below: float = 0.0, budgets: list[str] | None = None) -> str:
    cells = [(b, m) for b, per in summary["halrp_lead"].items() for m, lead in per.items()
             if lead < below and (budgets is None or b in budgets)]
    return "; ".join(_frontier_gap(summary, b, m) for b, m in cells)


# Why a frontier target is missed: the cells that miss it and where each gap comes from. The
# mechanism behind them (measured, in the issue notes and CHANGELOG): on lite1-permuted-fmnist
# the peers that lead learn at lr 1e-2, where HALRP's factors diverge; on all-MiniLM-L6-v2
# HALRP's explained share is reached well under the budget, which PiSSA and EVA fill.
FRONTIER_MISSED_BECAUSE = {
    "halrp_at_least_every_peer_at_every_budget": lambda s: "behind " + _frontier_behind(s),
    "halrp_best_peer_plus_1_at_0.01_and_below": lambda s: "under the best peer + 1 point: "
    + _frontier_behind(s, 1.0, [b for b in s["halrp_lead"] if float(b) <= 0.01]),
}


def main() -> str:
    parts = ["# Benchmarks", "",
             "Every table below is generated by `python benchmarks/report.py` from "
             "`benchmarks/results/*.json`, each written by the command it names. Absolute times "
             "come from a shared 2-core CPU machine: compare the ratios, measured side by side "
             "in one run.", ""]
    for name, render in (("pmnist_lenet", pmnist),
                         ("pretrained_methods", lambda d: methods(
                             d, "## 2. Pretrained backbone: EfficientNet-Lite0, Split "
                                "Fashion-MNIST, five methods")),
                         ("order_robustness", lambda d: methods(
                             d, "## 3. Order robustness: the same tasks in five orders")),
                         ("speed", speed), ("bytes_per_task", bytes_section)):
        data = _load(name)
        parts += render(data) if data else [f"## {name}", "", "Not run yet.", ""]
    gpu_data = _load("gpu")
    parts += gpu(gpu_data) if gpu_data else [
        "## 6. GPU", "", "No GPU machine has been lent to a session since this study was "
        "written, so it has no figures yet. The script is ready and tested on CPU "
        "(`python benchmarks/gpu.py --quick --device cpu` runs in the test suite); on a CUDA "
        "machine:", "", "```bash", "python benchmarks/gpu.py        # ViT-B/16, 224 px, bf16, "
        "batch 64: step, memory, inference, estimation, torch.compile",
        "accelerate launch --mixed_precision bf16 recipes/vit_split_imagenet.py --epochs 1 "
        "--output-dir runs/gpu-demo", "```", "", *_gpu_dry_run(_load("gpu_cpu_dry_run"))]
    for name, render in (("soak", soak), ("suggest_lora", suggest), ("mixed_batches", mixed),
                         ("norm_statistics", norm_statistics), ("quality", quality),
                         ("quality_budget_split", budget_split),
                         ("quality_estimation", estimation_quality),
                         ("quality_trial", trial_quality),
                         ("class_incremental", class_incremental),
                         ("retrieval_designs", retrieval_designs), ("memory", memory),
                         ("frontier", frontier)):
        data = _load(name)
        parts += render(data) if data else [f"## {name}", "", "Not run yet.", ""]
    text = "\n".join(parts)
    (HERE / "README.md").write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
