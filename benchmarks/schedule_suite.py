"""Does a clan find near-optimal schedules at DDP cost? Five offline problems, each started from a deliberately
mis-set but trainable configuration, trained side by side by every method at the same optimizer steps and the same
data per step as a P-way DDP run:

    default        plain `Trainer`, the starting configuration, per-device batch x P on one process
    clan           `ClanTrainer`, P members (P real gloo ranks)
    pbt            `ClanTrainer` with duty_cycle=1.0: P members that never share gradients (P real gloo ranks)
    pbt_ray        Ray Tune's PopulationBasedTraining through `Trainer.hyperparameter_search(backend="ray")`, only
                   when ray is installed (`pip install -e ".[bench-ray]"`); otherwise reported as not run
    schedule_free  `Trainer` with optim="schedule_free_adamw" at the starting learning rate
    oracle         the best point (by validation loss) of a grid over learning rate x schedule shape (x the
                   problem's other key gene), every point at the same budget; its summed compute is reported

Every method is scored the same way: its final model's loss on a held-out test split that neither selection nor the
oracle's choice ever saw (the clan ranks members, and the oracle picks its grid point, on the validation split).
`gap_closed = (default - method) / (default - oracle)`: 1 matches the tuned oracle, 0 is no better than the start.
The proposal's bar is gap_closed >= 0.9 on 90% of problems.

    pip install -e ".[bench]"
    python benchmarks/schedule_suite.py --quick --out bench_out/quick     # <= 15 min on 2 CPU cores
    python benchmarks/schedule_suite.py --out bench_out/full              # <= 90 min on 2 CPU cores

Writes DIR/results.json, DIR/<problem>.png (eval curves of every method, the clan's discovered learning-rate
schedule beside the oracle's) and prints a markdown table. Each run's own files (clan_history.jsonl,
clan_schedule.json, one log per rank) stay under DIR/runs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import (  # noqa: E402
    BagOfTokens,
    MarkovText,
    causal_lm_loss,
    cpu_cores,
    launch,
    log_tail,
    lr_shape,
    markov_table,
    mean_loss,
    mixed_table,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    write_json,
)

METHODS = ["default", "clan", "pbt", "pbt_ray", "schedule_free", "oracle"]
OPTIONAL = {"pbt_ray": ("ray", "bench-ray"), "schedule_free": ("schedulefree", "bench")}  # method: (package, extra)
GAP_BAR = 0.9


@dataclass
class Settings:
    """The budget every method gets on every problem."""

    steps: int
    round_steps: int
    num_processes: int = 4
    per_device_batch: int = 8
    duty_cycle: float = 0.15
    seed: int = 0
    data_scale: float = 1.0  # multiplies dataset sizes (the tiny test mode shrinks them)
    grid: str = "full"  # which oracle grid: "full", "quick" or "tiny"
    cache_dir: str = ""

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.num_processes

    def size(self, n: int) -> int:
        return max(16, int(n * self.data_scale))


SUITES = {
    "full": dict(steps=900, round_steps=50, grid="full"),
    "quick": dict(steps=300, round_steps=25, grid="quick"),
    "tiny": dict(steps=8, round_steps=4, num_processes=2, per_device_batch=4, data_scale=0.02, grid="tiny"),
}


@dataclass
class Problem:
    """A training problem with a mis-set start. `start` holds `TrainingArguments` fields (`warmup` is a fraction of
    the run); `dropout` in `start` or in an oracle axis goes to the model instead."""

    name: str
    mis_set: str
    make_model: Callable[..., torch.nn.Module]
    make_data: Callable[[Settings], tuple]
    start: dict
    genes: list | dict
    oracle: dict[str, list]  # full grid: axis -> values
    oracle_quick: dict[str, list]
    setup: Callable[[Settings], None] | None = None
    metric: str = "test loss"
    greater_is_better: bool = False


def _lm_data(settings: Settings, table_seed: int = 0):
    table = markov_table(table_seed)
    train = MarkovText(table, settings.size(settings.steps * settings.global_batch), seed=1)
    return train, MarkovText(table, settings.size(512), seed=2), MarkovText(table, settings.size(1024), seed=3)


def _finetune_data(settings: Settings):
    table = mixed_table(markov_table(0), seed=7, fraction=0.5)
    train = MarkovText(table, settings.size(512), seed=11)
    return train, MarkovText(table, settings.size(512), seed=12), MarkovText(table, settings.size(1024), seed=13)


def _pretrain_finetune_base(settings: Settings) -> None:
    """The checkpoint the fine-tuning problem starts from: a tiny GPT-2 trained on the original language."""
    model = tiny_gpt2()
    data = MarkovText(markov_table(0), settings.size(200 * 32), seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = 200 if settings.data_scale >= 1 else 4
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data.input_ids[torch.randint(0, len(data), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(os.path.join(settings.cache_dir, "finetune_base"))


def _finetune_model(settings: Settings):
    from transformers import GPT2LMHeadModel

    return causal_lm_loss(GPT2LMHeadModel.from_pretrained(os.path.join(settings.cache_dir, "finetune_base")))


def _classify_data(settings: Settings):
    # 256 noisy examples and hundreds of steps: a model with no regularization memorizes the noise.
    return (
        BagOfTokens(settings.size(256), seed=21, kind="classify", noise=0.2),
        BagOfTokens(settings.size(512), seed=22, kind="classify", noise=0.2),
        BagOfTokens(settings.size(1024), seed=23, kind="classify", noise=0.2),
    )


def _regress_data(settings: Settings):
    # Rare, huge target outliers in training only: their gradients swamp Adam's moments unless clipped.
    train = BagOfTokens(
        settings.size(settings.steps * settings.global_batch), seed=31, kind="regress", outlier_rate=0.02,
        outlier_scale=100.0,
    )  # fmt: skip
    val, test = BagOfTokens(settings.size(512), 32, "regress"), BagOfTokens(settings.size(1024), 33, "regress")
    return train, val, test


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            name="lm_lr_low",
            mis_set="causal LM (tiny GPT-2, Markov text), learning rate 10x too low",
            make_model=lambda s, dropout=0.0: tiny_gpt2(dropout=dropout),
            make_data=_lm_data,
            start=dict(learning_rate=1e-3, lr_scheduler_type="linear", warmup=0.05),
            genes=["learning_rate", "weight_decay"],
            oracle={
                "learning_rate": [1e-3, 3e-3, 1e-2, 3e-2, 6e-2],
                "lr_scheduler_type": ["linear", "cosine", "constant"],
            },
            oracle_quick={"learning_rate": [1e-3, 3e-3, 1e-2, 3e-2], "lr_scheduler_type": ["linear", "constant"]},
        ),
        Problem(
            name="lm_lr_high",
            mis_set="causal LM (tiny Llama, Markov text), constant learning rate far too high for its budget",
            make_model=lambda s: tiny_llama(),
            make_data=lambda s: _lm_data(s, table_seed=3),
            start=dict(learning_rate=0.1, lr_scheduler_type="constant", warmup=0.0),
            genes=["learning_rate"],
            oracle={
                "learning_rate": [1e-3, 3e-3, 1e-2, 3e-2, 0.1],
                "lr_scheduler_type": ["constant", "linear", "cosine"],
            },
            oracle_quick={"learning_rate": [3e-3, 1e-2, 3e-2, 0.1], "lr_scheduler_type": ["constant", "linear"]},
        ),
        Problem(
            name="cls_overfit",
            mis_set="small noisy classification set (tiny BERT), no dropout and no weight decay: it overfits",
            make_model=lambda s, dropout=0.0: tiny_bert(num_labels=2, dropout=dropout),
            make_data=_classify_data,
            start=dict(learning_rate=1e-3, lr_scheduler_type="linear", warmup=0.05, weight_decay=0.0, dropout=0.0),
            genes={"learning_rate": {}, "weight_decay": {"high": 1.0}, "dropout": {}},
            oracle={
                "learning_rate": [1e-4, 3e-4, 1e-3],
                "lr_scheduler_type": ["linear", "constant"],
                "dropout": [0.0, 0.1, 0.3],
            },
            oracle_quick={"learning_rate": [1e-4, 3e-4, 1e-3], "lr_scheduler_type": ["linear"], "dropout": [0.0, 0.3]},
        ),
        Problem(
            name="finetune_shape",
            mis_set="fine-tuning a pretrained tiny GPT-2 on 512 sequences of a shifted language: constant lr",
            make_model=lambda s: _finetune_model(s),
            make_data=_finetune_data,
            start=dict(learning_rate=1e-2, lr_scheduler_type="constant", warmup=0.0),
            genes=["learning_rate"],
            oracle={
                "learning_rate": [1e-3, 3e-3, 1e-2],
                "lr_scheduler_type": ["constant_with_warmup", "linear", "cosine"],
                "warmup": [0.0, 0.1],
            },
            oracle_quick={"learning_rate": [1e-3, 3e-3, 1e-2], "lr_scheduler_type": ["constant", "cosine"]},
            setup=_pretrain_finetune_base,
        ),
        Problem(
            name="regress_clip",
            mis_set="regression (tiny BERT) with rare huge outliers in training, clipping loose (max_grad_norm=10)",
            make_model=lambda s: tiny_bert(num_labels=1),
            make_data=_regress_data,
            start=dict(learning_rate=1e-3, lr_scheduler_type="linear", warmup=0.05, max_grad_norm=10.0),
            genes={"learning_rate": {}, "max_grad_norm": {"low": 0.01, "high": 100.0}, "adam_beta2": {}},
            oracle={
                "learning_rate": [3e-4, 1e-3, 3e-3],
                "lr_scheduler_type": ["linear"],
                "max_grad_norm": [10.0, 1.0, 0.1],
                "adam_beta2": [0.999, 0.95],
            },
            oracle_quick={
                "learning_rate": [1e-3, 3e-3],
                "lr_scheduler_type": ["linear"],
                "max_grad_norm": [10.0, 1.0, 0.1],
            },
        ),
    ]
}
MODEL_KEYS = ("dropout",)


def oracle_grid(problem: Problem, settings: Settings) -> list[dict]:
    axes = problem.oracle if settings.grid == "full" else problem.oracle_quick
    if settings.grid == "tiny":
        axes = {"learning_rate": axes["learning_rate"][-2:]}
    names = sorted(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(axes[n] for n in names))]


# ---- One run (executes on every rank of a launch) ----


def _training_fields(problem: Problem, overrides: dict, settings: Settings) -> tuple[dict, dict]:
    """The run's `TrainingArguments` fields and model keyword arguments."""
    fields = {**problem.start, **overrides}
    model_kwargs = {key: fields.pop(key) for key in MODEL_KEYS if key in fields}
    fields["warmup_steps"] = round(fields.pop("warmup", 0.0) * settings.steps)
    return fields, model_kwargs


