"""The analytic cost model of a device segment: memory, FLOPs and traffic per training step.

The planner (hsplitlora.planner) searches split points and LoRA ranks with these numbers, so
they must be cheap (no model is built) and must not under-count what training really holds.

What the device segment holds (design §3.3): the frozen embeddings and blocks[0:split] (never
the LM head, tied or not: it lives on the server), the tensors autograd saves for backward, the
LoRA factors with their gradients and Adam moments, and the two cut buffers (h going up,
dL/dh coming down). Everything is counted in bytes, as exact integers.

Activations are a per-token-per-block element count read off what autograd keeps for one
fully adapted block in training mode, with eager (or SDPA "math") attention, measured with
`torch.autograd.graph.saved_tensors_hooks` on transformers 5.24 / torch 2.13 (the tests
re-measure it). With e = heads * head_dim (= d in every supported model):

  Llama  4d + 4e + 4f + 2 + hT : for each of the two norms its input and output (4d) and
         its rstd scalar (2); q after RoPE, k and v after repeat_kv, the attention output
         (4e); gate, up, silu(gate), silu(gate) * up (4f); the softmax probabilities (hT).
  GPT-2  4d + 4e + 5f + 4 + hT : as Llama with two LayerNorms (mean and rstd each: 4), and
         c_fc's output plus the four intermediates gelu_new's tanh formula keeps (5f).
  Dropout p > 0 (GPT-2's default 0.1) adds a float mask and the dropped copy of the
  probabilities (2hT), and on the residual branches two float masks (2d).

This is exact for blocks 1..s-1 and a slight over-count for block 0 (its input needs no
gradient, so its first norm saves nothing); PyTorch's fused SDPA kernels save less (no hT
term). So it is an upper bound, which is the safe side for a budget. Each adapter also saves
its r-wide intermediate x @ A^T. SmolLM2-135M, batch 4 x 128: 11,906 floats per token, 24.4 MB
per block, more than its 14.2 MB of frozen weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hsplitlora.family import FAMILIES
from hsplitlora.lora import Target

LORA_BYTES_PER_PARAM = 16  # fp32 parameter + gradient + Adam's two moments, 4 bytes each
_LLAMA_TYPES = {"llama", "mistral", "qwen2"}


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a decoder that the cost model needs; built from a transformers config."""

    family: str  # "llama" or "gpt2" (hsplitlora.family)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    positions: int = 0  # GPT-2's learned position table (rows); Llama uses rotary tables, no params
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attn_dropout: bool = False  # training-mode dropout on attention probabilities (saves a mask)
    resid_dropout: bool = False  # training-mode dropout on the two residual branches
    mlp_saved: int = 4  # tensors of width `intermediate` saved per token by the MLP (see module doc)

    @classmethod
    def from_config(cls, config) -> ModelDims:
        kind = config.model_type
        if kind == "gpt2":
            d = config.n_embd
            return cls(
                family="gpt2", hidden=d, intermediate=config.n_inner or 4 * d, layers=config.n_layer,
                heads=config.n_head, kv_heads=config.n_head, head_dim=d // config.n_head,
                vocab=config.vocab_size, tied_embeddings=bool(config.tie_word_embeddings),
                positions=config.n_positions, qkv_bias=True, o_bias=True, mlp_bias=True,
                attn_dropout=config.attn_pdrop > 0, resid_dropout=config.resid_pdrop > 0,
                # gelu_new is written out in tanh form: autograd keeps 4 intermediates + the input;
                # a fused activation keeps only its input (plus c_proj's input, its output).
                mlp_saved=5 if config.activation_function == "gelu_new" else 2,
            )
        if kind in _LLAMA_TYPES:
            d, h = config.hidden_size, config.num_attention_heads
            bias = getattr(config, "attention_bias", None)
            return cls(
                family="llama", hidden=d, intermediate=config.intermediate_size,
                layers=config.num_hidden_layers, heads=h,
                kv_heads=getattr(config, "num_key_value_heads", None) or h,
                head_dim=getattr(config, "head_dim", None) or d // h, vocab=config.vocab_size,
                tied_embeddings=bool(config.tie_word_embeddings),
                qkv_bias=bool(bias) if bias is not None else kind == "qwen2",  # Qwen2: q/k/v biased
                o_bias=bool(bias), mlp_bias=bool(getattr(config, "mlp_bias", False)),
                attn_dropout=getattr(config, "attention_dropout", 0.0) > 0,
            )
        raise ValueError(f"model type {kind!r} is not supported by the cost model")

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(FAMILIES[self.family].projections)

    def weight_shape(self, proj: str) -> tuple[int, int]:
        """(d_in, d_out) of one adaptable weight; GPT-2's q/k/v are thirds of c_attn (d x d)."""
        d, f = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
                  "down": (f, d)}
        if self.family == "gpt2":
            shapes.pop("gate")
        if proj not in shapes:
            raise ValueError(f"projection {proj!r} does not exist in {self.family} models")
        return shapes[proj]

    def block_matmul_params(self) -> int:
        """Weights of one block that take part in matmuls (the FLOPs model)."""
        return sum(i * o for i, o in map(self.weight_shape, self.projections))

    def block_params(self) -> int:
        """Every parameter of one block: matmul weights, biases and norm weights."""
        d, f = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = self.qkv_bias * (q + 2 * kv) + self.o_bias * d
        biases += self.mlp_bias * ((2 if self.family == "llama" else 1) * f + d)
        norms = 2 * d if self.family == "llama" else 4 * d  # RMSNorm: weight; LayerNorm: weight + bias
        return self.block_matmul_params() + biases + norms

    def embedding_params(self) -> int:
        return (self.vocab + self.positions) * self.hidden

    def activations_per_token(self, seq: int) -> int:
        """Elements autograd saves per token in one fully adapted block (module docstring)."""
        d, e, f, h = self.hidden, self.heads * self.head_dim, self.intermediate, self.heads
        stats = 2 if self.family == "llama" else 4
        n = 4 * d + 4 * e + self.mlp_saved * f + stats + h * seq
        n += self.attn_dropout * 2 * h * seq + self.resid_dropout * 2 * d
        return n


