import pytest
import torch

from conftest import FAMILY_MODELS, randomize_adapters
from hsplitlora.lora import apply_lora, parse_ranks
from hsplitlora.split import split_model


@pytest.mark.parametrize("name", FAMILY_MODELS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])  # 4: every block on the device, the server the head
def test_device_then_server_equals_full_model_logits(tiny, text_batch, name, k):
    model, tok = tiny(name)
    ids, mask = text_batch(tok)
    full = model(input_ids=ids, attention_mask=mask).logits
    device, server = split_model(model, k)
    h = device(ids, mask)
    assert h.shape == (*ids.shape, model.config.hidden_size)
    logits = server(h, mask)
    assert (logits - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_device_output_is_the_full_models_hidden_state_at_the_cut(tiny, text_batch, name):
    model, tok = tiny(name)
    ids, mask = text_batch(tok)
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    device, _ = split_model(model, 2)
    assert torch.allclose(device(ids, mask), hidden[2], atol=1e-6)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_split_with_lora_matches_and_gradients_flow_across_the_cut(tiny, text_batch, name):
    model, tok = tiny(name)
    factors = apply_lora(model, parse_ranks("q=4,v=4,down=2", 4))
    randomize_adapters(factors)
    ids, mask = text_batch(tok)
    full = model(input_ids=ids, attention_mask=mask).logits
    device, server = split_model(model, 2)
    h = device(ids, mask)
    # The split step as it runs on two machines: the server gets a detached copy of h.
    h_server = h.detach().requires_grad_(True)
    logits = server(h_server, mask)
    assert (logits - full).abs().max().item() <= 1e-5
    logits.square().mean().backward()
    h.backward(h_server.grad)
    split_grads = {t: f.A.grad.clone() for t, f in factors.items()}
    for f in factors.values():
        f.A.grad = None
    model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    for target, f in factors.items():
        assert torch.allclose(split_grads[target], f.A.grad, atol=1e-6), target


@pytest.mark.parametrize("k", [0, 5, -1])
def test_split_point_outside_the_model_is_refused(tiny, k):
    model, _ = tiny("tiny-llama")
    with pytest.raises(ValueError, match="split point"):
        split_model(model, k)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_segment_loss_equals_cross_entropy_of_the_full_logits(tiny, name):
    from hsplitlora.data import Example, collate
    from hsplitlora.split import whole_model

    model, tok = tiny(name)
    batch = collate(tok, [Example("mr: a", " text one"), Example("mr: bb", " two")], max_len=64)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100)
    got = whole_model(model).loss(batch.input_ids, batch.attention_mask, batch.labels)
    assert torch.allclose(got, want, atol=1e-6)
    _, server = split_model(model, 2)
    device, _ = split_model(model, 2)
    h = device(batch.input_ids, batch.attention_mask)
    assert torch.allclose(server.loss(h, batch.attention_mask, batch.labels), want, atol=1e-6)
    with pytest.raises(ValueError, match="no LM head"):
        device.loss(batch.input_ids, batch.attention_mask, batch.labels)
