"""ClanConfig: the two knobs, the genes field, the command line, and what is refused before any compute."""

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from clantune_hf import ClanConfig
from clantune_hf.clan_config import default_hold_confidence


def config(tmp_path, **kwargs):
    return ClanConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_defaults(tmp_path):
    args = config(tmp_path)
    assert (args.round_steps, args.duty_cycle) == (200, 0.08)
    assert list(args.genes) == ["learning_rate", "weight_decay"]
    assert args.ddp_broadcast_buffers is None  # the clan turns DDP's buffer sync off itself, with no warning
    assert config(tmp_path, ddp_broadcast_buffers=False).ddp_broadcast_buffers is None
    assert isinstance(args, TrainingArguments)
    search = (args.initial_spread, args.step_size_control, args.mirrored_clones, args.resample_probability)
    assert search == ("stratified", "success", True, 0.25)
    assert (args.selection_fraction, args.fitness_average_window, args.fitness_ema_steps) == (0.25, 0.0, 25)
    assert args.window_lr_scaling is True and args.select_in_warmup is True
    assert (args.solo_radius, args.solo_center) == (0.25, "best")


@pytest.mark.parametrize(
    "round_steps, duty_cycle, cooperative",
    [
        (200, 0.08, 184),  # the defaults: 16 competitive steps
        (25, 0.08, 23),
        (4, 0.08, 3),  # rounds to 4, but a duty cycle above 0 keeps one competitive step
        (4, 0.95, 1),  # rounds to 0, but a duty cycle below 1 keeps one cooperative step
        (4, 0.0, 4),
        (4, 1.0, 0),
        (1, 0.5, 0),  # one step cannot hold both phases
    ],
)
def test_cooperative_steps_keep_both_phases_of_a_duty_cycle(tmp_path, round_steps, duty_cycle, cooperative):
    args = config(tmp_path, round_steps=round_steps, duty_cycle=duty_cycle)
    assert args.cooperative_steps == cooperative


def test_members_are_ranked_at_an_ema_unless_sharded_or_given_a_window(tmp_path):
    assert config(tmp_path).fitness_ema_steps == 25
    assert config(tmp_path, ranks_per_member=2).fitness_ema_steps == 0
    assert config(tmp_path, fitness_average_window=0.5).fitness_ema_steps == 0
    assert config(tmp_path, fitness_ema_steps=0).fitness_ema_steps == 0  # an explicit value is kept
    assert config(tmp_path, fitness_ema_steps=7).fitness_ema_steps == 7
    # The resolved value round-trips: a config rebuilt from to_dict() ranks the same way.
    assert (
        config(tmp_path, **{"fitness_ema_steps": config(tmp_path).to_dict()["fitness_ema_steps"]}).fitness_ema_steps
        == 25
    )


def test_holding_the_best_is_left_to_the_clan_size_unless_set(tmp_path):
    assert config(tmp_path).hold_confidence is None  # ClanTrainer sets it from the clan's size
    assert [default_hold_confidence(size) for size in (2, 4, 7, 8, 16)] == [0.0, 0.0, 0.0, 0.99, 0.99]
    assert config(tmp_path, hold_confidence=0.0).hold_confidence == 0.0  # an explicit value is kept
    assert config(tmp_path, hold_confidence=0.9).hold_confidence == 0.9


def test_the_run_cools_down_unless_its_schedule_has_a_decay_phase_of_its_own(tmp_path):
    assert config(tmp_path).cooldown_fraction == 0.2
    assert config(tmp_path, lr_scheduler_type="constant").cooldown_fraction == 0.2
    wsd = config(tmp_path, lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"num_decay_steps": 5})
    assert wsd.cooldown_fraction == 0.0
    assert config(tmp_path, cooldown_fraction=0.0).cooldown_fraction == 0.0  # an explicit value is kept
    assert config(tmp_path, cooldown_fraction=0.5).cooldown_fraction == 0.5
    # The resolved value round-trips: a config rebuilt from to_dict() cools down the same way.
    assert ClanConfig(**config(tmp_path).to_dict()).cooldown_fraction == 0.2


