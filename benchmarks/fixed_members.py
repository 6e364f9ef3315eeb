"""How much of a member's fitness is its own? Train one clan on a suite problem with every member's learning rate
held fixed (no selection, no mutation, no resampling) and print each member's fitness every round, and the final
model's test score.

A clan ranks members that trained together: while cooperating, each applies the mean of the sharers' gradients, taken
at their own weights. Comparing a member's curve here with the same rate in a clan where every member holds it (or
with the plain `Trainer` at that rate, the oracle grid's curves in the suite's results) shows what sharing with
members at other rates costs it:

    python benchmarks/fixed_members.py --problem well_tuned --learning-rates 0.03,0.03,0.03,0.03
    python benchmarks/fixed_members.py --problem well_tuned --learning-rates 0.03,0.01,0.01,0.01
    python benchmarks/fixed_members.py --problem well_tuned --learning-rates 0.03,0.01,0.01,0.01 --solo-radius 0.1
    python benchmarks/fixed_members.py --problem well_tuned --learning-rates 0.03,0.03,0.01,0.01 --resync
    python benchmarks/fixed_members.py --problem regress_clip --learning-rates 0.003,0.001,0.001,0.01 \
        --start-at-oracle benchmarks/results/quick/results.json

With `--resync` every member takes member 0's weights and optimizer state at each round's end, so each round's
fitness measures one round of training from the same point: what a selection compares right after cloning. With
`--start-at-oracle` the problem's other settings (e.g. regress_clip's clip) are the stored oracle's.

The problems, budgets and data are `schedule_suite.py`'s (`--quick` budget unless `--full`; `--tiny` checks the
script); the clan's genes are the learning rate alone. Writes DIR/clan_history.jsonl and DIR/result.json.
"""

from __future__ import annotations

import argparse
import json
import os

from schedule_suite import ALL_PROBLEMS, SUITES, Settings, _run, problem_settings, start_at_oracle

import clantune_hf
from clantune_hf.rounds import copy_members, record_round


class FixedMembersTrainer(clantune_hf.ClanTrainer):
    """A clan whose members keep the learning rates they were given: every round is evaluated and recorded, nothing
    is selected or mutated."""

    learning_rates: list[float] = []
    resync: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.learning_rates) != self.clan_size:
            raise ValueError(f"--learning-rates gives {len(self.learning_rates)} rates for {self.clan_size} members.")
        for genome, rate in zip(self.genomes, self.learning_rates, strict=True):
            genome["learning_rate"].value = rate

    def _end_round(self) -> None:
        record_round(self, self._gather_fitness(), {})
        if self.resync:
            copy_members(self, {dst: 0 for dst in range(1, self.clan_size)})
        self._expressed_phase = None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", required=True, choices=list(ALL_PROBLEMS))
    parser.add_argument("--learning-rates", required=True, help="One rate per member, comma-separated (P = count).")
    parser.add_argument("--out", default=None, help="Run directory (default: bench_out/fixed_members/<problem>).")
    parser.add_argument("--full", action="store_true", help="The full suite's budget instead of --quick's.")
    parser.add_argument("--tiny", action="store_true", help="A few steps: checks the script, not numbers.")
    parser.add_argument("--duty-cycle", type=float, default=None, help="Override the suite's duty cycle.")
    parser.add_argument("--solo-radius", type=float, default=None, help="Override solo_radius.")
    parser.add_argument("--cooldown-fraction", type=float, default=None, help="Override cooldown_fraction.")
    parser.add_argument(
        "--resync", action="store_true", help="Members take member 0's weights and optimizer at each round's end."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start-at-oracle",
        default=None,
        metavar="RESULTS",
        help="Start from the oracle's point this results.json holds for the problem (its other genes, e.g. the clip).",
    )
    args = parser.parse_args(argv)
    if args.start_at_oracle:
        start_at_oracle(args.start_at_oracle, [args.problem], parser)

    rates = [float(r) for r in args.learning_rates.split(",")]
    out = args.out or os.path.join("bench_out", "fixed_members", args.problem)
    suite = "tiny" if args.tiny else "full" if args.full else "quick"
    cache = os.path.join(out, "cache")
    settings = Settings(**{**SUITES[suite], "num_processes": len(rates)}, seed=args.seed, cache_dir=cache)
    settings = problem_settings(ALL_PROBLEMS[args.problem], settings)
    overrides = {"genes": ["learning_rate"], "resample_probability": 0.0}
    # The override flags are ClanConfig fields of the same names (argparse turns --duty-cycle into duty_cycle).
    for name in ("duty_cycle", "solo_radius", "cooldown_fraction"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    # The runs fork from this process and build `clantune_hf.ClanTrainer`: make that the fixed clan.
    FixedMembersTrainer.learning_rates = rates
    FixedMembersTrainer.resync = args.resync
    clantune_hf.ClanTrainer = FixedMembersTrainer
    result = _run(args.problem, "clan", {}, settings, out, overrides)
    if result.get("status") != "ok":
        raise SystemExit(f"run failed: {result.get('status')}\n{result.get('log_tail', '')}")

    with open(os.path.join(out, "clan_history.jsonl")) as f:
        records = [json.loads(line) for line in f]
    rounds: dict[int, dict[int, float | None]] = {}
    for record in records:
        rounds.setdefault(record["round"], {})[record["member"]] = record["fitness"]
    print(f"{args.problem}: fitness per round (validation) of members at learning rates {rates}")
    print("| round | " + " | ".join(f"member {m} ({r:g})" for m, r in enumerate(rates)) + " |")
    print("|---" * (len(rates) + 1) + "|")
    for round_index, fitness in sorted(rounds.items()):
        cells = ["nan" if fitness.get(m) is None else f"{fitness[m]:.4f}" for m in range(len(rates))]
        print(f"| {round_index} | " + " | ".join(cells) + " |")
    print(f"final model (the best member at the end), test: {result['fitness']:.4f}")
    return result


if __name__ == "__main__":
    main()
