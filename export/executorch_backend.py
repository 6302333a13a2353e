"""ExecuTorch back end: the device step as a training program (.pte) plus its LoRA tensors (.ptd).

One program, two methods sharing one copy of the frozen weights:

    "forward"    (input_ids, attention_mask, upstream_grad) -> (loss, h)   the joint step; the LoRA
                 factors are its trainable parameters, loaded from the .ptd and updated in place
    "forward_h"  (input_ids, attention_mask, *LoRA factors in manifest order) -> h   the forward alone

`TrainingModule.named_gradients()` / `named_parameters()` give the LoRA gradients and the live LoRA
tensors of "forward" by parameter FQN (the manifest maps FQNs to '0.q.A' keys); the device feeds
those live tensors to "forward_h", which is why it takes them as inputs rather than holding copies.

Both are lowered with `XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)`: the
joint graph computes every linear as `mm(x, permute(W))` and every backward matmul between two
activations, and the default partitioner delegates an `mm` only when its right operand is a
static parameter, i.e. none of them (47 at SmolLM2 k=2, all left to the slow portable kernel).
With the flag XNNPACK takes them all as fully-connected layers with runtime weights; the frozen
weights then stay in the program's constant segment, which both methods share (with static
weights XNNPACK stores its own copy per method: +28 MB at k=2, for a forward-only method 6 %
faster). `to_executorch(external_mutable_weights=True)` puts the trainable tensors in the .ptd.

Only SGD exists in the ExecuTorch runtime: AdamW runs in SDK code over `named_parameters()`.
Pinned to executorch 1.4.1: the training API is marked experimental.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from export.joint import JointProgram, example_inputs, lora_parameters
from hsplitlora.split import Segment

PTE_FILE = "device_segment.pte"
PTD_FILE = "device_segment.ptd"
STEP_METHOD = "forward"
FORWARD_METHOD = "forward_h"
METHODS = {"step": STEP_METHOD, "forward": FORWARD_METHOD}  # role -> method name, in the manifest

_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}


class DeviceForward(nn.Module):
    """h alone, with the LoRA factors as inputs in `lora_parameters` (= manifest) order."""

    def __init__(self, segment: Segment):
        super().__init__()
        self.segment = segment
        self.fqns = [fqn for fqn, _ in lora_parameters(segment).values()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *lora: torch.Tensor):
        return torch.func.functional_call(self.segment, dict(zip(self.fqns, lora)), (input_ids, attention_mask),
                                          strict=False)


def export_forward(segment: Segment, joint: JointProgram) -> torch.export.ExportedProgram:
    """The forward-only program, traced and decomposed to core ATen as the joint one is.

    Decomposing here rather than in the lowering matters: the lowering keeps ops XNNPACK takes
    whole (attention, linear), and GPT-2's Conv1D then views a non-contiguous attention output.
    """
    ids, mask, _ = example_inputs(joint.batch, joint.seq, joint.hidden, joint.vocab)
    lora = tuple(p.detach().clone() for _, p in lora_parameters(segment).values())
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.export.export(DeviceForward(segment), (ids, mask, *lora), strict=False).run_decompositions()


def export_pte(joint: JointProgram, segment: Segment, out_dir: Path) -> list[Path]:
    """Write device_segment.pte (both methods) and device_segment.ptd into out_dir; returns the files.

    The .ptd holds the LoRA values the program was traced with (fresh adapters at build time).
    """
    forward = export_forward(segment, joint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

        edge = to_edge_transform_and_lower(
            {STEP_METHOD: joint.program, FORWARD_METHOD: forward},
            partitioner=[XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)])
        program = edge.to_executorch(ExecutorchBackendConfig(external_mutable_weights=True))
    data = program._tensor_data or {}  # name -> Cord; write_tensor_data_to_file would name the file
    if len(data) != 1:
        raise RuntimeError(f"expected one .ptd file with the LoRA tensors, ExecuTorch produced {sorted(data)}")
    pte, ptd = out_dir / PTE_FILE, out_dir / PTD_FILE
    with open(pte, "wb") as f:
        program.write_to_file(f)
    with open(ptd, "wb") as f:
        next(iter(data.values())).write_to_file(f)
    return [pte, ptd]


def load_training_module(pte: Path, ptd: Path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        return TrainingModule(_load_for_executorch(str(pte), str(ptd)))


def run_pte(pte: Path, ptd: Path, lora_fqns: dict[str, str], input_ids: torch.Tensor,
            attention_mask: torch.Tensor, upstream_grad: torch.Tensor, lora: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One step and one forward-only call through the ExecuTorch runtime with the given LoRA values
    (the verification run): (h, gradients, h of "forward_h").

    The runtime exposes its LoRA tensors only after a first call, so this runs the step twice.
    """
    module = load_training_module(pte, ptd)
    inputs = (input_ids.long(), attention_mask.long(), upstream_grad.float())
    module.forward_backward(STEP_METHOD, inputs)
    params = module.named_parameters()
    missing = set(lora_fqns.values()) - set(params)
    if missing:
        raise RuntimeError(f"the program's trainable tensors {sorted(params)} lack {sorted(missing)}")
    for key, fqn in lora_fqns.items():
        params[fqn].copy_(lora[key])
    outs = module.forward_backward(STEP_METHOD, inputs)
    grads = module.named_gradients()
    # The live tensors, as the SDK feeds them: a forward that read stale copies would fail here.
    live = (params[fqn] for fqn in lora_fqns.values())
    forward_h = module.model.run_method(FORWARD_METHOD, (*inputs[:2], *live))
    return outs[1].clone(), {key: grads[fqn].clone() for key, fqn in lora_fqns.items()}, forward_h[0]


def tensor_specs(pte: Path, ptd: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the training method as [{name, shape, dtype}]; gradients follow
    the user outputs as the runtime returns them and are listed in the manifest by LoRA key.
    ("forward_h" takes the first two inputs and `lora.<key>` in manifest order, and returns h.)"""
    module = load_training_module(pte, ptd).model
    meta = module.method_meta(STEP_METHOD)

    def spec(name, info):
        return {"name": name, "shape": list(info.sizes()), "dtype": _DTYPES.get(info.dtype(), str(info.dtype()))}

    inputs = [spec(n, meta.input_tensor_meta(i)) for i, n in enumerate(("input_ids", "attention_mask", "upstream_grad"))]
    outputs = [spec(n, meta.output_tensor_meta(i)) for i, n in enumerate(("loss", "h"))]
    return inputs, outputs
