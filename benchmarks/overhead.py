"""What does a clan cost on top of DDP? Same model, data and P ranks (2, then 4), four runs interleaved and repeated:

    trainer        `Trainer` under DDP (the baseline a user would otherwise run)
    trainer_eval   the same, evaluating on the clan's eval set every `round_steps` (the memory baseline: a clan
                   evaluates each member as often, and the eval batch's activations set both runs' peak memory)
    clan_duty0     `ClanTrainer` with duty_cycle=0: every step cooperative, selection every round
    clan_default   `ClanTrainer` with the default duty cycle (`ClanConfig().duty_cycle`)

Members sharded over 2 ranks each (`ranks_per_member=2`) are measured on 4 ranks against plain FSDP2:

    fsdp2                  `Trainer` with the model FSDP2-sharded over all 4 ranks (the baseline for big models)
    hsdp                   `Trainer` with the model HSDP-sharded, 2 replicas x 2 shards: the clan's own layout and
                           communication (reduce-scatter in a replica, all-reduce across), without the clan
    clan_sharded_duty0     `ClanTrainer(ranks_per_member=2)`, 2 members x 2 shards, duty_cycle=0
    clan_sharded_default   the same at the default duty cycle

Each step is timed on rank 0 by a callback; the round's fitness evaluation and selection/exchange are timed by a
`ClanTrainer` subclass here (the package itself carries no timers) and subtracted from the step they end. Bytes per
exchange are counted by wrapping rounds.py's `send_member`, and every rank's peak resident memory is read at the
end of its run. A run's step time is the median step of its least disturbed repeat: on a shared machine other jobs
slow whole repeats down (every repeat's median is in the JSON).

    python benchmarks/overhead.py --out bench_out/overhead            # ~23 min on 2 CPU cores

Writes DIR/overhead.json with one summary per rank count under `by_ranks` (and the worst rank count's three ratios
at the top level), and the sharded comparison under `sharded` (its ratios against fsdp2, and the bytes one clone
moves over all its rank pairs against one member's state). Per rank count: `overhead_ratio` (median cooperative
step of clan_duty0 / median step of trainer), `competitive_ratio` (clan_default's competitive step, batch broadcast
included, / trainer), `memory_ratio` (largest peak RSS of a clan rank / of a trainer_eval rank; also against
trainer as `memory_ratio_vs_no_eval`), the per-round split of
clan_default into cooperative, competitive, fitness and selection/exchange seconds, and the bytes moved per exchange
against the model's size; prints a markdown summary. Targets (reported, not asserted): cooperative step within 2% of
the DDP Trainer, competitive step below the cooperative one, peak memory within 5% of DDP's, selection + exchange
under 2% of a round at round_steps=200.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments

import clantune_hf.rounds as rounds_module
from clantune_hf import ClanConfig, ClanTrainer
from clantune_hf.exchange import all_gather_floats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import MarkovText, cpu_cores, launch, log_tail, markov_table, tiny_gpt2, write_json  # noqa: E402

RUNS = ["trainer", "trainer_eval", "clan_duty0", "clan_default"]
SHARDED_RUNS = ["fsdp2", "hsdp", "clan_sharded_duty0", "clan_sharded_default"]
SHARDED_RANKS, RANKS_PER_MEMBER = 4, 2
SETTINGS = {
    "full": dict(steps=600, round_steps=200, width=64, layers=3, seq_len=64, batch=8, eval_size=256),
    "tiny": dict(steps=12, round_steps=6, width=32, layers=2, seq_len=16, batch=4, eval_size=32),
}
RANKS = {"full": [2, 4], "tiny": [2]}
UNTIMED_STEPS = {"full": 10, "tiny": 2}  # a run's first steps (allocator and gloo warm-up) are not timed


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step on this rank, minus the round-end work that ran inside it."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.durations: list[float] = []
        self.competitive: list[bool] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # Added after ClanTrainer's round callback, so `now` already includes this step's selection and exchange.
        now = time.perf_counter()
        self.durations.append(now - self.last - self.trainer.round_time_in_step())
        self.competitive.append(bool(getattr(self.trainer, "_competitive", False)))
        self.last = now


class TimedTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timer = StepTimer(self)
        self.add_callback(self.timer)

    def round_time_in_step(self) -> float:
        return 0.0


class FSDP2Trainer(TimedTrainer):
    """Plain FSDP2 (a 1-D `mesh`) or HSDP (2-D: replicas x shards), one unit per transformer block, as a user
    training one big model would. Sharded the way ClanTrainer shards a member, and taking the Trainer's path for a
    model that owns its sharding (no DDP wrap), so the runs differ only in what the clan adds."""

    def __init__(self, *args, mesh: tuple[int, ...], **kwargs):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        super().__init__(*args, **kwargs)
        mesh = init_device_mesh("cpu", mesh, mesh_dim_names=("replicate", "shard")[-len(mesh) :])
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.is_distributed_loading_by_transformers = True


class TimedClanTrainer(ClanTrainer):
    """Times each round's fitness evaluation and its selection + exchange (everything else `_end_round` does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timer = StepTimer(self)
        self.add_callback(self.timer)
        self.rounds: list[dict] = []
        self._pending = 0.0
        self._fitness_s = 0.0

    def _gather_fitness(self, *args, **kwargs):
        start = time.perf_counter()
        fitness = super()._gather_fitness(*args, **kwargs)
        self._fitness_s = time.perf_counter() - start
        return fitness

    def _end_round(self):
        start = time.perf_counter()
        super()._end_round()
        total = time.perf_counter() - start
        self.rounds.append({"fitness_s": self._fitness_s, "selection_exchange_s": total - self._fitness_s})
        self._pending += total

    def round_time_in_step(self) -> float:
        pending, self._pending = self._pending, 0.0
        return pending


