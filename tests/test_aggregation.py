import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.aggregation import AGGREGATORS, ClientUpdate, aggregation_error, exact_update
from hsplitlora.aggregation.flexlora import truncated_svd


def _updates(seed, ranks, d_in=24, d_out=16, alpha=16.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(f"c{k}", torch.randn(r, d_in, generator=gen, dtype=dtype),
                     torch.randn(d_out, r, generator=gen, dtype=dtype), alpha / r, float(10 + 7 * k))
        for k, r in enumerate(ranks)
    ]


def _exact_sum(updates):
    total = sum(u.weight for u in updates)
    return sum(u.weight / total * u.scale * u.B @ u.A for u in updates)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=1, max_size=6),
       absent=st.sets(st.integers(0, 5)))
def test_naa_equals_the_weighted_sum_of_ba_exactly_in_any_order(seed, ranks, absent):
    updates = _updates(seed, ranks)
    # Missing participants: clients that did not adapt this weight are simply not in the list.
    present = [u for k, u in enumerate(updates) if k not in absent] or updates[:1]
    target = _exact_sum(present)
    result = AGGREGATORS["naa"](present)
    assert result.client_factors is None  # nothing to continue from: the update is merged
    got = result.global_update.dense()
    assert (got - target).norm() / target.norm() <= 1e-12
    shuffled = present[:]
    random.Random(seed).shuffle(shuffled)
    assert (AGGREGATORS["naa"](shuffled).global_update.dense() - target).norm() / target.norm() <= 1e-12


def test_weights_are_normalised_over_the_clients_that_adapted_the_weight():
    updates = _updates(0, [4, 4])
    alone = AGGREGATORS["naa"](updates[:1]).global_update.dense()
    assert torch.allclose(alone, updates[0].delta())  # one participant: its update, not a shrunk one


def test_fedavg_adds_cross_term_noise_that_naa_does_not():
    updates = _updates(1, [4, 4, 4])
    fedavg = aggregation_error(AGGREGATORS["fedavg"](updates), updates)
    naa = aggregation_error(AGGREGATORS["naa"](updates), updates)
    assert naa["global"] <= 1e-12 and naa["clients"] <= 1e-12
    assert fedavg["global"] > 0.1, fedavg  # independent random factors: the cross terms dominate


def test_fedavg_is_exact_when_all_clients_hold_the_same_factors():
    base = _updates(2, [4])[0]
    same = [ClientUpdate(f"c{k}", base.A, base.B, base.scale, 1.0 + k) for k in range(3)]
    assert aggregation_error(AGGREGATORS["fedavg"](same), same)["global"] <= 1e-12


def test_fedavg_refuses_unequal_ranks():
    with pytest.raises(ValueError, match="one rank"):
        AGGREGATORS["fedavg"](_updates(3, [2, 4]))


def test_hetlora_pads_averages_and_truncates_back_to_each_rank():
    updates = _updates(4, [2, 4, 8])
    result = AGGREGATORS["hetlora"](updates)
    assert [result.client_factors[u.client][0].shape[0] for u in updates] == [2, 4, 8]
    err = aggregation_error(result, updates)
    assert err["global"] > 0.1 and err["clients"] > err["global"] * 0.5, err


def test_flexlora_global_update_is_exact_and_clients_get_the_best_rank_r_approximation():
    updates = _updates(5, [2, 4, 8])
    result = AGGREGATORS["flexlora"](updates)
    err = aggregation_error(result, updates)
    assert err["global"] <= 1e-12
    target = _exact_sum(updates)
    s = torch.linalg.svdvals(target)
    for u in updates:
        a, b = result.client_factors[u.client]
        got = (u.scale * b @ a - target).norm()
        # Eckart-Young: the truncation error of the best rank-r approximation.
        assert torch.isclose(got, s[u.rank:].norm(), rtol=1e-9), u.client
    assert err["clients"] > 0


def test_truncated_svd_of_factors_matches_dense_svd():
    update = exact_update(_updates(6, [3, 5]))
    u, s, vh = truncated_svd(update)
    assert torch.allclose(u * s @ vh, update.dense(), atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(update.dense())[: s.shape[0]], atol=1e-10)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_bad_inputs_are_refused(name):
    with pytest.raises(ValueError, match="no client"):
        AGGREGATORS[name]([])
    a, b = _updates(7, [4]), _updates(8, [4], d_in=12)
    with pytest.raises(ValueError, match="shape"):
        AGGREGATORS[name]([a[0], ClientUpdate("x", b[0].A, b[0].B, b[0].scale, 1.0)])
