"""The benchmark harnesses, end to end in their tiny mode (a few steps on 2 ranks), so they cannot rot. The numbers
they produce are not checked here, only the shape of what they write."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import torch
from transformers import EvalPrediction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def run_script(script: str, *args: str) -> str:
    command = [sys.executable, os.path.join(BENCHMARKS, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def refusal(script: str, *args: str) -> str:
    """Run a benchmark script that must refuse its arguments (argparse's exit 2, before any compute); its stderr."""
    command = [sys.executable, os.path.join(BENCHMARKS, script), *args]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, f"{' '.join(command)} exited {refused.returncode}:\n{refused.stderr[-3000:]}"
    return refused.stderr


def load_suite():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("schedule_suite")


def test_schedule_suite_tiny(tmp_path):
    out = tmp_path / "suite"
    stdout = run_script(
        "schedule_suite.py", "--tiny", "--problems", "lm_lr_low,cls_metric", "--seeds", "0,1", "--variants",
        "no_resample", "--ray-problems", "cls_metric", "--out", str(out),
    )  # fmt: skip

    with open(out / "results.json") as f:
        results = json.load(f)
    suite = load_suite()
    assert set(results["problems"]) == {"lm_lr_low", "cls_metric"}
    assert results["settings"]["seeds"] == [0, 1] and results["settings"]["ray_seeds"] == [0]
    assert results["settings"]["ray_problems"] == ["cls_metric"]
    for name, problem in results["problems"].items():
        methods = problem["methods"]
        assert set(methods) == {"default", "clan", "pbt", "pbt_ray", "schedule_free", "oracle"}, name
        for method, result in methods.items():
            assert {"fitness", "gap_closed", "samples", "wall_s"} <= set(result), (name, method, result)
        for method in ["default", "clan", "pbt", "oracle", "schedule_free"]:  # the test extra installs schedulefree
            result = methods[method]
            assert result["status"] == "ok", (name, method, result.get("status"), result.get("log_tail"))
            assert isinstance(result["fitness"], float) and isinstance(result["wall_s"], float), (name, method)
            assert result["samples"] > 0 and result["curve"] and result["lr_schedule"], (name, method)
        # default, clan and pbt ran once per seed (schedule_free at the first); the table's numbers are the mean over
        # those seeds.
        assert methods["schedule_free"]["seeds"] == [0], methods["schedule_free"]
        for method in ("default", "clan", "pbt"):
            result = methods[method]
            assert result["seeds"] == [0, 1] and set(result["per_seed"]) == {"0", "1"}, (name, method)
            fitness = [r["fitness"] for r in result["per_seed"].values()]
            assert all(isinstance(f, float) for f in fitness), (name, method, result["per_seed"])
            assert abs(result["fitness"] - sum(fitness) / 2) < 1e-9, (name, method)
            assert result["fitness_sd"] is not None, (name, method)
        for method in ("clan", "pbt"):
            for seed in ("seed0", "seed1"):
                history = out / "runs" / name / method / seed / "clan_history.jsonl"
                assert history.exists() and (history.parent / "clan_schedule.json").exists(), history
        if problem["greater_is_better"]:
            assert 0.0 <= methods["default"]["fitness"] <= 1.0, "accuracy"
        # The oracle's grid picked its point at seed 0; that point ran at seed 1 too. Each seed of every method is
        # scored against the means over the seeds of the default and the oracle.
        oracle = methods["oracle"]
        assert oracle["seeds"] == [0, 1] and oracle["per_seed"]["0"]["point"] == oracle["best_point"]
        assert len(list((out / "runs" / name / "oracle").glob("*/seed1"))) == 1, "the best point, again at seed 1"
        means = [sum(r["fitness"] for r in methods[m]["per_seed"].values()) / 2 for m in ("default", "oracle")]
        assert abs(methods["default"]["fitness"] - means[0]) < 1e-9 and abs(oracle["fitness"] - means[1]) < 1e-9
        for seed, result in methods["clan"]["per_seed"].items():
            expected = suite.gap_closed(means[0], result["fitness"], means[1], problem["greater_is_better"])
            assert result["gap_closed"] == expected, (name, seed)
        assert methods["default"]["gap_closed"] is None or abs(methods["default"]["gap_closed"]) < 1e-9
        if name == "cls_metric":  # the tiny grid holds the start (2e-3, constant): the default's run, not run again
            start = next(g for g in oracle["grid"] if g["point"] == {"learning_rate": 0.002})
            assert start["fitness"] == methods["default"]["per_seed"]["0"]["fitness"]
            assert not (out / "runs" / name / "oracle" / "learning_rate=0.002").exists()
        assert methods["oracle"]["grid_points"] == len(methods["oracle"]["grid"]) >= 2
        assert methods["oracle"]["samples"] == methods["oracle"]["grid_points"] * methods["default"]["samples"]
        lr = methods["clan"]["lr_schedule"]
        assert len(lr) == problem["steps"] and 0 < lr[-1] < max(lr), "the final cooldown is drawn"
        if name != "cls_metric":
            assert methods["pbt_ray"]["status"].startswith("not run"), methods["pbt_ray"]
        else:  # ray ranks trials on the problem's accuracy there
            pbt_ray = methods["pbt_ray"]
            assert pbt_ray["status"] == "ok", (
                pbt_ray["status"],
                pbt_ray.get("per_seed", {}).get("0", {}).get("log_tail"),
            )
            assert pbt_ray["seeds"] == [0] and 0.0 <= pbt_ray["fitness"] <= 1.0, pbt_ray
        variant = problem["variants"]["no_resample"]
        assert variant["overrides"] == {"resample_probability": 0.0}
        if variant["status"].startswith("not run"):  # the field is not in this version of ClanConfig
            assert "resample_probability" in variant["status"]
        else:
            assert variant["status"] == "ok" and variant["seeds"] == [0, 1], variant.get("status")
            assert isinstance(variant["fitness"], float)
        assert set(results["ablation"][name]) == {"clan", "no_resample"}
        assert (out / f"{name}.png").stat().st_size > 0
    assert "| problem | default | clan | pbt |" in stdout
    assert "gap_closed ≥ 0.9" in stdout and "median gap_closed" in stdout and "clan ≥ this method" in stdout
    assert "cls_metric (test accuracy, higher is better)" in stdout
    assert "## Ablations" in stdout and "| problem | clan | no_resample |" in stdout
    table = (out / "table.md").read_text()
    assert "| problem | default | clan | pbt |" in table and "| problem | clan | no_resample |" in table


def _result(fitness: list[float], gap: list[float | None], harm: list[float | None]) -> dict:
    """A method's entry in results.json as the suite writes it (seeded when given more than one value)."""
    suite = load_suite()
    per_seed = {
        str(seed): {"status": "ok", "fitness": f, "gap_closed": g, "harm": h, "wall_s": 1.0, "samples": 10}
        for seed, (f, g, h) in enumerate(zip(fitness, gap, harm, strict=True))
    }
    return per_seed["0"] if len(per_seed) == 1 else suite._aggregate(per_seed)


def test_a_failed_runs_log_tail_names_no_path_of_this_machine(tmp_path):
    """A failed run's log tail goes into results.json, which is committed: its traceback's paths are made relative to
    the checkout, or named by the interpreter directory they lie in."""
    load_suite()
    import site

    import bench_utils

    package = os.path.join(ROOT, "clantune_hf", "clan_trainer.py")
    library = os.path.join(site.getsitepackages()[0], "transformers", "trainer.py")
    stdlib = os.path.join(sys.base_prefix, "lib", "json", "decoder.py")
    (tmp_path / "run.rank0").write_text(
        "".join(f'  File "{path}", line 1, in f\n' for path in (package, library, stdlib)) + "ValueError: boom\n"
    )
    tail = bench_utils.log_tail(str(tmp_path / "run"))
    assert tail == (
        '  File "clantune_hf/clan_trainer.py", line 1, in f\n'
        '  File "<site-packages>/transformers/trainer.py", line 1, in f\n'
        '  File "<python>/lib/json/decoder.py", line 1, in f\n'
        "ValueError: boom\n"
    )


def test_tables_aggregate_seeds_and_count_per_method():
    """The table's arithmetic, on made-up results: mean ± sd over seeds, the per-method count rows, harm on the
    do-no-harm problem, and the ablation table's columns and last row."""
    suite = load_suite()

    def problem(do_no_harm: bool, default: float, clan: list[float], pbt: list[float], oracle: float) -> dict:
        ref = {"default": default, "oracle": oracle}

        def scored(values):
            gaps = [suite.gap_closed(default, v, oracle, False) for v in values]
            return _result(values, gaps, [suite.harm(default, v, False) for v in values])

        methods = {m: scored([v]) for m, v in ref.items()} | {"clan": scored(clan), "pbt": scored(pbt)}
        variant = {"overrides": {"x": 1}, **scored([clan[0] + 0.5, clan[1] + 0.5])}
        return {"metric": "test loss", "greater_is_better": False, "do_no_harm": do_no_harm, "methods": methods,
                "variants": {"v": variant}}  # fmt: skip

    results = {
        "settings": {"seed": 0, "seeds": [0, 1]},
        "problems": {
            "a": problem(False, 2.0, [0.9, 1.1], [1.5, 1.5], 1.0),  # clan gap 1.1 and 0.9: mean 1.0
            "b": problem(False, 3.0, [2.9, 2.9], [1.9, 2.1], 2.0),  # clan gap 0.1, pbt 1.0
            "c": problem(True, 2.0, [2.01, 2.01], [2.1, 2.1], 2.0),  # start = oracle: harm +0.5% and +5%
            "d": problem(False, 1.0, [1.2, 1.4], [1.1, 1.1], 1.5),  # the oracle is worse: no gap, not counted
        },
    }
    clan = results["problems"]["a"]["methods"]["clan"]
    assert abs(clan["fitness"] - 1.0) < 1e-9 and abs(clan["gap_closed"] - 1.0) < 1e-9 and clan["gap_closed_sd"] > 0
    table = suite.markdown_table(results)
    lines = table.splitlines()
    assert "| problem | default | clan | pbt | oracle |" in lines
    assert (
        "| a | 2.0000 (+0.00) | 1.0000 ± 0.1414 (+1.00 ± 0.14) | 1.5000 ± 0.0000 (+0.50 ± 0.00) | 1.0000 (+1.00) |"
        in lines
    )
    assert "harm +0.5 ± 0.0%" in table
    assert "| **gap_closed ≥ 0.9** (mean over seeds) | 0/2 | 1/2 | 1/2 | 2/2 |" in lines
    assert "| **median gap_closed** | +0.00 | +0.55 | +0.75 | +1.00 |" in lines
    assert "| **clan ≥ this method** (mean score) | 2/4 | – | 2/4 | 2/4 |" in lines
    assert "| **harm ≤ 1%** (do-no-harm problems) | 1/1 | 1/1 | 0/1 | 1/1 |" in lines
    ablation = suite.ablation_table(results).splitlines()
    assert "| problem | clan | v |" in ablation
    assert ablation[-1] == "| **gap_closed ≥ 0.9; median** | 1/2; median +0.55 | 0/2; median +0.05 |"
    assert "| d | score 1.3000 ± 0.1414 | score 1.8000 ± 0.1414 |" in ablation  # no gap: the score itself
    assert len([line for line in ablation if line.startswith("|")]) == 2 + 4 + 1  # header, rule, problems, counts


def test_seed_spread_merges_seed_files_and_scales_the_sd_of_a_mean(tmp_path):
    """seed_spread.py's arithmetic on made-up files: seeds from two files of one method (a variant in the second), the
    sd over all of them, and the sd of a 2-seed mean over the first file's oracle-to-default gap (or the default, as
    harm); a seed held twice keeps the first file's score, and a non-finite one is left out."""

    def runs(scores: dict[int, float]) -> dict:
        return {"per_seed": {str(seed): {"fitness": value} for seed, value in scores.items()}}

    first = {
        "problems": {
            "a": {"do_no_harm": False, "methods": {"default": {"fitness": 3.0}, "oracle": {"fitness": 2.0},
                                                   "clan": runs({0: 2.1, 1: 2.3})}},
            "b": {"do_no_harm": True, "methods": {"default": {"fitness": 2.0}, "oracle": {"fitness": 2.0},
                                                  "clan": runs({0: 2.0, 1: 2.04})}},
            "c": {"do_no_harm": False, "methods": {"default": {"fitness": 1.0}, "oracle": {"fitness": 1.5},
                                                   "clan": runs({0: 1.2, 1: 1.4})}},  # the oracle is worse: no gap
            "d": {"do_no_harm": True, "methods": {"default": {"fitness": 0.0}, "oracle": {"fitness": 0.0},
                                                  "clan": runs({0: 0.1, 1: 0.3})}},  # no harm relative to 0
        }
    }  # fmt: skip
    second = {
        "problems": {
            "a": {"variants": {"v": runs({1: 9.9, 2: 2.1, 3: 2.3, 4: math.nan})}},
            "b": {"variants": {"v": runs({2: 2.0, 3: 2.04})}},
        }
    }
    paths = []
    for name, results in (("first", first), ("second", second)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(results, f)
    table = run_script("seed_spread.py", paths[0], f"{paths[1]}:v", "--per-mean", "2").splitlines()
    sd = statistics.stdev([2.1, 2.3, 2.1, 2.3])  # seed 1 is the first file's 2.3, not 9.9; seed 4 is not finite
    assert f"| a | 2.1000 2.3000 2.1000 2.3000 (seeds 0-3) | {sd:.4f} | gap_closed {sd / 2**0.5 / 1.0:.3f} |" in table
    harm = 100 * statistics.stdev([2.0, 2.04, 2.0, 2.04]) / 2**0.5 / 2.0
    assert f"| b | 2.0000 2.0400 2.0000 2.0400 (seeds 0-3) | 0.0231 | harm {harm:.2f}% |" in table
    assert "| c | 1.2000 1.4000 (seeds 0-1) | 0.1414 | – |" in table
    assert "| d | 0.1000 0.3000 (seeds 0-1) | 0.1414 | – |" in table  # a default of 0: harm has no scale
    assert "--per-mean must be >= 1" in refusal("seed_spread.py", paths[0], "--per-mean", "0")

    # --compare: each column's mean over all its seeds, against the first file's default (3.0) and oracle (2.0).
    compare = ("--label", "d", "--compare", f"w={paths[1]}:v")
    compared = run_script("seed_spread.py", paths[0], f"{paths[1]}:v", *compare).splitlines()
    assert "| a | +0.800 (4 seeds) | -1.767 (3 seeds) |" in compared  # w: 9.9, 2.1 and 2.3
    assert "| b | harm 1.00% (4 seeds) | harm 1.00% (2 seeds) |" in compared
    assert "| c | score 1.3000 (2 seeds) | – |" in compared  # not counted below; w has no seed of c
    assert "| d | – (2 seeds) | – |" in compared
    assert "| **gap_closed ≥ 0.9; median** | 0/1; median +0.800 | 0/1; median -1.767 |" in compared
    # A column's problems come from every file it names, not only its first (which here lacks c).
    later = run_script("seed_spread.py", paths[0], "--compare", f"x={paths[1]}:v,{paths[0]}").splitlines()
    assert "| c | score 1.3000 (2 seeds) | score 1.3000 (2 seeds) |" in later
    assert "a label of its own" in refusal("seed_spread.py", paths[0], "--label", "d", "--compare", f"d={paths[1]}")


def test_best_of_keeps_comparable_runs_and_ranks_them_in_the_bars_unit(tmp_path):
    """best_of.py on made-up files: a configuration counts on a problem only with every asked seed, the problem as
    the reference defines it and the reference's clan size; each problem's best is the largest gap_closed (the least
    harm on the do-no-harm problem), and configurations are ranked by the problems they bring to 0.9."""

    def runs(scores: dict[int, float]) -> dict:
        return {"per_seed": {str(seed): {"fitness": value} for seed, value in scores.items()}}

    settings = {"num_processes": 4, "per_device_batch": 8, "steps": 300}
    problem = {"mis_set": "lr low", "start": {"learning_rate": 1e-3}, "genes": ["learning_rate"], "steps": 300}
    reference = {
        "settings": settings,
        "problems": {
            "a": problem | {"methods": {"default": {"fitness": 3.0}, "oracle": {"fitness": 2.0},
                                        "clan": runs({0: 2.2, 1: 2.4})}},
            "b": problem | {"mis_set": "lr high", "methods": {"default": {"fitness": 1.0}, "oracle": {"fitness": 0.0},
                                                              "clan": runs({0: 0.5, 1: 0.5})}},
            "h": problem | {"do_no_harm": True, "methods": {"default": {"fitness": 2.0}, "oracle": {"fitness": 2.0},
                                                            "clan": runs({0: 2.04, 1: 2.04})}},
        },
    }  # fmt: skip
    high, no_harm = problem | {"mis_set": "lr high"}, problem | {"do_no_harm": True}
    variants = {
        "settings": settings,
        "problems": {
            # v: 0.95 on a and 0.05 on b; w reaches 0.99 on a but has only seed 0 there.
            "a": problem | {"variants": {"v": runs({0: 2.0, 1: 2.1}), "w": runs({0: 2.01})}},
            "b": high | {"variants": {"v": runs({0: 0.9, 1: 1.0}), "w": runs({0: 0.0, 1: 0.1})}},
            "h": no_harm | {"variants": {"v": runs({0: 2.02, 1: 2.02}), "w": runs({0: 2.2, 1: 2.2})}},
        },
    }
    best_at_a = {"variants": {"p8": runs({0: 2.0, 1: 2.0})}}
    other_size = {"settings": settings | {"num_processes": 8}, "problems": {"a": problem | best_at_a}}
    other_problem = {"settings": settings, "problems": {"a": problem | {"start": {"learning_rate": 1.0}} | best_at_a}}
    paths = []
    for name, results in (("ref", reference), ("var", variants), ("p8", other_size), ("other", other_problem)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(results, f)
    table = run_script("best_of.py", *paths, "--seeds", "0,1").splitlines()
    ref, var = paths[0], paths[1]
    assert f"| a | +0.950 | `{var}:v` | 2 |" in table  # not w (one seed), nor p8 at 8 members or at another start
    assert f"| b | +0.950 | `{var}:w` | 3 |" in table
    assert f"| h | harm 1.00% | `{var}:v` | 3 |" in table
    assert "| **problems some configuration brings to gap_closed ≥ 0.9** | 2/2 | | |" in table
    assert "| configuration (of 2 that ran every problem) | gap_closed ≥ 0.9 |" in table  # w lacks a
    assert table[-2:] == [f"| `{var}:v` | 1/2 |", f"| `{ref}:clan` | 0/2 |"]


def test_every_problem_builds_and_trains_a_step(tmp_path):
    """Every problem, the held-out ones and those the tiny run above skips included: its data, model and (for
    fine-tuning) pretrained start build, and the model takes a finite loss on its data with every model setting of
    the oracle grid."""
    suite = load_suite()
    settings = suite.Settings(**suite.SUITES["tiny"], cache_dir=str(tmp_path))
    quick, full = (suite.Settings(**suite.SUITES[name]) for name in ("quick", "full"))
    assert len(suite.PROBLEMS) >= 10 and suite.HELD_OUT
    assert not set(suite.PROBLEMS) & set(suite.HELD_OUT)
    for name, problem in suite.ALL_PROBLEMS.items():
        assert problem.mis_set, name
        if problem.setup is not None:
            problem.setup(settings)
        train, val, test = problem.make_data(suite.problem_settings(problem, settings))
        assert min(len(train), len(val), len(test)) >= 16, name
        for point in suite.oracle_grid(problem, settings)[:1] + [{}]:
            _, model_kwargs = suite._training_fields(problem, point, settings)
            model = problem.make_model(settings, **model_kwargs)
            batch = {key: torch.stack([train[i][key] for i in range(4)]) for key in train[0]}
            outputs = model(**batch)
            outputs.loss.backward()
            assert torch.isfinite(outputs.loss), (name, point)
            if problem.compute_metrics is not None:
                prediction = EvalPrediction(
                    predictions=outputs.logits.detach().numpy(), label_ids=batch["labels"].numpy()
                )
                assert problem.metric_key in problem.compute_metrics(prediction), name
                assert 0.0 <= problem.scorer(model, val) <= 1.0, name
        assert suite.oracle_grid(problem, full), name
        assert len(suite.oracle_grid(problem, quick)) <= 6, name  # keeps --quick within its time budget
        if problem.do_no_harm:  # the start is one of the grid's points, in both grids
            for grid in (quick, full):
                assert any({**problem.start, **point} == problem.start for point in suite.oracle_grid(problem, grid))
    horizon = suite.problem_settings(suite.PROBLEMS["lm_long_horizon"], quick)
    assert horizon.steps // horizon.round_steps >= 40


def test_schedule_suite_runs_the_held_out_problems_apart(tmp_path):
    """`--problems held_out` runs every held-out problem and only those: the suite's own tables and counts never
    mix with them."""
    suite = load_suite()
    out = tmp_path / "held_out"
    run_script("schedule_suite.py", "--tiny", "--problems", "held_out", "--methods", "default", "--out", str(out))
    with open(out / "results.json") as f:
        results = json.load(f)
    assert list(results["problems"]) == list(suite.HELD_OUT)
    assert all(p["methods"]["default"]["status"] == "ok" for p in results["problems"].values())
    assert "ho_llama_lr_low" in (out / "table.md").read_text() and "lm_lr_low |" not in (out / "table.md").read_text()


def test_schedule_suite_starts_at_the_stored_oracle_point(tmp_path):
    """`--start-at-oracle RESULTS` runs each problem from the oracle's point RESULTS holds for it (over the problem's
    start), records that start, and refuses a problem defined otherwise there, the oracle method and --reference."""
    suite = load_suite()
    stored = {"problems": {"lm_lr_low": {**suite.definition(suite.PROBLEMS["lm_lr_low"]),
                                         "methods": {"oracle": {"best_point": {"learning_rate": 0.02}}}}}}  # fmt: skip
    path = tmp_path / "stored.json"
    path.write_text(json.dumps(stored))
    out = tmp_path / "at_oracle"
    run_script("schedule_suite.py", "--tiny", "--problems", "lm_lr_low", "--methods", "default", "--start-at-oracle",
               str(path), "--out", str(out))  # fmt: skip
    problem = json.loads((out / "results.json").read_text())["problems"]["lm_lr_low"]
    assert problem["start"]["learning_rate"] == 0.02 and "started at the oracle's" in problem["mis_set"]
    assert math.isclose(max(problem["methods"]["default"]["lr_schedule"]), 0.02, rel_tol=1e-6)

    refused = ("--tiny", "--problems", "lm_lr_low", "--start-at-oracle", str(path), "--out", str(out))
    assert "default, clan, pbt and variants only" in refusal("schedule_suite.py", *refused, "--methods", "oracle")
    stored["problems"]["lm_lr_low"]["mis_set"] = "another problem"
    path.write_text(json.dumps(stored))
    assert "no oracle point for lm_lr_low" in refusal("schedule_suite.py", *refused, "--methods", "clan")


def test_overhead_tiny(tmp_path):
    out = tmp_path / "overhead"
    stdout = run_script("overhead.py", "--tiny", "--repeats", "1", "--out", str(out))

    with open(out / "overhead.json") as f:
        full = json.load(f)
    result = full["by_ranks"]["2"]
    assert all(full[key] == result[key] for key in ("overhead_ratio", "competitive_ratio", "memory_ratio"))
    assert set(result["runs"]) == {"trainer", "trainer_eval", "clan_duty0", "clan_default"}
    assert result["overhead_ratio"] > 0 and result["overhead_ratio_default_duty"] > 0
    assert result["competitive_ratio"] > 0
    assert all(run["peak_rss_mb"] > 0 for run in result["runs"].values())
    assert result["memory_ratio"] > 0
    split = result["round_split"]
    assert set(split["fractions"]) == {"cooperative", "competitive", "fitness", "selection_exchange"}
    assert abs(sum(split["fractions"].values()) - 1) < 1e-6
    exchange = result["exchange"]
    assert exchange["exchanges"] >= 2  # one selection in each clan run
    # A clone receives exactly its source's trainable weights, buffers and Adam state: nothing more.
    assert exchange["bytes_per_exchange"] == exchange["clone_bytes_expected"], exchange
    assert set(result["targets"]) == {
        "cooperative_step_within_2pct_of_ddp",
        "competitive_step_below_cooperative",
        "peak_memory_within_5pct_of_ddp",
        "selection_exchange_under_2pct_of_round",
    }
    assert "overhead_ratio" in stdout and "memory_ratio" in stdout

    sharded = full["sharded"]
    assert set(sharded["runs"]) == {"fsdp2", "hsdp", "clan_sharded_duty0", "clan_sharded_default"}
    assert sharded["overhead_ratio_vs_hsdp"] > 0
    assert sharded["overhead_ratio"] > 0 and sharded["competitive_ratio"] > 0
    # A clone of a member sharded over 2 ranks moves one member's state over its 2 rank pairs: nothing more.
    assert sharded["exchange"]["exchanges"] >= 2
    assert sharded["exchange"]["bytes_per_exchange"] == sharded["exchange"]["clone_bytes_expected"]
    assert "against plain FSDP2" in stdout


def test_ray_pbt_tiny(tmp_path):
    """Ray Tune's PBT baseline (`pbt_ray`) runs end to end at the tiny budget and is scored like every other method:
    its best trial's final model on the test split. The test extra installs ray, so this never skips."""
    suite = load_suite()
    settings = suite.Settings(**suite.SUITES["tiny"], cache_dir=str(tmp_path / "cache"))
    # cls_overfit mutates all three kinds of gene: a log-scale one (learning_rate), a linear one with a custom bound
    # (weight_decay) and the model's dropout.
    result = suite._run("cls_overfit", "pbt_ray", {}, settings, str(tmp_path / "pbt_ray"))

    assert result["status"] == "ok", (result.get("status"), result.get("log_tail"))
    assert isinstance(result["fitness"], float) and math.isfinite(result["fitness"]), result["fitness"]
    assert math.isfinite(result["val_fitness"]) and result["eval_samples"] > 0
    # Synchronous PBT trains exactly the clan's budget: P trials x steps x per-device batch.
    assert result["samples"] == settings.steps * settings.global_batch, result["samples"]
    assert result["curve"] and result["curve"][-1][0] == settings.steps, result["curve"]
    assert len(result["lr_schedule"]) == settings.steps
    assert set(result["hyperparameters"]) == {"learning_rate", "weight_decay", "dropout"}


def test_fixed_members_tiny(tmp_path):
    """The fixed-rate clan keeps every member at the rate it was given and records every round without selecting."""
    out = tmp_path / "fixed"
    stdout = run_script(
        "fixed_members.py", "--tiny", "--problem", "lm_lr_low", "--learning-rates", "0.03,0.001", "--out", str(out)
    )
    with open(out / "clan_history.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert {r["round"] for r in records} == {0, 1}  # 8 steps in rounds of 4: one selection point, then the final
    assert all(r["parent"] is None for r in records), "nothing is cloned"
    for record in records:
        assert record["genes"]["learning_rate"] == [0.03, 0.001][record["member"]]
    assert "member 0 (0.03)" in stdout and "final model" in stdout


def test_fixed_members_resync_restarts_every_round_from_member_0(tmp_path):
    """With --resync a member's first round is its own, and every later one starts from member 0's weights."""
    fitness = {}
    for flag in ([], ["--resync"]):
        out = tmp_path / ("resync" if flag else "plain")
        run_script("fixed_members.py", "--tiny", "--problem", "lm_lr_low", "--learning-rates", "0.03,0.001",
                   "--out", str(out), *flag)  # fmt: skip
        with open(out / "clan_history.jsonl") as f:
            fitness[bool(flag)] = {(r["round"], r["member"]): r["fitness"] for r in map(json.loads, f)}
    assert fitness[True][0, 1] == fitness[False][0, 1], "the first round trains from the same start either way"
    assert fitness[True][1, 1] != fitness[False][1, 1], "member 1's last round started from member 0's weights"


def test_identical_members_without_window_or_cooldown_train_as_the_plain_trainer(tmp_path):
    """Members that share every gradient, at one rate, with no competitive window and no cooldown are one DDP run: the
    clan's final model scores as the plain `Trainer`'s at the same start, seed and global batch."""
    fixed = tmp_path / "fixed"
    run_script("fixed_members.py", "--tiny", "--problem", "well_tuned", "--learning-rates", "0.03,0.03",
               "--duty-cycle", "0", "--cooldown-fraction", "0", "--out", str(fixed))  # fmt: skip
    run_script("schedule_suite.py", "--tiny", "--problems", "well_tuned", "--methods", "default", "--seeds", "0",
               "--out", str(tmp_path / "suite"))  # fmt: skip
    with open(fixed / "result.json") as f:
        clan = json.load(f)["fitness"]
    with open(tmp_path / "suite" / "results.json") as f:
        plain = json.load(f)["problems"]["well_tuned"]["methods"]["default"]["per_seed"]["0"]["fitness"]
    assert math.isclose(clan, plain, rel_tol=1e-5), (clan, plain)


def test_schedule_suite_reference_and_inapplicable_variants(tmp_path):
    """--reference takes the methods --methods (and the variants --variants) leaves out from an earlier run, and
    scores variants against them; a variant that only changes genes a problem does not schedule is not run there; a
    reference from another budget is refused."""
    ref, out = tmp_path / "ref", tmp_path / "variants"
    problems = "lm_lr_low,lm_lr_high"
    run_script("schedule_suite.py", "--tiny", "--problems", problems, "--methods", "default,oracle", "--out", str(ref))
    run_script("schedule_suite.py", "--tiny", "--problems", problems, "--methods", "none", "--variants",
               "linear_weight_decay", "--reference", str(ref / "results.json"), "--out", str(out))  # fmt: skip
    with open(ref / "results.json") as f:
        reference = json.load(f)
    with open(out / "results.json") as f:
        results = json.load(f)
    for name in problems.split(","):
        methods = results["problems"][name]["methods"]
        assert list(methods) == ["default", "oracle"], methods.keys()
        for method in methods:
            assert methods[method]["fitness"] == reference["problems"][name]["methods"][method]["fitness"]
        assert not (out / "runs" / name / "default").exists(), "taken from the reference, not run again"
    applied = results["problems"]["lm_lr_low"]["variants"]["linear_weight_decay"]
    assert applied["status"] == "ok" and applied["seeds"] == [0] and "gap_closed" in applied["per_seed"]["0"]
    skipped = results["problems"]["lm_lr_high"]["variants"]["linear_weight_decay"]
    assert skipped["status"].startswith("not run") and "weight_decay" in skipped["status"]
    assert not (out / "runs" / "lm_lr_high" / "variant_linear_weight_decay").exists()

    # Variants the new run leaves out come from the reference; `none` changes more than a gene's options, so it runs
    # on a problem without weight decay too.
    again = tmp_path / "again"
    run_script("schedule_suite.py", "--tiny", "--problems", problems, "--methods", "none", "--variants", "none",
               "--reference", str(out / "results.json"), "--out", str(again))  # fmt: skip
    with open(again / "results.json") as f:
        merged = json.load(f)
    assert list(merged["variants"]) == ["linear_weight_decay", "none"]
    for name in problems.split(","):
        variants = merged["problems"][name]["variants"]
        assert variants["linear_weight_decay"] == results["problems"][name]["variants"]["linear_weight_decay"]
        assert variants["none"]["status"] == "ok", variants["none"]
    with open(again / "table.md") as f:
        assert "| clan | linear_weight_decay | none |" in f.read()

    # One problem run again (as after it changed), the rest kept as the reference holds them, in the suite's order.
    one = tmp_path / "one"
    run_script("schedule_suite.py", "--tiny", "--problems", "lm_lr_high", "--methods", "default,oracle",
               "--reference", str(again / "results.json"), "--out", str(one))  # fmt: skip
    with open(one / "results.json") as f:
        rerun = json.load(f)
    assert list(rerun["problems"]) == problems.split(",")
    assert rerun["problems"]["lm_lr_low"] == merged["problems"]["lm_lr_low"]
    assert (one / "runs" / "lm_lr_high" / "default").exists() and not (one / "runs" / "lm_lr_low").exists()
    assert rerun["settings"]["ray_problems"] == merged["settings"]["ray_problems"]
    assert (one / "lm_lr_low.png").exists()
    with open(one / "table.md") as f:
        assert "| lm_lr_low |" in f.read()

    bad = tmp_path / "bad"
    stderr = refusal("schedule_suite.py", "--quick", "--problems", "lm_lr_low", "--methods", "none",
                     "--reference", str(ref / "results.json"), "--out", str(bad))  # fmt: skip
    assert "--reference was run with other settings" in stderr
    # The default and oracle ran at seed 0 only: a run at other seeds cannot be scored against them.
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", "lm_lr_low", "--seeds", "0,1", "--methods", "none",
                     "--reference", str(ref / "results.json"), "--out", str(bad))  # fmt: skip
    assert "add default,oracle to --methods" in stderr, stderr
    # What ran on a problem before its definition changed is not scored against the new one.
    with open(ref / "results.json") as f:
        changed = json.load(f)
    changed["problems"]["lm_lr_low"]["mis_set"] = "an earlier problem of that name"
    with open(tmp_path / "changed.json", "w") as f:
        json.dump(changed, f)
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", "lm_lr_low", "--methods", "none",
                     "--reference", str(tmp_path / "changed.json"), "--out", str(bad))  # fmt: skip
    assert "add default, oracle to --methods" in stderr, stderr
    # A problem kept from a reference at other seeds would be reported under this run's seeds.
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", "lm_lr_high", "--seeds", "1", "--methods",
                     "default,oracle", "--reference", str(ref / "results.json"), "--out", str(bad))  # fmt: skip
    assert "keeps lm_lr_low as it ran" in stderr, stderr

    # A reference at another duty cycle: only the clan and its variants depend on it, so it serves a run of the clan
    # (its variants left out) and nothing else; its pbt (a stand-in here) runs at duty cycle 1.0 and still holds.
    for name in problems.split(","):
        merged["problems"][name]["methods"]["pbt"] = merged["problems"][name]["methods"]["default"]
    other_duty = dict(merged, settings={**merged["settings"], "duty_cycle": merged["settings"]["duty_cycle"] + 0.1})
    with open(tmp_path / "other_duty.json", "w") as f:
        json.dump(other_duty, f)
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", problems, "--methods", "none",
                     "--reference", str(tmp_path / "other_duty.json"), "--out", str(bad))  # fmt: skip
    assert "other settings (duty_cycle)" in stderr, stderr
    # ... nor a run of the clan on one problem, which would keep the other's clan from the other duty cycle.
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", "lm_lr_low", "--methods", "clan",
                     "--reference", str(tmp_path / "other_duty.json"), "--out", str(bad))  # fmt: skip
    assert "other settings (duty_cycle)" in stderr and "every problem it holds" in stderr, stderr
    # A reference at another split of the same global batch into ranks: its one-process methods (default, oracle)
    # still hold, its multi-rank ones (pbt) go with its variants. One at another global batch holds nothing.
    tiny = merged["settings"]
    split = {"num_processes": 2 * tiny["num_processes"], "per_device_batch": tiny["per_device_batch"] // 2}
    with open(tmp_path / "other_split.json", "w") as f:
        json.dump(dict(merged, settings={**tiny, **split}), f)
    with open(tmp_path / "other_batch.json", "w") as f:
        json.dump(dict(merged, settings={**tiny, "num_processes": 2 * tiny["num_processes"]}), f)
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", problems, "--methods", "clan",
                     "--reference", str(tmp_path / "other_batch.json"), "--out", str(bad))  # fmt: skip
    assert "other settings (num_processes)" in stderr and "every problem" not in stderr, stderr
    stderr = refusal("schedule_suite.py", "--tiny", "--problems", problems, "--per-device-batch", "0",
                     "--out", str(bad))  # fmt: skip
    assert "--per-device-batch must be at least 1" in stderr, stderr
    for other in ("other_duty", "other_split"):
        rerun_clan = tmp_path / f"rerun_clan_{other}"
        run_script("schedule_suite.py", "--tiny", "--problems", problems, "--methods", "clan",
                   "--reference", str(tmp_path / f"{other}.json"), "--out", str(rerun_clan))  # fmt: skip
        with open(rerun_clan / "results.json") as f:
            clan_again = json.load(f)
        assert clan_again["variants"] == {}
        assert clan_again["settings"]["num_processes"] == tiny["num_processes"]
        for name in problems.split(","):
            held = ["default", "clan", "pbt", "oracle"] if other == "other_duty" else ["default", "clan", "oracle"]
            assert list(clan_again["problems"][name]["methods"]) == held, other
            assert clan_again["problems"][name]["variants"] == {}
            assert clan_again["problems"][name]["methods"]["clan"]["status"] == "ok"


def test_ranking_horizon_tiny(tmp_path):
    """Every fitness of a branch is measured at the weights it names: an EMA with a horizon of one step and the mean
    of the round's last step are the branch's last weights, so they score exactly what `raw` scores."""
    out = tmp_path / "horizon"
    stdout = run_script(
        "ranking_horizon.py", "--tiny", "--problem", "warmup_decay", "--rates", "0.03,0.001", "--seeds", "0",
        "--average", "1,2", "--ema", "1,4", "--anneal", "2", "--out", str(out),
    )  # fmt: skip
    with open(out / "result.json") as f:
        result = json.load(f)
    (entry,) = result["results"]
    for scores in entry["scores"].values():
        assert scores["ema1"] == scores["raw"] and scores["avg1"] == scores["raw"]
        assert (
            scores["ema4"] != scores["raw"] and scores["anneal2"] != scores["raw"] and scores["truth"] != scores["raw"]
        )
    assert "| picks |" in stdout and "mean regret" in stdout
