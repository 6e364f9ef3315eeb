"""Which fitness ranks learning rates the way the end of the run does?

A selection compares members one round after a clone changed its learning rate, both from the same weights. This
script recreates that moment on a suite problem, in one process with plain AdamW: a trunk trains at `--trunk-lr`
for `B` steps, then one branch per rate in `--rates` trains one round (`round_steps`) from the trunk's weights and
optimizer state. Each branch is then scored by every candidate fitness:

- `raw`: the validation loss at the branch's weights (what the clan ranks by default);
- `avgN`: at the uniform mean of the round's last N steps (`fitness_average_window`);
- `emaH`: at an exponential moving average of the weights with a horizon of H steps, kept since step 0;
- `annealK`: after K more steps with the rate decayed linearly to 0, on a throw-away copy (an annealed look-ahead);

and by the **truth**: the branch trains on at its rate to the start of the clan's cooldown (the last
`cooldown_fraction` of the run), decays linearly to 0 there, and is scored at the end. A fitness's **regret** at one
branch point is the truth of the rate it ranks first minus the best truth: what picking by it costs at the end.

    python benchmarks/ranking_horizon.py --problem warmup_decay --rates 0.03,0.01,0.005,0.002 --branch 50,100,175
    python benchmarks/ranking_horizon.py --problem lm_long_horizon --rates 0.03,0.01,0.003,0.001 --trunk-lr 0.01

The problems, data and budgets are `schedule_suite.py`'s (`--quick` budget); a problem whose model takes
`input_ids`/`labels` batches works. Writes DIR/result.json and DIR/table.md.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from bench_utils import mean_loss, write_json
from schedule_suite import ALL_PROBLEMS, SUITES, Settings, problem_settings
from transformers import default_data_collator

from clantune_hf.fitness import WeightAverage


class Run:
    """A model, its optimizer, the EMAs of its weights (the clan's own `WeightAverage`, updated every step since
    step 0), and the data order every branch shares."""

    def __init__(self, model, train, steps: int, batch: int, seed: int, horizons: list[int]):
        self.model = model
        self.optimizer = torch.optim.AdamW(WeightAverage.parameters(model), lr=0.0, weight_decay=0.0)
        self.emas = {h: WeightAverage(horizon=h) for h in horizons}
        self.train = train
        generator = torch.Generator().manual_seed(seed)
        self.order = torch.randint(0, len(train), (steps, batch), generator=generator)

    def step(self, lr: float, t: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = default_data_collator([self.train[int(i)] for i in self.order[t]])
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for ema in self.emas.values():
            ema.update(self.model)

    def copy(self) -> Run:
        # The data and its order are shared, not copied.
        return copy.deepcopy(self, {id(self.train): self.train, id(self.order): self.order})

    def loss_at(self, average: WeightAverage, val) -> float:
        with average.swapped_in(self.model):
            return mean_loss(self.model, val)


def branch_scores(trunk: Run, rate: float, start: int, settings: Settings, args, val) -> dict[str, float]:
    """Every candidate fitness of one branch, and its truth."""
    run = trunk.copy()
    averages = {n: WeightAverage() for n in args.average}  # the plain mean of the round's last n steps
    for i, t in enumerate(range(start, start + settings.round_steps)):
        run.step(rate, t)
        for n, average in averages.items():
            if i >= settings.round_steps - n:
                average.update(run.model)
    end = start + settings.round_steps
    scores = {"raw": mean_loss(run.model, val)}
    scores |= {f"avg{n}": run.loss_at(average, val) for n, average in averages.items()}
    scores |= {f"ema{h}": run.loss_at(ema, val) for h, ema in run.emas.items()}
    for k in args.anneal:
        look = run.copy()
        for i in range(k):
            look.step(rate * (1 - (i + 1) / (k + 1)), end + i)  # the batches the branch itself trains on next
        scores[f"anneal{k}"] = mean_loss(look.model, val)
    cooldown = round(settings.steps * (1 - args.cooldown_fraction))
    for t in range(end, settings.steps):
        factor = 1.0 if t < cooldown else (settings.steps - t) / (settings.steps - cooldown)
        run.step(rate * factor, t)
    scores["truth"] = mean_loss(run.model, val)
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", required=True, choices=list(ALL_PROBLEMS))
    parser.add_argument("--rates", required=True, help="The branches' learning rates, comma-separated.")
    parser.add_argument("--trunk-lr", type=float, default=None, help="The trunk's rate (default: the start's).")
    parser.add_argument("--branch", default="50,100,175", help="Trunk lengths (steps) to branch at.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--average", default="12", help="avgN rankings: uniform means of the round's last N steps.")
    parser.add_argument("--ema", default="12,25,50", help="emaH rankings: EMA horizons in steps.")
    parser.add_argument("--anneal", default="8,32", help="annealK rankings: look-ahead lengths in steps.")
    parser.add_argument("--cooldown-fraction", type=float, default=0.2)
    parser.add_argument("--tiny", action="store_true", help="A few steps: checks the script, not numbers.")
    parser.add_argument("--out", default=None, help="Default: bench_out/ranking_horizon/<problem>.")
    args = parser.parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    args.average, args.anneal = ints(args.average), ints(args.anneal)
    rates = [float(r) for r in args.rates.split(",")]
    problem = ALL_PROBLEMS[args.problem]
    out = args.out or os.path.join("bench_out", "ranking_horizon", args.problem)
    os.makedirs(out, exist_ok=True)
    settings = problem_settings(problem, Settings(**SUITES["tiny" if args.tiny else "quick"], cache_dir=out))
    branches = ints(args.branch) if not args.tiny else [2]
    args.average = [min(n, settings.round_steps) for n in args.average]
    trunk_lr = args.trunk_lr or problem.start["learning_rate"]
    warmup = round(problem.start.get("warmup", 0.0) * settings.steps)
    if problem.setup:
        problem.setup(settings)
    train, val, _ = problem.make_data(settings)

    results = []
    for seed in ints(args.seeds):
        torch.manual_seed(seed)
        trunk = Run(problem.make_model(settings), train, settings.steps + max(args.anneal, default=0),
                    settings.global_batch, seed, ints(args.ema))  # fmt: skip
        done = 0
        for start in sorted(branches):
            for t in range(done, start):
                trunk.step(trunk_lr * min(1.0, (t + 1) / max(1, warmup)), t)
            done = start
            scores = {rate: branch_scores(trunk, rate, start, settings, args, val) for rate in rates}
            results.append({"seed": seed, "branch": start, "scores": {str(r): s for r, s in scores.items()}})
            print(f"seed {seed}, branch at step {start}: done", flush=True)

    table = markdown(args, rates, results)
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    summary = {"problem": args.problem, "rates": rates, "trunk_lr": trunk_lr, "results": results}
    write_json(os.path.join(out, "result.json"), summary)
    return summary


def markdown(args, rates: list[float], results: list[dict]) -> str:
    kinds = [k for k in results[0]["scores"][str(rates[0])] if k != "truth"]
    lines = [f"# Ranking learning rates on {args.problem}: which fitness picks what the end of the run picks", ""]
    regrets: dict[str, list[float]] = {k: [] for k in kinds}
    hits: dict[str, int] = dict.fromkeys(kinds, 0)
    for entry in results:
        scores = entry["scores"]
        truth = {r: scores[str(r)]["truth"] for r in rates}
        best = min(truth.values())
        lines += [f"## seed {entry['seed']}, branch at step {entry['branch']}", ""]
        lines += ["| rate | " + " | ".join(kinds) + " | truth |", "|---" * (len(kinds) + 2) + "|"]
        for r in rates:
            cells = [f"{scores[str(r)][k]:.4f}" for k in kinds + ["truth"]]
            lines.append(f"| {r:g} | " + " | ".join(cells) + " |")
        picks = {k: min(rates, key=lambda r, k=k: scores[str(r)][k]) for k in kinds}
        lines.append("| picks | " + " | ".join(f"{picks[k]:g}" for k in kinds) + f" | {min(rates, key=truth.get):g} |")
        lines.append("")
        for k in kinds:
            regrets[k].append(truth[picks[k]] - best)
            hits[k] += truth[picks[k]] == best
    lines += ["## Summary over every seed and branch point", ""]
    lines += ["| fitness | picks the truth's best | mean regret | worst regret |", "|---|---|---|---|"]
    for k in kinds:
        lines.append(
            f"| {k} | {hits[k]}/{len(results)} | {sum(regrets[k]) / len(results):.4f} | {max(regrets[k]):.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
