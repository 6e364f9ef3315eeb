"""Members sharded over several ranks (`ranks_per_member`): 4 real CPU ranks as 2 members x 2 FSDP2 shards, checked
against unsharded references in tests/sharded_checks.py."""

import pytest
import sharded_checks
from testing_utils import PatternDataset, run_clan, tiny_gpt2

from clantune_hf import ClanConfig, ClanTrainer


@pytest.mark.parametrize("accumulation", [False, True], ids=["fixed", "accumulation_gene"])
def test_gradients_follow_the_phase_and_data_is_shared_per_shard(tmp_path, accumulation):
    run_clan(sharded_checks.check_gradients_and_data, 4, str(tmp_path), accumulation)


def test_a_far_off_member_trains_alone_on_its_own_shards(tmp_path):
    run_clan(sharded_checks.check_soloist, 6, str(tmp_path))


def test_a_nan_member_skips_its_update_and_is_replaced(tmp_path):
    run_clan(sharded_checks.check_nan_member, 4, str(tmp_path))


def test_clones_fitness_and_saved_model(tmp_path):
    run_clan(sharded_checks.check_clone_fitness_and_save, 4, str(tmp_path))


def test_resume_equals_an_uninterrupted_run(tmp_path):
    run_clan(sharded_checks.check_resume, 4, str(tmp_path))


def _refused_layouts(output_dir):
    for ranks, words in ((3, "does not divide"), (4, "at least 2")):
        args = ClanConfig(output_dir=output_dir, ranks_per_member=ranks, max_steps=4, round_steps=2, report_to="none")
        with pytest.raises(ValueError, match=rf"ranks_per_member={ranks}.*{words}"):
            ClanTrainer(model=tiny_gpt2(), args=args, train_dataset=PatternDataset(8), eval_dataset=PatternDataset(4))
    args = ClanConfig(output_dir=output_dir, ranks_per_member=2, max_steps=4, round_steps=2, report_to="none")
    with pytest.raises(ValueError, match="model_init"):
        data = {"train_dataset": PatternDataset(8), "eval_dataset": PatternDataset(4)}
        ClanTrainer(model_init=lambda: tiny_gpt2(), args=args, **data)


def test_layouts_that_make_no_clan_are_refused_at_init(tmp_path):
    run_clan(_refused_layouts, 4, str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"ranks_per_member": 0}, "ranks_per_member"),
        ({"ranks_per_member": 1.5}, "ranks_per_member"),
        ({"ranks_per_member": 2, "fitness_average_window": 0.5}, "fitness_average_window"),
        ({"ranks_per_member": 2, "fitness_ema_steps": 12}, "fitness_ema_steps"),
    ],
)
def test_bad_ranks_per_member_settings_are_refused(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClanConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_lora_adapters_over_a_sharded_base(tmp_path):
    pytest.importorskip("peft")
    run_clan(sharded_checks.check_lora, 4, str(tmp_path))
