"""Checkpoint and resume of a whole clan: SIGKILL a run after a checkpoint, resume it, and compare with a run that
was never interrupted.

Also a script, so the killed run is a real `accelerate launch` job:

    accelerate launch --multi_gpu --num_processes 2 tests/test_resume.py OUTPUT_DIR [--hang-at STEP] [--resume]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import safetensors.torch
import torch
from testing_utils import PatternDataset, free_port, run_clan, tiny_gpt2
from transformers import AutoModelForCausalLM, TrainerCallback

from clantune_hf import ClanConfig, ClanTrainer
from clantune_hf.checkpoint import CLAN_DIR, CLAN_NAME, MEMBER_AVERAGE, member_dir
from clantune_hf.history import read_history

MAX_STEPS, ROUND_STEPS, SAVE_STEPS = 24, 4, 6
# The killed run stops after this step: checkpoint-6 is complete (mid-round, in a competitive step), round 1 was
# recorded after it (step 8), checkpoint-12 was not yet written.
HANG_AT = 10


class _Hang(TrainerCallback):
    """Stands for a job that is killed mid-run: after step `step`, tell the test and wait to be killed."""

    def __init__(self, output_dir: str, step: int):
        self.output_dir, self.step = output_dir, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            open(os.path.join(self.output_dir, f"hanging-{args.process_index}"), "w").close()
            time.sleep(600)


# A gene of the user's own (here a model config field the LM does not read) is checkpointed like the built-in ones.
GENES = {
    "learning_rate": {}, "weight_decay": {}, "adam_beta2": {}, "dropout": {},
    "summary_dropout": {"value": 0.1, "low": 0.0, "high": 0.5, "expression": "model.config.summary_first_dropout"},
}  # fmt: skip


def train(output_dir: str, hang_at: int | None = None, resume: bool = False) -> None:
    """A 2-member clan that checkpoints every 6 steps (mid-round) over 6 rounds of 4 steps, half of them competitive.
    Dropout is on, so the resumed run matches only if every rank's RNG is restored too. Fitness averages the last 3
    steps of each round, so checkpoint-6 falls inside the window and must carry the running average."""
    args = ClanConfig(
        output_dir=output_dir, round_steps=ROUND_STEPS, duty_cycle=0.5, max_steps=MAX_STEPS, save_strategy="steps",
        save_steps=SAVE_STEPS, save_total_limit=2, learning_rate=3e-3, per_device_train_batch_size=4,
        per_device_eval_batch_size=16, genes=GENES, seed=3,
        report_to="none", disable_tqdm=True, logging_steps=100, fitness_average_window=0.75,
    )  # fmt: skip
    trainer = ClanTrainer(
        model=tiny_gpt2(dropout=0.1), args=args, train_dataset=PatternDataset(40), eval_dataset=PatternDataset(16, 1)
    )
    if hang_at is not None:
        trainer.add_callback(_Hang(output_dir, hang_at))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(os.path.join(output_dir, "final"))


def launch(output_dir: str, *flags: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), __file__, output_dir, *flags,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its ranks (torchrun starts each rank in its own session)."""
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def rounds(history: list[dict]) -> list[int]:
    return sorted({r["round"] for r in history})


def schedule(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "clan_schedule.json")) as f:
        return json.load(f)


def assert_same_run(resumed: list[dict], reference: list[dict]) -> None:
    keys = [(r["round"], r["member"]) for r in resumed]
    assert len(keys) == len(set(keys)), f"a (round, member) is recorded twice: {keys}"
    assert keys == [(r["round"], r["member"]) for r in reference]
    for got, want in zip(resumed, reference, strict=True):
        where = f"round {want['round']} member {want['member']}"
        for key in ("global_step", "genes", "mutation_scales", "parent"):
            assert got[key] == want[key], f"{where}: {key} {got[key]} != {want[key]}"
        assert math.isclose(got["fitness"], want["fitness"], rel_tol=1e-5), f"{where}: {got} != {want}"


