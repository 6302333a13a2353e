"""ExecuTorch back end: the joint graph as a training program (.pte) plus its LoRA tensors (.ptd).

`to_edge_transform_and_lower` with the XNNPACK partitioner, then `to_executorch` with
`external_mutable_weights=True`: the trainable tensors (the LoRA factors, the only parameters
that require grad) go to `device_segment.ptd`, the program and its frozen weights to
`device_segment.pte`. The method "forward" takes (input_ids, attention_mask, upstream_grad) and
returns (loss, h); `TrainingModule.named_gradients()` / `named_parameters()` give the LoRA
gradients and the live LoRA tensors by parameter FQN (the manifest maps FQNs to '0.q.A' keys).

Only SGD exists in the ExecuTorch runtime: AdamW runs in SDK code over `named_parameters()`.
Pinned to executorch 1.4.1: the training API is marked experimental.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from export.joint import JointProgram

PTE_FILE = "device_segment.pte"
PTD_FILE = "device_segment.ptd"
METHOD = "forward"

_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}


def export_pte(joint: JointProgram, out_dir: Path) -> list[Path]:
    """Write device_segment.pte and device_segment.ptd into out_dir; returns the files written.

    The .ptd holds the LoRA values the program was traced with (fresh adapters at build time).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

        edge = to_edge_transform_and_lower(joint.program, partitioner=[XnnpackPartitioner()])
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
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step through the ExecuTorch runtime with the given LoRA values (the verification run).

    The runtime exposes its LoRA tensors only after a first call, so this runs the step twice.
    """
    module = load_training_module(pte, ptd)
    inputs = (input_ids.long(), attention_mask.long(), upstream_grad.float())
    module.forward_backward(METHOD, inputs)
    params = module.named_parameters()
    missing = set(lora_fqns.values()) - set(params)
    if missing:
        raise RuntimeError(f"the program's trainable tensors {sorted(params)} lack {sorted(missing)}")
    for key, fqn in lora_fqns.items():
        params[fqn].copy_(lora[key])
    outs = module.forward_backward(METHOD, inputs)
    grads = module.named_gradients()
    return outs[1].clone(), {key: grads[fqn].clone() for key, fqn in lora_fqns.items()}


def tensor_specs(pte: Path, ptd: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the training method as [{name, shape, dtype}]; gradients follow
    the user outputs as the runtime returns them and are listed in the manifest by LoRA key."""
    module = load_training_module(pte, ptd).model
    meta = module.method_meta(METHOD)

    def spec(name, info):
        return {"name": name, "shape": list(info.sizes()), "dtype": _DTYPES.get(info.dtype(), str(info.dtype()))}

    inputs = [spec(n, meta.input_tensor_meta(i)) for i, n in enumerate(("input_ids", "attention_mask", "upstream_grad"))]
    outputs = [spec(n, meta.output_tensor_meta(i)) for i, n in enumerate(("loss", "h"))]
    return inputs, outputs