def run_job(run: str, settings: dict, job_dir: str) -> None:
    """One run on every rank of a launch; rank 0 writes its timings to job_dir/timing.json."""
    sent: list[int] = []
    send_member = rounds_module.send_member

    def counting_send_member(model, optimizer, dst, extra=()):
        sent.append(send_member(model, optimizer, dst, extra))
        return sent[-1]

    rounds_module.send_member = counting_send_member

    table = markov_table(0)
    seq_len = settings["seq_len"]
    train = MarkovText(table, settings["steps"] * settings["batch"] * settings["num_processes"], 1, seq_len)
    evals = MarkovText(table, settings["eval_size"], 2, seq_len)
    model = tiny_gpt2(seq_len=seq_len, width=settings["width"], layers=settings["layers"])
    common = dict(
        output_dir=job_dir, max_steps=settings["steps"], per_device_train_batch_size=settings["batch"],
        per_device_eval_batch_size=64, learning_rate=3e-3, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, ddp_broadcast_buffers=False,
    )  # fmt: skip
    if run == "trainer":
        trainer = TimedTrainer(model=model, args=TrainingArguments(**common), train_dataset=train)
    elif run in ("fsdp2", "hsdp"):
        mesh = (SHARDED_RANKS // RANKS_PER_MEMBER, RANKS_PER_MEMBER) if run == "hsdp" else (SHARDED_RANKS,)
        trainer = FSDP2Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, mesh=mesh)
    elif run == "trainer_eval":
        args = TrainingArguments(**common, eval_strategy="steps", eval_steps=settings["round_steps"])
        trainer = TimedTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    else:
        duty = 0.0 if run.endswith("duty0") else ClanConfig.duty_cycle
        ranks = RANKS_PER_MEMBER if "sharded" in run else 1
        args = ClanConfig(**common, round_steps=settings["round_steps"], duty_cycle=duty, ranks_per_member=ranks)
        trainer = TimedClanTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start

    timing = {"run": run, "train_s": train_s}
    # Linux reports kilobytes; every rank's peak, since a clan's ranks do different work at a round's end.
    timing["peak_rss_mb"] = [kb / 1024 for kb in all_gather_floats(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]
    if run.startswith("clan"):
        timing["duty_cycle"] = trainer.args.duty_cycle
        timing["rounds"] = trainer.rounds
        timing["bytes_sent"] = sum(all_gather_floats(float(sum(sent))))
        timing["exchanges"] = sum(r["parent"] is not None for r in trainer.clan_history)
    if trainer.accelerator.is_main_process:
        timed = slice(settings["untimed_steps"], None)
        timing["durations"] = trainer.timer.durations[timed]
        timing["competitive"] = trainer.timer.competitive[timed]
        write_json(os.path.join(job_dir, "timing.json"), timing)


def model_bytes(settings: dict, ranks_per_member: int = 1) -> dict:
    """One member's state in bytes. A sharded member's ranks split its weights and Adam moments; each rank holds its
    own copy of the buffers and its own Adam `step` counters. A one-rank member also holds its fitness EMA (a copy of
    the trainable weights, `fitness_ema_steps`), which a clone takes with the rest."""
    model = tiny_gpt2(seq_len=settings["seq_len"], width=settings["width"], layers=settings["layers"])
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = ranks_per_member * sum(b.numel() * b.element_size() for b in model.buffers())
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    # AdamW state per parameter tensor: exp_avg and exp_avg_sq (like the parameter) and a float32 `step` scalar.
    optimizer = 2 * params + 4 * tensors * ranks_per_member
    ema = params if ranks_per_member == 1 else 0  # `fitness_ema_steps` defaults to 0 for a sharded member
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "param_bytes": params,
        "buffer_bytes": buffers,
        "optimizer_state_bytes": optimizer,
        "fitness_ema_bytes": ema,
        "clone_bytes_expected": params + buffers + optimizer + ema,
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _least_disturbed(repeats: list[dict], competitive: bool | None) -> tuple[float | None, list[float | None]]:
    """The median step time of each repeat (of one phase, or of every step), and the smallest of them.

    Other jobs on a shared machine slow whole stretches of a run down; the repeat they disturbed least is the best
    estimate of what the code itself costs."""
    medians = [
        _median([d for d, c in zip(t["durations"], t["competitive"], strict=True) if competitive in (None, c)])
        for t in repeats
    ]
    known = [m for m in medians if m is not None]
    return (min(known) if known else None), medians


def summarize(timings: dict[str, list[dict]], settings: dict) -> dict:
    runs = {}
    for run, repeats in timings.items():
        step, step_repeats = _least_disturbed(repeats, None)
        coop, coop_repeats = _least_disturbed(repeats, False)
        comp, _ = _least_disturbed(repeats, True)
        runs[run] = {
            "repeats": len(repeats),
            "train_s": [t["train_s"] for t in repeats],
            "step_s_median": step,
            "steps_per_s": 1 / step,
            "step_s_median_per_repeat": step_repeats,
            "cooperative_step_s_median": coop,
            "cooperative_step_s_median_per_repeat": coop_repeats,
            "competitive_step_s_median": comp,
            "peak_rss_mb": _median([max(t["peak_rss_mb"]) for t in repeats]),
        }
        for t in repeats:
            runs[run].setdefault("rounds", []).extend(t.get("rounds", []))
            runs[run]["bytes_sent"] = runs[run].get("bytes_sent", 0) + t.get("bytes_sent", 0)
            runs[run]["exchanges"] = runs[run].get("exchanges", 0) + t.get("exchanges", 0)

    if "fsdp2" in runs:
        return summarize_sharded(runs, settings)
    base = runs["trainer"]["step_s_median"]
    result = {"runs": runs}
    result["overhead_ratio"] = runs["clan_duty0"]["cooperative_step_s_median"] / base
    result["overhead_ratio_default_duty"] = runs["clan_default"]["cooperative_step_s_median"] / base
    competitive = runs["clan_default"]["competitive_step_s_median"]
    result["competitive_ratio"] = None if competitive is None else competitive / base
    clan_rss = max(runs[r]["peak_rss_mb"] for r in RUNS if r.startswith("clan"))
    result["memory_ratio"] = clan_rss / runs["trainer_eval"]["peak_rss_mb"]
    result["memory_ratio_vs_no_eval"] = clan_rss / runs["trainer"]["peak_rss_mb"]

    default = runs["clan_default"]
    duty = ClanConfig.duty_cycle
    n_coop = round(settings["round_steps"] * (1 - duty))
    n_comp = settings["round_steps"] - n_coop
    split = {
        "round_steps": settings["round_steps"],
        "duty_cycle": duty,
        "cooperative_s": n_coop * default["cooperative_step_s_median"],
        "competitive_s": n_comp * (default["competitive_step_s_median"] or 0.0),
        "fitness_s": _median([r["fitness_s"] for r in default["rounds"]]),
        "selection_exchange_s": _median([r["selection_exchange_s"] for r in default["rounds"]]),
    }
    round_s = sum(v for k, v in split.items() if k.endswith("_s"))
    split["round_s"] = round_s
    split["fractions"] = {
        k.removesuffix("_s"): v / round_s for k, v in split.items() if k.endswith("_s") and k != "round_s"
    }
    result["round_split"] = split

    result["exchange"] = exchange_bytes(runs, settings)
    result["targets"] = {
        "cooperative_step_within_2pct_of_ddp": result["overhead_ratio"] <= 1.02,
        "competitive_step_below_cooperative": competitive is not None
        and competitive < runs["clan_default"]["cooperative_step_s_median"],
        "peak_memory_within_5pct_of_ddp": result["memory_ratio"] <= 1.05,
        "selection_exchange_under_2pct_of_round": split["fractions"]["selection_exchange"] < 0.02,
    }
    return result


def exchange_bytes(runs: dict, settings: dict, ranks_per_member: int = 1) -> dict:
    """Bytes one clone moves (over all the rank pairs of a sharded member) against one member's state."""
    sizes = model_bytes(settings, ranks_per_member)
    exchanges = sum(r["exchanges"] for r in runs.values() if "exchanges" in r)
    moved = sum(r["bytes_sent"] for r in runs.values() if "bytes_sent" in r)
    per_exchange = moved / exchanges if exchanges else None
    return {
        **sizes,
        "exchanges": exchanges,
        "bytes_per_exchange": per_exchange,
        "bytes_per_exchange_over_param_bytes": per_exchange / sizes["param_bytes"] if per_exchange else None,
        "bytes_per_exchange_over_expected": per_exchange / sizes["clone_bytes_expected"] if per_exchange else None,
    }


def summarize_sharded(runs: dict, settings: dict) -> dict:
    base = runs["fsdp2"]["step_s_median"]
    coop = runs["clan_sharded_duty0"]["cooperative_step_s_median"]
    competitive = runs["clan_sharded_default"]["competitive_step_s_median"]
    clan_rss = max(runs[r]["peak_rss_mb"] for r in SHARDED_RUNS if r.startswith("clan"))
    return {
        "layout": f"{SHARDED_RANKS // RANKS_PER_MEMBER} members x {RANKS_PER_MEMBER} ranks",
        "runs": runs,
        "overhead_ratio": coop / base,
        "overhead_ratio_default_duty": runs["clan_sharded_default"]["cooperative_step_s_median"] / base,
        "overhead_ratio_vs_hsdp": coop / runs["hsdp"]["step_s_median"],
        "competitive_ratio": None if competitive is None else competitive / base,
        "memory_ratio_vs_fsdp2": clan_rss / runs["fsdp2"]["peak_rss_mb"],
        "memory_ratio_vs_hsdp": clan_rss / runs["hsdp"]["peak_rss_mb"],
        "exchange": exchange_bytes(runs, settings, RANKS_PER_MEMBER),
    }


def run_table(title: str, runs: dict) -> list[str]:
    """A markdown section: `title`, then one row of step times and memory per run."""
    lines = [
        f"### {title}",
        "",
        "| run | median step ms | steps/s | cooperative ms | competitive ms | peak RSS per rank MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        comp = run["competitive_step_s_median"]
        lines.append(
            f"| {name} | {1e3 * run['step_s_median']:.1f} | {run['steps_per_s']:.1f} | "
            f"{1e3 * run['cooperative_step_s_median']:.1f} | {'–' if comp is None else f'{1e3 * comp:.1f}'} | "
            f"{run['peak_rss_mb']:.0f} |"
        )
    return lines


def markdown(result: dict, num_processes: int) -> str:
    split, ex = result["round_split"], result["exchange"]
    lines = run_table(f"{num_processes} ranks", result["runs"])
    fractions = split["fractions"]
    competitive = result["competitive_ratio"]
    lines += [
        "",
        f"overhead_ratio (clan cooperative step / DDP Trainer step): {result['overhead_ratio']:.3f} "
        f"(default duty cycle run: {result['overhead_ratio_default_duty']:.3f}); target <= 1.02",
        f"competitive_ratio (competitive step, batch broadcast included / DDP Trainer step): "
        f"{'–' if competitive is None else f'{competitive:.3f}'}; target below the cooperative step",
        f"memory_ratio (peak RSS of a clan rank / of a DDP rank evaluating as often): {result['memory_ratio']:.3f}; "
        f"target <= 1.05 (against a DDP run that never evaluates: {result['memory_ratio_vs_no_eval']:.3f})",
        f"round of {split['round_steps']} steps at duty_cycle={split['duty_cycle']}: {split['round_s']:.2f} s = "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fractions.items())
        + "; target selection_exchange < 2%",
    ]
    if ex["bytes_per_exchange"]:
        lines.append(
            f"bytes per exchange: {ex['bytes_per_exchange'] / 1e6:.2f} MB = "
            f"{ex['bytes_per_exchange_over_param_bytes']:.2f}x "
            f"the trainable weights ({ex['param_bytes'] / 1e6:.2f} MB); expected weights + buffers + Adam state + EMA "
            f"{ex['clone_bytes_expected'] / 1e6:.2f} MB ({ex['exchanges']} exchanges measured)"
        )
    return "\n".join(lines)


def markdown_sharded(result: dict) -> str:
    ex = result["exchange"]
    title = f"{SHARDED_RANKS} ranks, sharded members ({result['layout']}) against plain FSDP2"
    lines = run_table(title, result["runs"])
    competitive = result["competitive_ratio"]
    lines += [
        "",
        f"overhead_ratio (sharded clan cooperative step / FSDP2 Trainer step): {result['overhead_ratio']:.3f} "
        f"(default duty cycle run: {result['overhead_ratio_default_duty']:.3f}); against the HSDP Trainer of the same "
        f"2 x 2 layout: {result['overhead_ratio_vs_hsdp']:.3f}",
        "competitive_ratio (competitive step / FSDP2 Trainer step): "
        + ("–" if competitive is None else f"{competitive:.3f}"),
        f"memory_ratio_vs_fsdp2 (peak RSS per rank): {result['memory_ratio_vs_fsdp2']:.3f}; against HSDP: "
        f"{result['memory_ratio_vs_hsdp']:.3f}",
    ]
    if ex["bytes_per_exchange"]:
        lines.append(
            f"bytes per clone, over its {RANKS_PER_MEMBER} rank pairs: {ex['bytes_per_exchange'] / 1e6:.3f} MB = "
            f"{ex['bytes_per_exchange_over_expected']:.3f}x one member's state "
            f"({ex['clone_bytes_expected'] / 1e6:.3f} MB: weights, Adam moments, and each rank's buffers and step "
            f"counters; {ex['exchanges']} clones measured)"
        )
    return "\n".join(lines)


def run_all(runs: list[str], num_processes: int, settings: dict, args, bar) -> dict:
    """`args.repeats` interleaved repeats of `runs` on `num_processes` ranks; returns their summary."""
    timings: dict[str, list[dict]] = {run: [] for run in runs}
    for repeat in range(args.repeats):
        for run in runs:
            bar.set_postfix_str(f"{run}, {num_processes} ranks")
            job_dir = os.path.join(args.out, "runs", f"p{num_processes}", f"{run}_{repeat}")
            os.makedirs(job_dir, exist_ok=True)
            job = dict(settings, num_processes=num_processes)
            try:
                launch(run_job, num_processes, run, job, job_dir, log_path=f"{job_dir}/log")
            except RuntimeError as error:
                raise RuntimeError(f"{run} failed: {error}\n{log_tail(f'{job_dir}/log')}") from error
            timings[run].append(_read(os.path.join(job_dir, "timing.json")))
            bar.update(1)
    return summarize(timings, settings)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for overhead.json and every run's logs.")
    parser.add_argument("--tiny", action="store_true", help="A few steps on 2 ranks: checks the harness, not numbers.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats of the three runs (default 3).")
    parser.add_argument("--num-processes", type=int, nargs="+", default=None, help="Rank counts P (default 2 4).")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run (default 600).")
    parser.add_argument("--round-steps", type=int, default=None, help="Steps per clan round (default 200).")
    args = parser.parse_args(argv)

    mode = "tiny" if args.tiny else "full"
    settings = dict(SETTINGS[mode], untimed_steps=UNTIMED_STEPS[mode])
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.round_steps is not None:
        settings["round_steps"] = args.round_steps
    ranks = args.num_processes or RANKS[mode]
    start = time.perf_counter()
    total = (len(ranks) * len(RUNS) + len(SHARDED_RUNS)) * args.repeats
    with tqdm(total=total, desc="overhead", unit="run") as bar:
        by_ranks = {str(p): run_all(RUNS, p, settings, args, bar) for p in ranks}
        sharded = run_all(SHARDED_RUNS, SHARDED_RANKS, settings, args, bar)
    result = {
        "settings": settings,
        "machine": f"{cpu_cores()} CPU cores, gloo ranks with one thread each",
        # The worst rank count's ratios, for a one-line answer; every rank count's are under by_ranks.
        **{
            key: max(summary[key] for summary in by_ranks.values() if summary[key] is not None)
            for key in ("overhead_ratio", "competitive_ratio", "memory_ratio")
        },
        "by_ranks": by_ranks,
        "sharded": sharded,
        "wall_s": time.perf_counter() - start,
    }
    write_json(os.path.join(args.out, "overhead.json"), result)
    print("\n\n".join([*(markdown(summary, int(p)) for p, summary in by_ranks.items()), markdown_sharded(sharded)]))
    return result


def _read(path: str) -> dict:
    import json

    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
