import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import FAMILY_MODELS, randomize_adapters
from hsplitlora.lora import (
    Target, adapters, apply_lora, lora_state_dict, merge_adapters, module_path, parse_ranks, remove_lora,
)


def test_parse_ranks_covers_layers_ranges_and_single_weights():
    ranks = parse_ranks("q=8,v=4,0-1:up=16,3.down=2,2.q=0", 4)
    assert ranks[Target(0, "q")] == 8 and ranks[Target(3, "v")] == 4
    assert ranks[Target(0, "up")] == 16 and ranks[Target(1, "up")] == 16 and Target(2, "up") not in ranks
    assert ranks[Target(3, "down")] == 2 and ranks[Target(2, "q")] == 0


@pytest.mark.parametrize("spec", ["q8", "0-9:q=4", "x.q=2"])
def test_bad_rank_spec_is_refused(spec):
    with pytest.raises(ValueError):
        parse_ranks(spec, 4)


def test_unknown_projection_names_the_choices(tiny):
    model, _ = tiny("tiny-gpt2")
    with pytest.raises(ValueError, match="gate"):
        apply_lora(model, {Target(0, "gate"): 4})


def test_fresh_adapters_do_not_change_the_model_and_only_lora_trains(tiny, text_batch):
    model, tok = tiny("tiny-llama")
    ids, mask = text_batch(tok)
    before = model(input_ids=ids, attention_mask=mask).logits
    apply_lora(model, parse_ranks("q=4,v=8", 4))
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_matches_peft_lora_outputs_and_gradients(tiny, text_batch, name):
    """Same ranks, alpha and factors in peft's own LoRA layer give the same logits and grads."""
    model, tok = tiny(name)
    ids, mask = text_batch(tok)
    ranks = {Target(layer, p): 4 for layer in range(4) for p in ("q", "v")} if name == "tiny-llama" else \
        {Target(layer, p): 4 for layer in range(4) for p in ("o", "up")}
    factors = apply_lora(model, ranks, alpha=8)
    randomize_adapters(factors)
    ours = model(input_ids=ids, attention_mask=mask).logits
    ours.square().mean().backward()

    ref, _ = tiny(name)
    paths = {module_path(model, t): t for t in ranks}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=sorted(paths), lora_dropout=0.0,
                        fan_in_fan_out=name == "tiny-gpt2")
    peft_model = get_peft_model(ref, config)
    with torch.no_grad():
        for mod_name, module in peft_model.named_modules():
            stripped = mod_name.removeprefix("base_model.model.")
            if stripped in paths:
                module.lora_A["default"].weight.copy_(factors[paths[stripped]].A)
                module.lora_B["default"].weight.copy_(factors[paths[stripped]].B)
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    theirs.square().mean().backward()
    for mod_name, module in peft_model.named_modules():
        stripped = mod_name.removeprefix("base_model.model.")
        if stripped in paths:
            g = module.lora_A["default"].weight.grad
            assert torch.allclose(g, factors[paths[stripped]].A.grad, atol=1e-6, rtol=1e-4), stripped


def test_gpt2_fused_qkv_parts_have_independent_ranks_and_slices(tiny, text_batch):
    model, tok = tiny("tiny-gpt2")
    factors = apply_lora(model, {Target(0, "q"): 2, Target(0, "k"): 4, Target(0, "v"): 8})
    assert [factors[Target(0, p)].rank for p in "qkv"] == [2, 4, 8]
    d = model.config.n_embd
    assert all(f.B.shape[0] == d for f in factors.values())
    # Only the v part gets an update: the q and k thirds of c_attn's output stay as they were.
    with torch.no_grad():
        factors[Target(0, "v")].B.fill_(0.5)
    attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, d)
    delta = attn(x) - attn.base(x)
    assert delta[:, : 2 * d].abs().max() == 0 and delta[:, 2 * d :].abs().max() > 0


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_merge_folds_updates_into_weights_and_restarts_adapters(tiny, text_batch, name):
    model, tok = tiny(name)
    ids, mask = text_batch(tok)
    factors = apply_lora(model, parse_ranks("q=4,k=2,v=8,up=2", 4))
    randomize_adapters(factors)
    with_adapters = model(input_ids=ids, attention_mask=mask).logits
    merge_adapters(model)
    assert all(f.B.abs().max() == 0 for f in adapters(model).values())
    assert (model(input_ids=ids, attention_mask=mask).logits - with_adapters).abs().max() <= 1e-5
    remove_lora(model)
    assert not adapters(model)
    assert (model(input_ids=ids, attention_mask=mask).logits - with_adapters).abs().max() <= 1e-5


def test_rank_zero_removes_an_adapter_and_state_dict_names(tiny):
    model, _ = tiny("tiny-llama")
    apply_lora(model, parse_ranks("q=4,v=4", 4))
    apply_lora(model, {Target(1, "q"): 0, Target(1, "v"): 2})
    state = lora_state_dict(model)
    assert "1.q.A" not in state and state["1.v.A"].shape == (2, 32) and state["0.q.B"].shape == (32, 4)