def test_killed_clan_resumes_exactly(tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    run_clan(train, 2, reference)

    proc = launch(killed, "--hang-at", str(HANG_AT))
    deadline = time.time() + 240
    try:
        while not all(os.path.exists(os.path.join(killed, f"hanging-{rank}")) for rank in (0, 1)):
            assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read()}"
            assert time.time() < deadline, "the run never reached the step it is killed at"
            time.sleep(0.2)
    finally:
        kill_tree(proc)
    before = read_history(killed)
    assert rounds(before) == [0, 1], "round 1 was recorded after checkpoint-6, before the kill"
    assert sorted(os.listdir(killed)) == ["checkpoint-6", "clan_history.jsonl", "hanging-0", "hanging-1"]
    for member in (0, 1):  # step 6 is inside round 1's averaging window (steps 6-8): the running mean is saved
        average = safetensors.torch.load_file(os.path.join(member_dir(os.path.join(killed, "checkpoint-6"), member),
                                                            MEMBER_AVERAGE))  # fmt: skip
        assert int(average["count"]) == 1 and len(average) > 1
    # A checkpoint that the kill interrupted while it was written (no trainer_state.json) must be passed over.
    os.makedirs(member_dir(os.path.join(killed, "checkpoint-12"), 0))

    resumed = launch(killed, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output

    assert_same_run(read_history(killed), read_history(reference))
    assert schedule(killed)["segments"] == schedule(reference)["segments"], "same lineage, same schedule"
    final = safetensors.torch.load_file(os.path.join(killed, "final", "model.safetensors"))
    want = safetensors.torch.load_file(os.path.join(reference, "final", "model.safetensors"))
    assert final.keys() == want.keys()
    assert all(torch.allclose(final[k], want[k], rtol=1e-4, atol=1e-6) for k in want), "same final weights"


def test_checkpoints_hold_the_clan_and_rotate(tmp_path):
    """Checked on the uninterrupted run's files: rotation, the per-member state, safe formats, the best member at the
    top level."""
    output_dir = str(tmp_path)
    run_clan(train, 2, output_dir)
    checkpoints = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-18", "checkpoint-24"], "save_total_limit=2 keeps the two newest"
    history = read_history(output_dir)
    for name in checkpoints:
        checkpoint = os.path.join(output_dir, name)
        step = int(name.split("-")[1])
        with open(os.path.join(checkpoint, CLAN_DIR, CLAN_NAME)) as f:
            clan = json.load(f)
        rounds_so_far = [r for r in history if r["global_step"] <= step and r["round"] != rounds(history)[-1]]
        assert clan["history"] == rounds_so_far, "the history up to the checkpoint, before the final evaluation"
        assert [g[0]["name"] for g in clan["genomes"]] == ["adam_beta2"] * 2
        for member in range(2):
            folder = member_dir(checkpoint, member)
            safetensors.torch.load_file(os.path.join(folder, "model.safetensors"))
            optimizer = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True)
            assert optimizer["state"], "Adam moments are saved"
            torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True)
        assert not os.path.exists(os.path.join(checkpoint, "optimizer.pt")), "no rank-0 optimizer at the top level"

    # The top level of a checkpoint is the best member by the latest fitness it holds; its weights equal that
    # member's own folder and it loads with from_pretrained.
    checkpoint = os.path.join(output_dir, "checkpoint-24")
    last = [r for r in clan["history"] if r["round"] == clan["history"][-1]["round"]]
    best = min(last, key=lambda r: r["fitness"])["member"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    own = safetensors.torch.load_file(os.path.join(member_dir(checkpoint, best), "model.safetensors"))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), own[name]), f"top level differs from member {best} at {name}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--resume", action="store_true")
    cli = parser.parse_args(argv)
    train(cli.output_dir, cli.hang_at, cli.resume)
    # As the examples end (accelerator.end_training): a gloo group left open at exit can abort a rank's teardown
    # ("terminate called without an active exception") after the run itself has finished.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
