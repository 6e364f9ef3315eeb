"""The fitness weight average, in one process: the mean (or EMA) it keeps, the swap it evaluates under, its
checkpoint."""

import torch
from torch import nn

from clantune_hf.fitness import WeightAverage


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    model[1].weight.requires_grad_(False)  # a frozen parameter is shared, not averaged
    return model


def test_average_is_the_mean_of_the_folded_weights_and_swaps_back_exactly():
    model, average = make_model(), WeightAverage()
    snapshots = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)
        average.update(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    last = [p.detach().clone() for p in model.parameters()]
    trainable = [i for i, p in enumerate(model.parameters()) if p.requires_grad]
    frozen = model[1].weight.detach().clone()

    x = torch.randn(5, 3)
    with average.swapped_in(model):
        for i, p in enumerate(model.parameters()):
            if i in trainable:
                expected = torch.stack([s[i] for s in snapshots]).mean(0)
                torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(model[1].weight, frozen)
        at_mean = model(x)
    for p, want in zip(model.parameters(), last, strict=True):
        assert torch.equal(p.detach(), want), "the weights are back, bit for bit"
    assert not torch.allclose(at_mean, model(x))


def test_empty_average_evaluates_the_weights_as_they_are_and_reset_empties_it():
    model, average = make_model(), WeightAverage()
    before = [p.detach().clone() for p in model.parameters()]
    with average.swapped_in(model):
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    average.update(model)
    average.reset()
    assert average.state_dict() == {} and average.mean is None


def test_state_dict_round_trip_continues_the_same_mean():
    model, average = make_model(), WeightAverage()
    average.update(model)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    average.update(model)
    state = average.state_dict()
    assert int(state["count"]) == 2

    restored = WeightAverage()
    restored.load_state_dict(state, model)
    with torch.no_grad():
        model[2].bias.add_(1.0)
    average.update(model)
    restored.update(model)
    for a, b in zip(average.mean, restored.mean, strict=True):
        torch.testing.assert_close(a, b)
    restored.load_state_dict({}, model)
    assert restored.mean is None


def test_ema_is_a_plain_mean_until_its_horizon_then_exponential():
    model, average = make_model(), WeightAverage(horizon=2)
    first = model[0].weight.detach().clone()
    values = [first]
    average.update(model)
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(step + 1.0)
        values.append(model[0].weight.detach().clone())
        average.update(model)
    # Steps 1-2: the plain mean; from step 3 each new step weighs 1/2.
    expected = (values[0] + values[1]) / 2
    for value in values[2:]:
        expected = expected + (value - expected) / 2
    torch.testing.assert_close(average.mean[0], expected)
    state = average.state_dict()
    assert int(state["count"]) == 4
