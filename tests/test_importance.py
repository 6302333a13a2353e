import pytest

from conftest import FAMILY_MODELS
from hsplitlora.data import Example, collate
from hsplitlora.importance import (
    ImportanceTracker,
    all_targets,
    fill_unscored,
    mean_scores,
    resource_normalised,
    sensitivity,
)
from hsplitlora.lora import Target, apply_lora, lora_layer, parse_ranks
from hsplitlora.split import split_model, whole_model


def _batch(tok):
    return collate(tok, [Example("name[Aromi]:", " a pub"), Example("name[Zizzi]:", " cheap food")], 64)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_hook_scores_equal_mean_abs_weight_times_autograd_weight_gradient(tiny, name):
    model, tok = tiny(name)
    apply_lora(model, parse_ranks("1.q=4", 4))  # an adapter present must not change the frozen W's score
    batch = _batch(tok)
    net = whole_model(model)
    targets = all_targets(model, layers=[0, 2])
    got = sensitivity(model, targets, lambda: net.loss(batch.input_ids, batch.attention_mask, batch.labels))

    # Reference: let autograd form the full weight gradients.
    for t in targets:
        lora_layer(model, t).base.weight.requires_grad_(True)
    net.loss(batch.input_ids, batch.attention_mask, batch.labels).backward()
    for t in targets:
        layer = lora_layer(model, t)
        lo, hi = layer.slices[t.proj]
        w, g = layer.base.weight, layer.base.weight.grad
        if layer.transposed:
            w, g = w[:, lo:hi], g[:, lo:hi]
        else:
            w, g = w[lo:hi], g[lo:hi]
        want = float((w * g).abs().mean().detach())
        assert got[t] == pytest.approx(want, rel=1e-4), t


def test_scores_on_the_server_segment_from_received_activations(tiny):
    model, tok = tiny("tiny-llama")
    batch = _batch(tok)
    device, server = split_model(model, 2)
    h = device(batch.input_ids, batch.attention_mask).detach()
    targets = all_targets(model, layers=[2, 3])
    scores = sensitivity(model, targets, lambda: server.loss(h, batch.attention_mask, batch.labels))
    assert all(s > 0 for s in scores.values())


def test_profiling_leaves_no_gradients_on_adapters(tiny):
    model, tok = tiny("tiny-llama")
    factors = apply_lora(model, parse_ranks("q=2", 4))
    batch = _batch(tok)
    net = whole_model(model)
    sensitivity(model, all_targets(model), lambda: net.loss(batch.input_ids, batch.attention_mask, batch.labels))
    assert all(p.grad is None for f in factors.values() for p in f.parameters())


def test_resource_normalisation_divides_by_relative_adapter_cost(tiny):
    model, _ = tiny("tiny-llama")  # q: 32 -> 32, up: 32 -> 64
    scores = {Target(0, "q"): 1.0, Target(0, "up"): 1.0}
    norm = resource_normalised(model, scores)
    assert norm[Target(0, "q")] / norm[Target(0, "up")] == pytest.approx((32 + 64) / (32 + 32))
    # The scale is the model's, not the subset's: a device scoring its blocks and the server scoring
    # the rest give the numbers one pass over everything gives.
    every = {t: 1.0 for t in all_targets(model)}
    assert resource_normalised(model, {Target(0, "q"): 1.0})[Target(0, "q")] == resource_normalised(model, every)[Target(0, "q")]


def test_tracker_smooths_with_rising_history_weight():
    tracker = ImportanceTracker(beta_start=0.2, beta_end=0.8)
    a, b = Target(0, "q"), Target(0, "v")
    tracker.update({a: 1.0, b: 0.0}, progress=0.0)
    early = tracker.update({a: 0.0, b: 1.0}, progress=0.0)
    assert early[a] == pytest.approx(0.2) and early[b] == pytest.approx(0.8)
    late = ImportanceTracker(beta_start=0.2, beta_end=0.8)
    late.update({a: 1.0}, progress=1.0)
    assert late.update({a: 0.0}, progress=1.0)[a] == pytest.approx(0.8)
    assert tracker.ranking() == [b, a]


def test_unscored_weights_take_the_mean_of_their_projection():
    scored = {Target(2, "q"): 1.0, Target(3, "q"): 3.0, Target(3, "v"): 5.0}
    targets = [Target(i, p) for i in range(4) for p in ("q", "v", "o")]
    filled = fill_unscored(scored, targets)
    assert set(filled) == set(targets)
    assert filled[Target(3, "q")] == 3.0 and filled[Target(0, "q")] == 2.0 and filled[Target(0, "v")] == 5.0
    assert filled[Target(1, "o")] == pytest.approx(3.0)  # no 'o' scored anywhere: the mean of all
    assert mean_scores([{Target(0, "q"): 1.0}, {Target(0, "q"): 3.0, Target(5, "v"): 2.0}]) == {
        Target(0, "q"): 2.0, Target(5, "v"): 2.0}
