import pytest
import torch

from hsplitlora.lora import apply_lora, parse_ranks
from hsplitlora.models import byte_tokenizer, load_model, resolve_model_dir
from hsplitlora.split import split_model


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Meaning representation: name[Café Zöe]\nDescription: ✓ 5 stars"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tiny_models_are_deterministic_transformers_directories(tmp_path):
    a, _ = load_model("tiny-llama")
    path = resolve_model_dir("tiny-llama")
    assert (path / "config.json").is_file()
    b, _ = load_model(str(path))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_model_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m, tiny-llama, tiny-gpt2"):
        load_model(str(tmp_path / "nothing-here"))


@pytest.mark.real_model
def test_smollm2_loads_from_the_packaged_gguf_splits_and_trains():
    """The one real-model test: SmolLM2-135M, 30 Llama blocks, split parity and a LoRA step."""
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    enc = tok(["Meaning representation: name[Aromi], eatType[pub]\nDescription:"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    factors = apply_lora(model, parse_ranks("0-3:q=4,0-3:v=4", 30))
    full = model(input_ids=ids, attention_mask=mask).logits
    device, server = split_model(model, 4)
    h = device(ids, mask)
    assert (server(h, mask) - full).abs().max().item() <= 1e-4
    # One split step: gradients reach the device-side adapters through the cut.
    h_server = h.detach().requires_grad_(True)
    server(h_server, mask)[0, -1].logsumexp(-1).backward()
    h.backward(h_server.grad)
    assert all(f.B.grad is not None and f.B.grad.abs().sum() > 0 for f in factors.values())
