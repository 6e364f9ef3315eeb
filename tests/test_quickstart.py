"""The newcomer's path end to end: `accelerate launch` of the quickstart on 2 CPU ranks, a few steps."""

import json
import os
import subprocess
import sys

from testing_utils import free_port
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_example(script: str, out) -> str:
    """`accelerate launch` of `examples/{script}` on 2 CPU members for 12 steps (rounds of 6); its stdout."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_2_members.yaml"),
        "--main_process_port", str(free_port()),
        os.path.join(ROOT, "examples", script),
        "--output_dir", str(out), "--max_steps", "12", "--round_steps", "6",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_runs_under_accelerate_launch(tmp_path):
    out = tmp_path / "quickstart"
    assert "Discovered schedule" in launch_example("quickstart.py", out)

    records = [json.loads(line) for line in (out / "clan_history.jsonl").read_text().splitlines()]
    assert sorted({(r["round"], r["member"]) for r in records}) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {"round", "global_step", "member", "fitness", "genes", "mutation_scales", "parent"} <= set(records[0])
    assert [r["global_step"] for r in records] == [6, 6, 12, 12]
    schedule = json.loads((out / "clan_schedule.json").read_text())
    assert [s["start_step"] for s in schedule["segments"]] == [0, 6]
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 256


def test_the_aux_loss_example_schedules_its_own_gene_and_the_accumulation(tmp_path):
    out = tmp_path / "aux"
    assert "z_loss_weight" in launch_example("aux_loss_weight.py", out)
    records = [json.loads(line) for line in (out / "clan_history.jsonl").read_text().splitlines()]
    assert {"learning_rate", "gradient_accumulation_steps", "z_loss_weight"} == set(records[0]["genes"])
    assert all(r["genes"]["gradient_accumulation_steps"] in (1, 2, 3, 4) for r in records)
    assert all(1e-5 <= r["genes"]["z_loss_weight"] <= 1.0 for r in records)
    assert "z_loss_weight" in (out / "README.md").read_text(), "the model card lists the gene"