def run_job(problem_name: str, method: str, overrides: dict, settings: Settings, job_dir: str) -> None:
    from transformers import Trainer, TrainingArguments

    from clantune_hf import ClanConfig, ClanTrainer

    problem = PROBLEMS[problem_name]
    train, val, test = problem.make_data(settings)
    fields, model_kwargs = _training_fields(problem, overrides, settings)
    model = problem.make_model(settings, **model_kwargs)
    common = dict(
        output_dir=job_dir, max_steps=settings.steps, seed=settings.seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_eval_batch_size=64, use_cpu=True,
    )  # fmt: skip
    if method in ("clan", "pbt"):
        args = ClanConfig(
            **common, **fields, per_device_train_batch_size=settings.per_device_batch,
            round_steps=settings.round_steps, duty_cycle=1.0 if method == "pbt" else settings.duty_cycle,
            genes=json.dumps(problem.genes) if isinstance(problem.genes, dict) else problem.genes,
        )  # fmt: skip
        trainer = ClanTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    else:
        if method == "schedule_free":
            fields.update(optim="schedule_free_adamw", lr_scheduler_type="constant")
        args = TrainingArguments(
            **common, **fields, per_device_train_batch_size=settings.global_batch, eval_strategy="steps",
            eval_steps=settings.round_steps,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)

    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    if not trainer.accelerator.is_main_process:
        return
    trainer.optimizer.eval()  # schedule-free evaluates its averaged weights; a no-op for other optimizers
    result = {
        "fitness": mean_loss(trainer.model, test),
        "val_fitness": mean_loss(trainer.model, val),
        "train_s": train_s,
        "samples": settings.steps * settings.global_batch,
    }
    shape = lr_shape(fields["lr_scheduler_type"], fields["warmup_steps"], settings.steps)
    if method in ("clan", "pbt"):
        rounds: dict[int, list] = {}
        for record in trainer.clan_history:
            rounds.setdefault(record["global_step"], []).append(record["fitness"])
        best = max if problem.greater_is_better else min
        result["curve"] = [
            [step, best((f for f in fs if f is not None), default=math.nan)] for step, fs in sorted(rounds.items())
        ]
        result["eval_samples"] = len(rounds) * settings.num_processes * len(val)
        lr = []
        for segment in trainer.clan_schedule["segments"]:
            gene = segment["genes"].get("learning_rate", fields["learning_rate"])
            lr.extend(gene * shape[s] for s in range(segment["start_step"], segment["end_step"]))
        result["lr_schedule"] = lr
        result["lineage"] = trainer.clan_schedule["segments"]
        result["final_genes"] = trainer.clan_schedule["segments"][-1]["genes"]
    else:
        evals = [[e["step"], e["eval_loss"]] for e in trainer.state.log_history if "eval_loss" in e]
        result["eval_samples"] = len(evals) * len(val)
        result["curve"] = [e for e in evals if e[0] != settings.steps] + [[settings.steps, result["val_fitness"]]]
        if method == "schedule_free":
            shape = [1.0] * settings.steps
        result["lr_schedule"] = [fields["learning_rate"] * m for m in shape]
    write_json(os.path.join(job_dir, "result.json"), result)


