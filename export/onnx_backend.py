"""ONNX back end: the joint graph as a plain-onnxruntime model with the LoRA factors as inputs.

Exporting the joint ExportedProgram directly silently drops its gradient outputs, so the joint
graph module is wrapped in an `nn.Module` that feeds the graph's inputs in `input_specs` order:
frozen parameters, buffers and constants are registered as buffers (they become initializers,
saved to `device_segment.onnx.data`), the user inputs and the LoRA factors are model inputs. The
model's outputs are h and one gradient per LoRA tensor. The optimizer runs outside the model (SDK),
so one artifact serves any optimizer and the adapters never touch the graph file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from export.joint import USER_INPUTS, GraphCall, JointProgram, example_inputs
from export.partition import Op, cut

ONNX_FILE = "device_segment.onnx"
ONNX_DATA = "device_segment.onnx.data"
FORWARD_FILE = "device_segment_forward.onnx"
BACKWARD_FILE = "device_segment_backward.onnx"
# ONNX ops that only re-view their first input: the backward recomputes them from a saved base.
_VIEWS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten"}


def lora_input_name(key: str) -> str:
    return f"lora.{key}"


def grad_output_name(key: str) -> str:
    return f"grad.{key}"


def joint_module(joint: JointProgram) -> GraphCall:
    """`forward(input_ids, attention_mask, upstream_grad, *lora) -> (h, *grads)` over the joint graph."""
    keys = list(joint.lora_fqns)
    sources, frozen = [], {}
    for role in joint.input_roles():
        if role[0] == "user":
            sources.append(("arg", role[1]))
        elif role[0] == "lora":
            sources.append(("arg", len(USER_INPUTS) + keys.index(role[1])))
        else:
            sources.append(("buffer", role[1]))
            frozen[role[1]] = role[2].clone()
    grads = joint.gradient_outputs
    return GraphCall(joint.program.graph_module, sources, frozen, [joint.h_output, *(grads[k] for k in keys)])


def export_onnx(joint: JointProgram, out_dir: Path, lora_init: dict[str, torch.Tensor]) -> list[Path]:
    """Write device_segment.onnx (+ .data) into out_dir; returns the files written."""
    import onnx

    module = joint_module(joint).eval()
    keys = list(joint.lora_fqns)
    args = (*example_inputs(joint.batch, joint.seq, joint.hidden, joint.vocab), *(lora_init[k] for k in keys))
    path = out_dir / ONNX_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, optimize=True, verbose=False,
            input_names=[*USER_INPUTS, *(lora_input_name(k) for k in keys)],
            output_names=["h", *(grad_output_name(k) for k in keys)],
        )
    model = program.model_proto
    names = [i.name for i in model.graph.input]
    expected = [*USER_INPUTS, *(lora_input_name(k) for k in keys)]
    if names != expected:
        raise RuntimeError(f"the ONNX model's inputs are {names}, expected {expected} "
                           "(an input the graph does not use was dropped?)")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_DATA, size_threshold=1024)  # small constants stay inline: ORT shape inference reads them
    return [path, out_dir / ONNX_DATA, *split_joint(path, keys)]


def split_joint(path: Path, keys: list[str]) -> tuple[Path, Path]:
    """The joint model cut at the saved activations (export.partition): a forward graph and a
    backward graph, both sharing the joint model's weight file.

    forward:  input_ids, attention_mask, lora.<key>  ->  h, saved...
    backward: upstream_grad, lora.<key>, saved...    ->  grad.<key>

    Saved tensors keep their names from the joint graph, so a runtime passes the forward's extra
    outputs to the backward by name. Asked for h alone, the forward graph costs a plain forward.
    """
    import onnx
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        raise RuntimeError("the joint ONNX graph has control flow: it cannot be cut at the activations")
    ops = [Op(inputs=tuple(v for v in n.input if v), outputs=tuple(n.output), view=n.op_type in _VIEWS)
           for n in model.graph.node]
    grads = [grad_output_name(k) for k in keys]
    saved = cut(ops, "h", grads, set(USER_INPUTS[:2])).saved
    lora = [lora_input_name(k) for k in keys]
    extractor = Extractor(model)
    forward = extractor.extract_model([*USER_INPUTS[:2], *lora], ["h", *saved])
    backward = extractor.extract_model(["upstream_grad", *lora, *saved], grads)
    out = path.parent / FORWARD_FILE, path.parent / BACKWARD_FILE
    for graph, file in zip((forward, backward), out):
        onnx.save_model(graph, str(file))  # external initializers keep their location and offsets
    return out


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, upstream_grad: torch.Tensor,
             lora: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step through plain onnxruntime (the verification run)."""
    session = _session(path)
    feeds = {"input_ids": input_ids.numpy().astype(np.int64),
             "attention_mask": attention_mask.numpy().astype(np.int64),
             "upstream_grad": upstream_grad.numpy().astype(np.float32)}
    feeds.update({lora_input_name(k): v.detach().numpy().astype(np.float32) for k, v in lora.items()})
    outputs = [o.name for o in session.get_outputs()]
    values = dict(zip(outputs, session.run(None, feeds)))
    h = torch.from_numpy(values["h"])
    return h, {k: torch.from_numpy(values[grad_output_name(k)]) for k in lora}


def run_onnx_split(forward: Path, backward: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   upstream_grad: torch.Tensor, lora: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """h from the forward graph, the gradients from the backward graph fed its saved tensors (the
    verification run of the path a device takes)."""
    sessions = [_session(p) for p in (forward, backward)]
    factors = {lora_input_name(k): v.detach().numpy().astype(np.float32) for k, v in lora.items()}
    outputs = sessions[0].run(None, {"input_ids": input_ids.numpy().astype(np.int64),
                                     "attention_mask": attention_mask.numpy().astype(np.int64), **factors})
    saved = dict(zip((o.name for o in sessions[0].get_outputs()[1:]), outputs[1:]))
    grads = sessions[1].run([grad_output_name(k) for k in lora],
                            {"upstream_grad": upstream_grad.numpy().astype(np.float32), **factors, **saved})
    return torch.from_numpy(outputs[0]), {k: torch.from_numpy(g) for k, g in zip(lora, grads)}


def tensor_specs(path: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the saved model as [{name, shape, dtype}]."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value_info):
        t = value_info.type.tensor_type
        return {"name": value_info.name, "shape": [d.dim_value for d in t.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return [spec(i) for i in model.graph.input], [spec(o) for o in model.graph.output]
