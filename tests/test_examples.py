"""The example scripts, run offline on CPU by the exact `accelerate launch` commands of their docstrings (2 members),
shortened to a few steps by flags appended at the end (argparse keeps the last value of a repeated flag)."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys

from testing_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = "accelerate_configs/cpu_2_members.yaml"
SHARDED_CONFIG = "accelerate_configs/cpu_4_members.yaml"  # 2 members of 2 ranks each, with --ranks_per_member 2


def docstring_commands(script: str, config: str = CPU_CONFIG) -> list[list[str]]:
    """The offline commands in the script's docstring (`accelerate launch` with the CPU config `config`, or a plain
    `python` run when `config` is the 2-member one), as argument lists."""
    with open(os.path.join(ROOT, script)) as f:
        docstring = ast.get_docstring(ast.parse(f.read()))
    commands = re.findall(r"^\s*((?:accelerate launch|python) .*?)(?:\n\s*\n|\Z)", docstring, flags=re.M | re.S)
    plain = config == CPU_CONFIG
    return [shlex.split(c.replace("\\\n", " ")) for c in commands if config in c or (plain and c.startswith("python"))]


def run_command(command: list[str], output_dir: str, *extra: str, steps: int = 8, round_steps: int = 4) -> str:
    if command[0] == "accelerate":
        assert command[:3] == ["accelerate", "launch", "--config_file"], command
        assert command[3] in (CPU_CONFIG, SHARDED_CONFIG), command
        command = [*command[:2], "--main_process_port", str(free_port()), *command[2:]]
        command += ["--round_steps", str(round_steps)]
    else:
        command = [sys.executable, *command[1:]]
    command += ["--max_steps", str(steps), "--output_dir", output_dir, "--report_to", "none", "--save_strategy", "no"]
    command += extra
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_CACHE": os.path.join(output_dir, "datasets_cache"),
        "HF_MODULES_CACHE": os.path.join(output_dir, "modules_cache"),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def read_history(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "clan_history.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_clan_outputs(output_dir: str, steps: int = 8, round_steps: int = 4) -> list[dict]:
    """A 2-member clan's history, schedule and model card."""
    history = read_history(output_dir)
    rounds = sorted({r["round"] for r in history})
    assert rounds == list(range(steps // round_steps)), rounds
    assert {r["member"] for r in history} == {0, 1}
    with open(os.path.join(output_dir, "clan_schedule.json")) as f:
        schedule = json.load(f)
    assert schedule["segments"][-1]["end_step"] == steps
    with open(os.path.join(output_dir, "README.md")) as f:
        card = f.read()
    assert "**2 members**" in card and "## Discovered schedule" in card
    return history


def test_example_scripts_document_their_cpu_command():
    for script in ("examples/run_clm.py", "examples/run_classification.py"):
        launches = [c for c in docstring_commands(script) if c[0] == "accelerate"]
        assert launches, f"{script}'s docstring has no `accelerate launch --config_file {CPU_CONFIG}`"


def test_run_clm_then_replay_its_schedule(tmp_path):
    clan, _, replay = docstring_commands("examples/run_clm.py")
    output_dir = str(tmp_path / "clm")
    stdout = run_command(clan, output_dir)
    check_clan_outputs(output_dir)
    assert "its schedule:" in stdout
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        assert "eval_loss" in json.load(f)
    assert {"model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(output_dir))

    # One plain process follows that schedule: no clan files, a trained model.
    assert "--replay_schedule" in replay
    replay_dir = str(tmp_path / "replay")
    run_command(replay, replay_dir, "--replay_schedule", os.path.join(output_dir, "clan_schedule.json"))
    files = set(os.listdir(replay_dir))
    assert "model.safetensors" in files and "clan_history.jsonl" not in files, files


def test_run_clm_lora(tmp_path):
    _, lora, _ = docstring_commands("examples/run_clm.py")
    assert "--lora_r" in lora
    output_dir = str(tmp_path / "clm-lora")
    run_command(lora, output_dir)
    check_clan_outputs(output_dir)
    files = set(os.listdir(output_dir))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files, files


def test_run_clm_with_members_sharded_over_two_ranks(tmp_path):
    from transformers import AutoModelForCausalLM

    (command,) = docstring_commands("examples/run_clm.py", SHARDED_CONFIG)
    assert command[command.index("--ranks_per_member") + 1] == "2"
    output_dir = str(tmp_path / "clm-sharded")
    run_command(command, output_dir)
    check_clan_outputs(output_dir)
    AutoModelForCausalLM.from_pretrained(output_dir)  # the best member, gathered from its shards


def test_run_classification_ranks_members_by_evaluate_accuracy(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    (command,) = docstring_commands("examples/run_classification.py")
    output_dir = str(tmp_path / "classification")
    run_command(command, output_dir)
    history = check_clan_outputs(output_dir)
    fitness = [r["fitness"] for r in history]
    # Accuracy on the 80 validation sentences: a multiple of 1/80 in [0, 1], not a loss.
    assert all(0.0 <= f <= 1.0 and abs(f * 80 - round(f * 80)) < 1e-6 for f in fitness), fitness
    with open(os.path.join(output_dir, "README.md")) as f:
        assert "`accuracy` (higher is better)" in f.read()
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        assert 0.0 <= json.load(f)["eval_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    logits = model(**tokenizer(["The film was not boring."], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