def run_ray_pbt(problem_name: str, settings: Settings, job_dir: str) -> None:
    """Ray Tune PBT as the external reference: P trials with their own data, exploiting every round.

    Runs only when ray is installed; ray starts its own worker processes, so this is one launch, not P ranks.
    """
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from transformers import Trainer, TrainingArguments

    problem = PROBLEMS[problem_name]
    train, val, _ = problem.make_data(settings)
    fields, model_kwargs = _training_fields(problem, {}, settings)
    args = TrainingArguments(
        output_dir=job_dir, max_steps=settings.steps, seed=settings.seed, report_to="none", disable_tqdm=True,
        per_device_train_batch_size=settings.per_device_batch, eval_strategy="steps", eval_steps=settings.round_steps,
        save_strategy="steps", save_steps=settings.round_steps, use_cpu=True, **fields,
    )  # fmt: skip
    trainer = Trainer(
        model_init=lambda trial=None: problem.make_model(settings, **model_kwargs),
        args=args,
        train_dataset=train,
        eval_dataset=val,
    )
    lr = fields["learning_rate"]
    space = {"learning_rate": tune.loguniform(lr / 100, lr * 100)}
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1, hyperparam_mutations=space
    )
    start = time.perf_counter()
    best = trainer.hyperparameter_search(
        hp_space=lambda _: space, backend="ray", n_trials=settings.num_processes, direction="minimize",
        scheduler=scheduler, resources_per_trial={"cpu": 1}, storage_path=os.path.join(job_dir, "ray"),
    )  # fmt: skip
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(job_dir) for f in fs)
    write_json(
        os.path.join(job_dir, "result.json"),
        {
            # Ray reports the best trial's validation loss; its checkpoint is not re-scored on the test split.
            "fitness": None,
            "val_fitness": best.objective,
            "train_s": time.perf_counter() - start,
            "samples": settings.steps * settings.global_batch,
            "disk_bytes": disk,
            "hyperparameters": best.hyperparameters,
        },
    )


