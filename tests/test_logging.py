"""Where users look: per-round clan scalars in TensorBoard (read back from the event files) and the model card that
`save_model` writes. One 2-member run feeds both tests."""

import glob
import json
import math
import os

import pytest
import torch.distributed as dist
from testing_utils import PatternDataset, run_clan, tiny_gpt2

from clantune_hf import ClanConfig, ClanTrainer

ROUND_STEPS, MAX_STEPS = 4, 12


def train_and_save(output_dir: str) -> None:
    args = ClanConfig(
        output_dir=output_dir,
        round_steps=ROUND_STEPS,
        duty_cycle=0.5,
        genes=["learning_rate", "weight_decay", "dropout"],
        max_steps=MAX_STEPS,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        logging_steps=ROUND_STEPS,
        report_to="tensorboard",
        save_strategy="no",
        seed=1,
    )
    trainer = ClanTrainer(
        model=tiny_gpt2(), args=args, train_dataset=PatternDataset(96), eval_dataset=PatternDataset(16, 1)
    )
    trainer.train()
    trainer.save_model()
    if dist.get_rank() == 0:
        # What the Trainer's log history holds is what every report_to integration was handed.
        clan_logs = [entry for entry in trainer.state.log_history if "clan/fitness_min" in entry]
        with open(os.path.join(output_dir, "clan_logs.json"), "w") as f:
            json.dump(clan_logs, f)


@pytest.fixture(scope="module")
def clan_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("logging"))
    run_clan(train_and_save, 2, output_dir)
    with open(os.path.join(output_dir, "clan_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    return output_dir, history


def read_scalars(output_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    event_files = glob.glob(os.path.join(output_dir, "runs", "*", "events.out.tfevents.*"))
    assert event_files, f"no TensorBoard event files under {output_dir}/runs"
    for path in event_files:  # the final round is logged after on_train_end closed the first writer
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = event.value
    return scalars


def test_round_scalars_reach_tensorboard(clan_run):
    output_dir, history = clan_run
    scalars = read_scalars(output_dir)
    rounds = sorted({r["round"] for r in history})
    assert len(rounds) == MAX_STEPS // ROUND_STEPS, f"expected {MAX_STEPS // ROUND_STEPS} rounds, got {rounds}"
    for round_index in rounds:
        records = [r for r in history if r["round"] == round_index]
        step = records[0]["global_step"]
        fitness = [r["fitness"] for r in records]
        expected = {
            "train/clan/fitness_min": min(fitness),
            "train/clan/fitness_max": max(fitness),
            "train/clan/fitness_median": sorted(fitness)[0] / 2 + sorted(fitness)[1] / 2,
            "train/clan/replaced": sum(r["parent"] is not None for r in records),
        }
        for r in records:
            prefix = f"train/clan/member_{r['member']}"
            expected[f"{prefix}/fitness"] = r["fitness"]
            expected.update({f"{prefix}/{name}": value for name, value in r["genes"].items()})
            if r["parent"] is not None:
                expected[f"{prefix}/cloned_from"] = r["parent"]
        for tag, value in expected.items():
            assert tag in scalars and step in scalars[tag], f"round {round_index}: {tag} not logged at step {step}"
            assert math.isclose(scalars[tag][step], value, rel_tol=1e-5), (
                f"{tag}@{step}: {scalars[tag][step]} != {value}"
            )
        for r in records:  # a clone event is logged exactly in the rounds that replaced the member
            tag = f"train/clan/member_{r['member']}/cloned_from"
            assert (step in scalars.get(tag, {})) == (r["parent"] is not None), f"{tag} at step {step}"
    clones = [r for r in history if r["parent"] is not None]
    assert clones, "no clone event in the run: the test cannot check how clone events are logged"


def test_model_card_shows_the_clan_and_its_schedule(clan_run):
    output_dir, history = clan_run
    with open(os.path.join(output_dir, "README.md")) as f:
        card = f.read()
    with open(os.path.join(output_dir, "clan_schedule.json")) as f:
        schedule = json.load(f)
    assert card.startswith("---\n") and "library_name: transformers" in card and "clan-training" in card
    assert "**2 members**" in card and f"**{ROUND_STEPS} steps**" in card and "**duty cycle 0.5**" in card
    assert "learning rate times √(1/k)" in card and "`window_lr_scaling`" in card
    assert "exponential moving average of its weights over about 25 steps (`fitness_ema_steps`)" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and "–" in line.split("|")[1]]
    assert len(rows) == len(schedule["segments"]), f"schedule table rows {rows}"
    for row, segment in zip(rows, schedule["segments"], strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == f"{segment['start_step']}–{segment['end_step']}" and cells[1] == str(segment["member"])
        values = [float(cell) for cell in cells[3:]]
        expected = [segment["genes"][name] for name in sorted(segment["genes"])]
        assert all(math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-12) for a, b in zip(values, expected, strict=True))
    assert "ScheduleReplayCallback" in card