def test_the_contract_example(tmp_path):
    args = config(tmp_path, round_steps=15, duty_cycle=0.2, max_steps=90, learning_rate=3e-4,
                  genes=["learning_rate", "weight_decay", "adam_beta2", "max_grad_norm"],
                  per_device_train_batch_size=8)  # fmt: skip
    assert list(args.genes) == ["learning_rate", "weight_decay", "adam_beta2", "max_grad_norm"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"duty_cycle": -0.1}, "duty_cycle"),
        ({"duty_cycle": 1.5}, "duty_cycle"),
        ({"round_steps": 0}, "round_steps"),
        ({"genes": ["learning_rate", "lr"]}, "genes"),
        ({"genes": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}, "genes"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed"),
        ({"fsdp": "full_shard"}, "fsdp"),
        ({"ddp_broadcast_buffers": True}, "ddp_broadcast_buffers"),
        ({"round_steps": 100, "max_steps": 50}, "round_steps"),
        ({"selection_fraction": 0.9}, "selection_fraction"),
        ({"hold_confidence": 1.0}, "hold_confidence"),
        ({"hold_confidence": "high"}, "hold_confidence"),
        ({"fp16": True}, "fp16"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        config(tmp_path, **kwargs)


def test_duty_cycle_bounds_are_inclusive(tmp_path):
    assert config(tmp_path, duty_cycle=0.0).duty_cycle == 0.0
    assert config(tmp_path, duty_cycle=1.0).duty_cycle == 1.0


def test_command_line_takes_names_and_json(tmp_path):
    parser = HfArgumentParser(ClanConfig)
    argv = f"--output_dir {tmp_path} --genes learning_rate dropout --round_steps 7 --duty_cycle 0.3".split()
    (args,) = parser.parse_args_into_dataclasses(argv)
    assert list(args.genes) == ["learning_rate", "dropout"] and args.round_steps == 7 and args.duty_cycle == 0.3
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--genes", '{"learning_rate": {"low": 1e-5, "high": 1e-2}}']
    )
    assert args.genes == {"learning_rate": {"low": 1e-5, "high": 1e-2}}


def test_command_line_sets_the_search(tmp_path):
    parser = HfArgumentParser(ClanConfig)
    argv = (
        f"--output_dir {tmp_path} --initial_spread local --step_size_control self_adaptive --mirrored_clones False "
        "--resample_probability 0.1 --fitness_average_window 0 --window_lr_scaling False --fitness_ema_steps 25 "
        "--select_in_warmup False --solo_center median"
    ).split()
    (args,) = parser.parse_args_into_dataclasses(argv)
    assert (args.initial_spread, args.step_size_control, args.mirrored_clones) == ("local", "self_adaptive", False)
    assert (args.resample_probability, args.fitness_average_window, args.window_lr_scaling) == (0.1, 0.0, False)
    assert args.fitness_ema_steps == 25 and args.select_in_warmup is False and args.solo_center == "median"
    with pytest.raises(SystemExit):  # argparse names the field and its choices
        parser.parse_args_into_dataclasses(f"--output_dir {tmp_path} --initial_spread uniform".split())


def test_config_round_trips_through_to_dict(tmp_path):
    args = config(tmp_path, genes={"dropout": {"high": 0.4}}, round_steps=9)
    again = ClanConfig(**args.to_dict())
    assert again.genes == args.genes and again.round_steps == 9


def test_a_gene_of_your_own_from_the_command_line(tmp_path):
    parser = HfArgumentParser(ClanConfig)
    genes = '{"learning_rate": {}, "aux": {"value": 0.5, "low": 0, "high": 2, "expression": "model.config.aux"}}'
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--genes", genes])
    assert args.genes["aux"] == {"value": 0.5, "low": 0.0, "high": 2.0, "expression": "model.config.aux"}


def test_a_callable_expression_is_logged_by_its_name(tmp_path):
    args = config(tmp_path, genes={"aux": {"value": 0.5, "low": 0, "high": 2, "expression": lambda t, v: None}})
    assert callable(args.genes["aux"]["expression"])
    described = json.loads(args.to_json_string())["genes"]["aux"]["expression"]
    assert described.startswith("<callable ") and "lambda" in described


def test_the_accumulation_gene_needs_max_steps(tmp_path):
    with pytest.raises(ValueError, match="`gradient_accumulation_steps` gene"):
        config(tmp_path, genes=["gradient_accumulation_steps"], num_train_epochs=2)
    args = config(tmp_path, genes=["gradient_accumulation_steps"], gradient_accumulation_steps=4, max_steps=400)
    assert args.genes == {"gradient_accumulation_steps": {}}
