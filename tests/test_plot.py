"""`clantune plot OUTPUT_DIR`: a clan history (simulated with the real genetics, no training) drawn into a PNG."""

import math
import os
import random
import shutil
import subprocess

import pytest

from clantune_hf.cli import main
from clantune_hf.genes import build_gene
from clantune_hf.genetics import initial_clan, reproduce, selection_plan
from clantune_hf.history import build_schedule, round_records, write_history, write_schedule

pytest.importorskip("matplotlib")


def simulate_clan(output_dir: str, members: int = 6, rounds: int = 8, round_steps: int = 50, finish: bool = True):
    """A clan whose fitness (lower is better) rewards a learning rate near 3e-3 and weight decay near 0.05."""
    base = {
        "learning_rate": build_gene("learning_rate", 1e-3, {}),
        "weight_decay": build_gene("weight_decay", 0.0, {}),
        "dropout": build_gene("dropout", 0.1, {}),
    }
    genomes, history, noise = initial_clan(base, members, seed=0), [], random.Random(0)
    for round_index in range(rounds):
        fitness = [
            abs(math.log(g["learning_rate"].value / 3e-3)) + 5 * abs(g["weight_decay"].value - 0.05)
            + 2.0 / (round_index + 1) + 0.05 * noise.random()
            for g in genomes
        ]  # fmt: skip
        if round_index == 2:
            fitness[members - 1] = math.nan  # a diverged member
        last = round_index == rounds - 1
        plan = {} if last else selection_plan(fitness, False, 0.25, random.Random(round_index))
        history += round_records(round_index, (round_index + 1) * round_steps, fitness, genomes, plan)
        genomes = reproduce(genomes, plan, seed=0, round_index=round_index)
    write_history(output_dir, history)
    if finish:
        base_info = {"learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 0, "genes": {}}
        write_schedule(output_dir, build_schedule(history, round_steps, rounds * round_steps, False, base_info))
    return history


def test_plot_writes_a_png(tmp_path, capsys):
    simulate_clan(str(tmp_path))
    main(["plot", str(tmp_path)])
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(str(tmp_path), "clan_history.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_an_unfinished_run(tmp_path):
    """A run still training has no clan_schedule.json; its best lineage is recomputed from the history."""
    simulate_clan(str(tmp_path), members=2, rounds=3, finish=False)
    out = tmp_path / "figure.png"
    main(["plot", str(tmp_path), "--output", str(out)])
    assert out.stat().st_size > 10_000


@pytest.mark.skipif(shutil.which("clantune") is None, reason="the package's console scripts are not installed")
def test_console_script(tmp_path):
    simulate_clan(str(tmp_path), members=2, rounds=2)
    result = subprocess.run(["clantune", "plot", str(tmp_path)], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("clan_history.png")


def test_a_missing_history_is_reported_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("clantune plot:") and "clan_history.jsonl" in error and error.count("\n") == 1
