"""Cut a joint forward-backward graph in two at the activations the backward reads.

A device sends h before it knows dL/dh, so one joint graph would run the forward twice per
step: once for h, again inside the joint graph. Cut in two, the forward graph returns h and the
tensors the backward reads ("saved" tensors, as autograd calls them), and the backward graph
takes those and dL/dh and returns the LoRA gradients: each op runs once per step.

The rule works on any graph given as ops over named values (both back ends use it: the ONNX one
on the exported ONNX graph, the ExecuTorch one on the FX graph):

- forward = every op h depends on;
- backward = every op a gradient depends on that is not in the forward, plus the forward's ops
  that do not depend on the activation inputs (weight transposes, rotary tables: cheap, and
  recomputing them saves carrying a copy of a frozen weight across), plus views of saved
  activations (the base is saved once, not each of its views);
- saved = the forward values the backward reads that depend on the activation inputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One node: the values it reads and writes, and whether it only re-views its first input."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    view: bool = False


@dataclass(frozen=True)
class Cut:
    """Op indices of each half, in the graph's (topological) order, and the saved values in order."""

    forward: list[int]
    backward: list[int]
    saved: list[str]


def cut(ops: list[Op], h: str, gradients: list[str], activations: set[str]) -> Cut:
    """Cut `ops` (topologically ordered) into a forward computing `h` and a backward computing
    `gradients`; `activations` names the graph inputs that carry the batch (token ids, mask)."""
    producer = {value: i for i, op in enumerate(ops) for value in op.outputs}
    forward, stack = set(), [producer[h]]
    while stack:
        i = stack.pop()
        if i not in forward:
            forward.add(i)
            stack.extend(producer[v] for v in ops[i].inputs if v in producer)
    dependent = set(activations)
    for op in ops:
        if any(v in dependent for v in op.inputs):
            dependent.update(op.outputs)
    backward, saved = set(), set()
    stack = [producer[g] for g in gradients]
    while stack:
        i = stack.pop()
        if i in backward:
            continue
        backward.add(i)
        for value in ops[i].inputs:
            if value in activations:
                raise ValueError(f"the backward reads the graph input {value!r} itself: it cannot be cut at "
                                 "the activations")
            j = producer.get(value)
            if j is None:
                continue  # a weight, a LoRA factor, dL/dh: an input of the backward graph
            if j in forward and value in dependent and not ops[j].view:
                saved.add(value)
            else:
                stack.append(j)
    return Cut(forward=sorted(forward), backward=sorted(backward), saved=sorted(saved, key=producer.get))