@dataclass(frozen=True)
class StepShape:
    """One training step's batch: `batch` sequences of `seq` tokens."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class MemoryBreakdown:
    """Device memory of one training step, in bytes."""

    frozen_weights: int
    activations: int
    lora: int
    buffers: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.activations + self.lora + self.buffers

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    @classmethod
    def from_dict(cls, data: dict) -> MemoryBreakdown:
        return cls(*(int(data[k]) for k in ("frozen_weights", "activations", "lora", "buffers")))


def lora_bytes(target_shape: tuple[int, int], rank: int) -> int:
    """Parameters + gradients + Adam moments of one rank-r adapter on a (d_in, d_out) weight."""
    d_in, d_out = target_shape
    return LORA_BYTES_PER_PARAM * rank * (d_in + d_out)


def adapter_memory(dims: ModelDims, target: Target, rank: int, shape: StepShape,
                   bytes_per_param: int = 4) -> int:
    """All the memory one adapter adds: `lora_bytes` plus its saved r-wide intermediate."""
    return lora_bytes(dims.weight_shape(target.proj), rank) + shape.tokens * rank * bytes_per_param


def adapter_flops(dims: ModelDims, target: Target, rank: int, shape: StepShape) -> int:
    """LoRA FLOPs: forward (x A^T, then B) 2 x tokens x r x (d_in + d_out); backward twice that."""
    d_in, d_out = dims.weight_shape(target.proj)
    return 6 * shape.tokens * rank * (d_in + d_out)


def _device_ranks(ranks: dict[Target, int], split: int) -> dict[Target, int]:
    # A client's rank map may include its server-side adapters; only blocks < split are on the device.
    return {t: r for t, r in ranks.items() if t.layer < split and r > 0}


def _check_split(dims: ModelDims, split: int) -> None:
    if not 0 <= split <= dims.layers:
        raise ValueError(f"split {split} is outside 0..{dims.layers}")


def device_memory(dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape,
                  bytes_per_param: int = 4) -> MemoryBreakdown:
    """Memory of the device segment (embeddings + blocks[0:split] + their adapters) for one step.

    Frozen weights and activations use `bytes_per_param` (the compute dtype); LoRA state is
    always fp32. Transient backward buffers and allocator slack are not modelled: that is what
    the planner's reserve is for.
    """
    _check_split(dims, split)
    on_device = _device_ranks(ranks, split)
    frozen = (dims.embedding_params() + split * dims.block_params()) * bytes_per_param
    acts = split * shape.tokens * dims.activations_per_token(shape.seq) * bytes_per_param
    acts += sum(shape.tokens * r * bytes_per_param for r in on_device.values())
    lora = sum(lora_bytes(dims.weight_shape(t.proj), r) for t, r in on_device.items())
    buffers = 2 * shape.tokens * dims.hidden * bytes_per_param  # h sent up + dL/dh received
    return MemoryBreakdown(frozen, acts, lora, buffers)


def device_flops(dims: ModelDims, split: int, ranks: dict[Target, int], shape: StepShape) -> float:
    """FLOPs of one device step: forward + backward of blocks[0:split] and their adapters.

    Per block: frozen matmuls 2 x tokens x P forward and the same again for the input gradient
    (no weight gradient: frozen); attention QK^T and PV are 2 x tokens x T x e each forward and
    twice that backward (both operands need gradients): 12 x tokens x T x e in all. Norms,
    activations functions and the embedding lookup are elementwise: ignored.
    """
    _check_split(dims, split)
    e = dims.heads * dims.head_dim
    per_block = 4 * shape.tokens * dims.block_matmul_params() + 12 * shape.tokens * shape.seq * e
    lora = sum(adapter_flops(dims, t, r, shape) for t, r in _device_ranks(ranks, split).items())
    return float(split * per_block + lora)


def comm_bytes(dims: ModelDims, shape: StepShape, bytes_per_elem: int = 2) -> int:
    """Bytes per step in each direction (h up, dL/dh down): B x T x d, whatever the split point."""
    return shape.tokens * dims.hidden * bytes_per_elem