# ---- The suite ----


def _run(problem: str, method: str, overrides: dict, settings: Settings, job_dir: str) -> dict:
    """Launch one run on its ranks and return its result, or a status saying why there is none."""
    os.makedirs(job_dir, exist_ok=True)
    ranks = settings.num_processes if method in ("clan", "pbt") else 1
    log = os.path.join(job_dir, "log")
    target = run_ray_pbt if method == "pbt_ray" else run_job
    job_args = (problem, settings, job_dir) if method == "pbt_ray" else (problem, method, overrides, settings, job_dir)
    start = time.perf_counter()
    try:
        launch(target, ranks, *job_args, log_path=log)
    except RuntimeError as error:
        return {"status": f"failed: {error}", "log_tail": log_tail(log)}
    with open(os.path.join(job_dir, "result.json")) as f:
        result = json.load(f)
    result.update(wall_s=time.perf_counter() - start, ranks=ranks, status="ok")
    return result


def gap_closed(default: float | None, method: float | None, oracle: float | None, greater_is_better: bool):
    if None in (default, method, oracle) or not all(map(math.isfinite, (default, method, oracle))):
        return None
    sign = -1.0 if greater_is_better else 1.0
    gap = sign * (default - oracle)
    if gap <= 1e-6:
        return None  # the oracle is no better than the start: nothing to close
    return sign * (default - method) / gap


