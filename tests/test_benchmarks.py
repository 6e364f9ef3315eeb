"""The benchmark harnesses, end to end in their tiny mode (a few steps on 2 ranks), so they cannot rot. The numbers
they produce are not checked here, only the shape of what they write."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def run_script(script: str, *args: str) -> str:
    command = [sys.executable, os.path.join(BENCHMARKS, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def load_suite():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("schedule_suite")


def test_schedule_suite_tiny(tmp_path):
    out = tmp_path / "suite"
    stdout = run_script("schedule_suite.py", "--tiny", "--problems", "lm_lr_low,cls_overfit", "--out", str(out))

    with open(out / "results.json") as f:
        results = json.load(f)
    assert set(results["problems"]) == {"lm_lr_low", "cls_overfit"}
    for name, problem in results["problems"].items():
        methods = problem["methods"]
        assert set(methods) == {"default", "clan", "pbt", "pbt_ray", "schedule_free", "oracle"}, name
        for method, result in methods.items():
            assert {"fitness", "gap_closed", "samples", "wall_s"} <= set(result), (name, method, result)
        ran = ["default", "clan", "pbt", "oracle"]
        if importlib.util.find_spec("schedulefree") is not None:
            ran.append("schedule_free")
        for method in ran:
            result = methods[method]
            assert result["status"] == "ok", (name, method, result.get("status"), result.get("log_tail"))
            assert isinstance(result["fitness"], float) and isinstance(result["wall_s"], float), (name, method)
            assert result["samples"] > 0 and result["curve"] and result["lr_schedule"], (name, method)
        assert methods["default"]["gap_closed"] in (0.0, None)
        assert methods["oracle"]["grid_points"] == len(methods["oracle"]["grid"]) >= 2
        assert methods["oracle"]["samples"] == methods["oracle"]["grid_points"] * methods["default"]["samples"]
        assert len(methods["clan"]["lr_schedule"]) == results["settings"]["steps"]
        if importlib.util.find_spec("ray") is None:
            assert methods["pbt_ray"]["status"].startswith("not run"), methods["pbt_ray"]
        assert (out / f"{name}.png").stat().st_size > 0
        history = out / "runs" / name / "clan" / "clan_history.jsonl"
        assert history.exists() and (history.parent / "clan_schedule.json").exists()
    assert "| problem | default | clan | pbt |" in stdout
    assert "gap_closed ≥ 0.9" in stdout


def test_every_problem_builds_and_trains_a_step(tmp_path):
    """The problems the tiny run above skips: their data, model and (for fine-tuning) pretrained start build, and
    the model takes a finite loss on its data with every model setting of the oracle grid."""
    suite = load_suite()
    settings = suite.Settings(**suite.SUITES["tiny"], cache_dir=str(tmp_path))
    for name, problem in suite.PROBLEMS.items():
        if problem.setup is not None:
            problem.setup(settings)
        train, val, test = problem.make_data(settings)
        assert min(len(train), len(val), len(test)) >= 16, name
        for point in suite.oracle_grid(problem, settings)[:1] + [{}]:
            _, model_kwargs = suite._training_fields(problem, point, settings)
            model = problem.make_model(settings, **model_kwargs)
            batch = {key: torch.stack([train[i][key] for i in range(4)]) for key in train[0]}
            loss = model(**batch).loss
            loss.backward()
            assert torch.isfinite(loss), (name, point)
        assert suite.oracle_grid(problem, suite.Settings(**suite.SUITES["full"])), name


def test_overhead_tiny(tmp_path):
    out = tmp_path / "overhead"
    stdout = run_script("overhead.py", "--tiny", "--repeats", "1", "--out", str(out))

    with open(out / "overhead.json") as f:
        result = json.load(f)
    assert set(result["runs"]) == {"trainer", "clan_duty0", "clan_default"}
    assert result["overhead_ratio"] > 0 and result["overhead_ratio_default_duty"] > 0
    split = result["round_split"]
    assert set(split["fractions"]) == {"cooperative", "competitive", "fitness", "selection_exchange"}
    assert abs(sum(split["fractions"].values()) - 1) < 1e-6
    exchange = result["exchange"]
    assert exchange["exchanges"] >= 2  # one selection in each clan run
    # A clone receives exactly its source's trainable weights, buffers and Adam state: nothing more.
    assert exchange["bytes_per_exchange"] == exchange["clone_bytes_expected"], exchange
    assert set(result["targets"]) == {"cooperative_step_within_3pct_of_ddp", "selection_exchange_under_2pct_of_round"}
    assert "overhead_ratio" in stdout
