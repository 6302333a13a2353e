"""ExecuTorch back end: the device step as a training program (.pte) plus its LoRA tensors (.ptd).

One program, three methods sharing one copy of the frozen weights:

    "forward"     (input_ids, attention_mask, upstream_grad) -> (loss, h)   the joint step; the LoRA
                  factors are its trainable parameters, loaded from the .ptd and updated in place
    "forward_h"   (input_ids, attention_mask, *LoRA) -> (h, *saved)   the forward half
    "backward_h"  (upstream_grad, *LoRA, *saved) -> LoRA gradients     the backward half

(LoRA factors and gradients in manifest order; the halves are the joint graph cut by
export.partition.) `TrainingModule.named_gradients()` / `named_parameters()` give the LoRA
gradients and the live LoRA tensors of "forward" by parameter FQN (the manifest maps FQNs to
'0.q.A' keys); the device feeds those live tensors to the halves, which is why they take them as
inputs rather than holding copies.

All are lowered with `XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)`: the
joint graph computes every linear as `mm(x, permute(W))` and every backward matmul between two
activations, and the default partitioner delegates an `mm` only when its right operand is a
static parameter, i.e. none of them (47 at SmolLM2 k=2, all left to the slow portable kernel).
With the flag XNNPACK takes them all as fully-connected layers with runtime weights; the frozen
weights then stay in the program's constant segment, which the methods share (with static
weights XNNPACK stores its own copy per method: +28 MB at k=2, for a forward-only method 6 %
faster). `to_executorch(external_mutable_weights=True)` puts the trainable tensors in the .ptd.

Only SGD exists in the ExecuTorch runtime: AdamW runs in SDK code over `named_parameters()`.
Pinned to executorch 1.4.1: the training API is marked experimental.
"""

from __future__ import annotations

import operator
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from export.joint import GraphCall, JointProgram, example_inputs
from export.partition import Op, cut

PTE_FILE = "device_segment.pte"
PTD_FILE = "device_segment.ptd"
STEP_METHOD = "forward"
FORWARD_METHOD = "forward_h"
BACKWARD_METHOD = "backward_h"
# role -> method name, in the manifest
METHODS = {"step": STEP_METHOD, "forward": FORWARD_METHOD, "backward": BACKWARD_METHOD}

_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}


# ATen ops that only re-view their first input: the backward recomputes them from a saved base.
_VIEWS = {getattr(torch.ops.aten, name).default for name in ("view", "_unsafe_view", "permute", "unsqueeze",
                                                              "expand", "alias", "t", "detach")} | {
    torch.ops.aten.squeeze.dims, torch.ops.aten.squeeze.dim, torch.ops.aten.slice.Tensor,
    torch.ops.aten.transpose.int, torch.ops.aten.select.int}