def run_problem(problem: Problem, settings: Settings, methods: list[str], out: str, bar: tqdm) -> dict:
    runs = os.path.join(out, "runs", problem.name)
    if problem.setup is not None:
        launch(problem.setup, 1, settings, log_path=os.path.join(out, "runs", f"{problem.name}_setup"))
    results: dict[str, dict] = {}
    for method in methods:
        if method == "oracle":
            grid = []
            for point in oracle_grid(problem, settings):
                bar.set_postfix_str(f"{problem.name}: oracle {point}")
                name = "_".join(f"{k}={v}" for k, v in point.items())
                grid.append({"point": point, **_run(problem.name, "oracle", point, settings, f"{runs}/oracle/{name}")})
                bar.update(1)
            results["oracle"] = _oracle_summary(grid, problem.greater_is_better)
            continue
        bar.set_postfix_str(f"{problem.name}: {method}")
        package, extra = OPTIONAL.get(method, ("", ""))
        if package and importlib.util.find_spec(package) is None:
            results[method] = {"status": f'not run: {package} is not installed (pip install -e ".[{extra}]")'}
        else:
            results[method] = _run(problem.name, method, {}, settings, f"{runs}/{method}")
        bar.update(1)

    default = results.get("default", {}).get("fitness")
    oracle = results.get("oracle", {}).get("fitness")
    for result in results.values():
        result.setdefault("fitness", None)
        result.setdefault("samples", None)
        result.setdefault("wall_s", None)
        result["gap_closed"] = gap_closed(default, result["fitness"], oracle, problem.greater_is_better)
    return {
        "mis_set": problem.mis_set,
        "metric": problem.metric,
        "greater_is_better": problem.greater_is_better,
        "start": problem.start,
        "genes": problem.genes,
        "methods": results,
    }


def _oracle_summary(grid: list[dict], greater_is_better: bool) -> dict:
    done = [g for g in grid if g.get("status") == "ok"]
    if not done:
        return {"status": "failed: no grid point finished", "grid": grid}
    sign = -1.0 if greater_is_better else 1.0
    best = min(done, key=lambda g: sign * g["val_fitness"])
    summary = {key: best[key] for key in ("fitness", "val_fitness", "curve", "lr_schedule")}
    summary.update(
        status="ok",
        best_point=best["point"],
        wall_s=sum(g["wall_s"] for g in done),
        samples=sum(g["samples"] for g in done),
        eval_samples=sum(g["eval_samples"] for g in done),
        grid_points=len(grid),
        grid=[{k: g.get(k) for k in ("point", "fitness", "val_fitness", "wall_s", "status", "curve")} for g in grid],
    )
    return summary


# ---- Report ----

SHOWN = ["default", "clan", "pbt", "schedule_free", "oracle"]


def _cell(result: dict) -> str:
    if result.get("fitness") is None:
        return result.get("status", "n/a").split(":")[0]
    gap = result.get("gap_closed")
    return f"{result['fitness']:.4f} ({'–' if gap is None else f'{gap:+.2f}'})"


