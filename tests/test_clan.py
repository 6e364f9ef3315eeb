"""The clan round on 2 and 4 real CPU ranks (gloo), checked against references in tests/clan_checks.py."""

import clan_checks
import pytest
from testing_utils import run_clan


@pytest.mark.parametrize("num_processes", [2, 4])
def test_cooperative_gradients_are_all_reduced_and_members_diverge(tmp_path, num_processes):
    run_clan(clan_checks.check_cooperative, num_processes, str(tmp_path))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_competitive_steps_share_data_not_gradients(tmp_path, num_processes):
    run_clan(clan_checks.check_competitive, num_processes, str(tmp_path))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_clone_copies_weights_buffers_and_optimizer_state_bit_for_bit(tmp_path, num_processes):
    run_clan(clan_checks.check_clone, num_processes, str(tmp_path))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_clone_copies_its_sources_fitness_ema_bit_for_bit(tmp_path, num_processes):
    run_clan(clan_checks.check_clone, num_processes, str(tmp_path), 3)


def test_holding_the_best_copies_it_bit_for_bit_while_the_clan_improves(tmp_path):
    run_clan(clan_checks.check_hold, 4, str(tmp_path))


def test_fitness_is_measured_at_the_ema_of_the_weights(tmp_path):
    run_clan(clan_checks.check_fitness_ema, 2, str(tmp_path))


def test_a_resumed_run_keeps_its_fitness_ema(tmp_path):
    run_clan(clan_checks.check_fitness_ema_resume, 2, str(tmp_path))


def test_a_far_off_member_trains_alone_while_the_others_share(tmp_path):
    run_clan(clan_checks.check_soloist, 4, str(tmp_path))


def test_the_members_far_from_the_last_rounds_best_train_alone(tmp_path):
    run_clan(clan_checks.check_soloists_follow_the_best, 4, str(tmp_path))


@pytest.mark.parametrize("num_processes, scaling", [(2, True), (4, True), (4, False)])
def test_the_window_scales_a_sharing_members_learning_rate_by_the_square_root_rule(tmp_path, num_processes, scaling):
    run_clan(clan_checks.check_window_learning_rate, num_processes, str(tmp_path), scaling)


@pytest.mark.parametrize("num_processes", [2, 4])
def test_selection_agrees_spares_the_best_and_ranks_nan_last(tmp_path, num_processes):
    run_clan(clan_checks.check_selection, num_processes, str(tmp_path))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_selection_waits_for_the_warmup(tmp_path, num_processes):
    run_clan(clan_checks.check_selection_waits_for_the_warmup, num_processes, str(tmp_path))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_training_ends_with_the_best_member_on_every_rank(tmp_path, num_processes):
    run_clan(clan_checks.check_final, num_processes, str(tmp_path))


def test_plain_training_arguments_are_promoted(tmp_path):
    run_clan(clan_checks.check_promotes_training_arguments, 2, str(tmp_path))


def test_selection_waits_for_a_significant_margin(tmp_path):
    run_clan(clan_checks.check_selection_waits_for_a_significant_margin, 4, str(tmp_path))


def test_fitness_can_be_a_compute_metrics_metric(tmp_path):
    run_clan(clan_checks.check_metric_fitness, 2, str(tmp_path))


@pytest.mark.parametrize("num_processes", [2, 4])
def test_a_rank_short_of_data_does_not_hang_the_clan(tmp_path, num_processes):
    run_clan(clan_checks.check_short_data, num_processes, str(tmp_path))