def export_halves(joint: JointProgram) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
    """The joint graph cut at the saved activations (export.partition), each half re-exported:

        forward   (input_ids, attention_mask, *LoRA in manifest order) -> (h, *saved)
        backward  (upstream_grad, *LoRA in manifest order, *saved)     -> gradients in manifest order

    The frozen tensors are the joint program's own (not copies), so the lowering stores them once
    for every method.
    """
    gm = joint.program.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    keys = list(joint.lora_fqns)
    users, lora, frozen = [], {}, {}
    for node, role in zip(placeholders, joint.input_roles()):
        if role[0] == "user":
            users.append(node)
        elif role[0] == "lora":
            lora[node] = keys.index(role[1])
        else:
            frozen[node] = role[1:]
    ids, mask, upstream = users
    h = outputs[joint.h_output]
    grads = [outputs[joint.gradient_outputs[k]] for k in keys]
    # An op with several results (native_layer_norm: out, mean, rstd) is read through getitem
    # nodes: one Op whose values are those getitems, so a saved value is always a tensor.
    groups = [[node, *(u for u in node.users if u.target is operator.getitem)]
              for node in nodes if node.target is not operator.getitem]
    ops = [Op(inputs=tuple(n.name for n in group[0].all_input_nodes),
              outputs=tuple(n.name for n in group[1:]) or (group[0].name,), view=group[0].target in _VIEWS)
           for group in groups]
    parts = cut(ops, h.name, [g.name for g in grads], {ids.name, mask.name})
    by_name = {n.name: n for n in gm.graph.nodes}
    saved = [by_name[name] for name in parts.saved]
    for node in saved:
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise RuntimeError(f"the backward reads {node.name} ({node.target}), which is not a tensor: cannot cut here")

    def half(ops_in: list[int], args: list, results: list) -> GraphCall:
        graph, env, sources, buffers = torch.fx.Graph(), {}, [], {}
        picked = [node for i in ops_in for node in groups[i]]
        read = {a for node in picked for a in node.all_input_nodes} | set(results)
        for node in [*placeholders, *saved]:
            if node not in read or (node in saved and node in picked):
                continue
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            if node in frozen:
                name, value = frozen[node]
                sources.append(("buffer", name))
                buffers[name] = value
            else:
                sources.append(("arg", args.index(node)))
        for node in picked:
            env[node] = graph.node_copy(node, env.__getitem__)
        returned = []
        for node in results:
            value = env[node]
            if node in saved and not node.meta["val"].is_contiguous():
                # A method's outputs and inputs are contiguous in ExecuTorch, whatever the layout
                # eager gave a tensor: hand it over in that layout so both methods agree on it.
                value = graph.call_function(torch.ops.aten.clone.default, (value,),
                                            {"memory_format": torch.contiguous_format})
            returned.append(value)
        graph.output(tuple(returned))
        return GraphCall(torch.fx.GraphModule(gm, graph), sources, buffers)

    lora_nodes = sorted(lora, key=lora.get)
    forward = half(parts.forward, [ids, mask, *lora_nodes], [h, *saved])
    backward = half(parts.backward, [upstream, *lora_nodes, *saved], grads)
    example = example_inputs(joint.batch, joint.seq, joint.hidden, joint.vocab)
    factors = [joint.program.state_dict[joint.lora_fqns[k]].detach().clone() for k in keys]
    with sdpa_kernel([SDPBackend.MATH]):
        forward_ep = torch.export.export(forward, (*example[:2], *factors), strict=False)
        activations = tuple(v.clone() for v in forward(*example[:2], *factors)[1:])
        backward_ep = torch.export.export(backward, (example[2], *factors, *activations), strict=False)
    return forward_ep, backward_ep


def export_pte(joint: JointProgram, out_dir: Path) -> list[Path]:
    """Write device_segment.pte (all three methods) and device_segment.ptd into out_dir; returns the files.

    The .ptd holds the LoRA values the program was traced with (fresh adapters at build time).
    """
    forward, backward = export_halves(joint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes.memory_planning_pass import MemoryPlanningPass

        edge = to_edge_transform_and_lower(
            {STEP_METHOD: joint.program, FORWARD_METHOD: forward, BACKWARD_METHOD: backward},
            partitioner=[XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)])
        # The halves' inputs get no planned memory: the runtime reads the caller's tensors in place
        # instead of copying them in (backward_h's inputs are every saved activation).
        in_place = {m: MemoryPlanningPass(alloc_graph_input=False) for m in (FORWARD_METHOD, BACKWARD_METHOD)}
        program = edge.to_executorch(ExecutorchBackendConfig(
            external_mutable_weights=True, memory_planning_pass={STEP_METHOD: MemoryPlanningPass(), **in_place}))
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
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """The verification run through the ExecuTorch runtime with the given LoRA values: (h, gradients)
    of the joint method, then (h, gradients) of "forward_h" + "backward_h".

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
    grads = {key: g.clone() for key, g in zip(lora_fqns, (module.named_gradients()[f] for f in lora_fqns.values()))}
    # The live tensors, as the SDK feeds them: methods that read stale copies would fail here.
    live = [params[fqn] for fqn in lora_fqns.values()]
    forward = module.model.run_method(FORWARD_METHOD, (*inputs[:2], *live))
    backward = module.model.run_method(BACKWARD_METHOD, (inputs[2], *live, *forward[1:]))
    return outs[1].clone(), grads, forward[0], dict(zip(lora_fqns, backward))


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