def markdown_table(results: dict) -> str:
    problems = results["problems"]
    methods = [m for m in SHOWN if any(m in p["methods"] for p in problems.values())]
    lines = [
        "| problem | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for name, problem in problems.items():
        lines.append(f"| {name} | " + " | ".join(_cell(problem["methods"].get(m, {})) for m in methods) + " |")
    lines.append(
        f"| **gap_closed ≥ {GAP_BAR}** | "
        + " | ".join(
            f"{sum((p['methods'].get(m, {}).get('gap_closed') or -math.inf) >= GAP_BAR for p in problems.values())}"
            f"/{len(problems)}"
            for m in methods
        )
        + " |"
    )
    lines += ["", "Cost: wall seconds; samples trained on + samples evaluated (all workers, all grid points).", ""]
    lines += ["| problem | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name, problem in problems.items():
        cells = []
        for m in methods:
            r = problem["methods"].get(m, {})
            if r.get("wall_s") is None:
                cells.append("n/a")
            else:
                cells.append(f"{r['wall_s']:.0f} s; {r['samples'] / 1e3:.1f}k + {r.get('eval_samples', 0) / 1e3:.1f}k")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ray = [p["methods"].get("pbt_ray", {}).get("status") for p in problems.values()]
    if any(ray):
        lines += ["", f"pbt_ray (Ray Tune PBT): {ray[0]}"]
    return "\n".join(lines)


def plot_problem(name: str, problem: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = problem["methods"]
    colors = {"default": "tab:gray", "clan": "tab:red", "pbt": "tab:purple", "schedule_free": "tab:green",
              "oracle": "tab:blue"}  # fmt: skip
    fig, (curves, lrs) = plt.subplots(1, 2, figsize=(12, 4.5))
    for point in methods.get("oracle", {}).get("grid", []):
        if point.get("curve"):
            steps, values = zip(*point["curve"], strict=True)
            curves.plot(steps, values, color="tab:blue", alpha=0.15, lw=0.8)
    for method, color in colors.items():
        result = methods.get(method, {})
        if result.get("curve"):
            steps, values = zip(*result["curve"], strict=True)
            label = method + (" (best member)" if method in ("clan", "pbt") else "")
            label += " (best grid point)" if method == "oracle" else ""
            curves.plot(steps, values, color=color, marker=".", label=label, lw=2 if method == "clan" else 1.2)
        if result.get("lr_schedule"):
            label = {
                "clan": "clan (discovered, best lineage)",
                "pbt": "pbt (best lineage)",
                "oracle": f"oracle {result.get('best_point', '')}",
                "default": "default (start)",
            }.get(method, method)
            lrs.plot(range(len(result["lr_schedule"])), result["lr_schedule"], color=color, label=label,
                     lw=2 if method in ("clan", "oracle") else 1, ls="--" if method == "pbt" else "-")  # fmt: skip
    curves.set(xlabel="optimizer step", ylabel="validation loss", title=f"{name}: eval curves (faint: oracle grid)")
    curves.legend(fontsize=8)
    lrs.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule")
    lrs.set_yscale("log")
    peak = max((max(r["lr_schedule"]) for r in methods.values() if r.get("lr_schedule")), default=1.0)
    lrs.set_ylim(peak / 1e3, peak * 2)  # a decay to ~0 would otherwise squash every other schedule
    lrs.legend(fontsize=8)
    fig.suptitle(problem["mis_set"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for results.json, the plots and every run's files.")
    parser.add_argument("--quick", action="store_true", help="300 steps and a smaller oracle grid (<= 15 min).")
    parser.add_argument("--tiny", action="store_true", help="A few steps on 2 ranks: checks the harness, not numbers.")
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="Comma-separated subset of the problems.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of the methods.")
    parser.add_argument("--num-processes", type=int, default=None, help="Clan members / DDP workers P (default 4).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    suite = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = Settings(**SUITES[suite], seed=args.seed, cache_dir=os.path.join(args.out, "runs", "cache"))
    if args.num_processes is not None:
        settings = dataclasses.replace(settings, num_processes=args.num_processes)
    problems = [PROBLEMS[name] for name in args.problems.split(",")]
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if os.path.isdir(os.path.join(args.out, "runs")):
        shutil.rmtree(os.path.join(args.out, "runs"))
    os.makedirs(settings.cache_dir, exist_ok=True)

    total = sum(len(oracle_grid(p, settings)) if m == "oracle" else 1 for p in problems for m in methods)
    results = {
        "suite": suite,
        "settings": dataclasses.asdict(settings),
        "machine": f"{cpu_cores()} CPU cores, torch {torch.__version__}",
        "problems": {},
    }
    start = time.perf_counter()
    with tqdm(total=total, desc=f"schedule suite ({suite})", unit="run") as bar:
        for problem in problems:
            results["problems"][problem.name] = run_problem(problem, settings, methods, args.out, bar)
            results["wall_s"] = time.perf_counter() - start
            write_json(os.path.join(args.out, "results.json"), results)
            png = os.path.join(args.out, f"{problem.name}.png")
            plot_problem(problem.name, results["problems"][problem.name], png)
    print(markdown_table(results))
    print(
        f"\nsuite wall time: {results['wall_s']:.0f} s ({suite}: P={settings.num_processes}, {settings.steps} steps)"
    )
    return results


if __name__ == "__main__":
    main()
