"""Every graph pass the export pipeline applies, in one place (the APIs they patch around are experimental).

Pinned to torch 2.13.0 / executorch 1.4.1. When either moves, re-run `tests/test_export.py`: a pass
that is no longer needed is harmless, a new unsupported op shows up as an export or runtime error.
"""

from __future__ import annotations

import math

import torch
from torch.export import ExportedProgram

aten = torch.ops.aten
_ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor}
_SCALAR_TO_TENSOR = {aten.mul.Scalar: aten.mul.Tensor, aten.add.Scalar: aten.add.Tensor,
                     aten.div.Scalar: aten.div.Tensor, aten.sub.Scalar: aten.sub.Tensor}


def _recompiled(gm: torch.fx.GraphModule, count: int) -> int:
    """After a pass rewrote `count` nodes: check the graph and regenerate its code (if it changed)."""
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def replace_empty_permuted(gm: torch.fx.GraphModule) -> int:
    """Rewrite `aten.empty_permuted(size, perm)` as `permute(empty([size[p] for p in perm]), perm^-1)`.

    The joint graph's backward allocates gradient buffers with `empty_permuted`. Neither runtime
    has it: the ExecuTorch runtime fails with "Missing operator aten::empty_permuted.out" (error
    0x14), and the ONNX exporter with "No ONNX function found for aten.empty_permuted". Both
    forms give a tensor of shape `size` laid out in memory in `perm` order. Returns the number of
    nodes rewritten.
    """
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.empty_permuted.default:
            continue
        size, perm = list(node.args[0]), list(node.args[1])
        inverse = [perm.index(i) for i in range(len(perm))]
        kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "layout", "device", "pin_memory")}
        with graph.inserting_before(node):
            empty = graph.call_function(aten.empty.memory_format, ([size[p] for p in perm],), kwargs)
            permuted = graph.call_function(aten.permute.default, (empty, inverse))
        for new in (empty, permuted):
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        val = node.meta.get("val")
        if val is not None:
            permuted.meta["val"] = val
            empty.meta["val"] = val.permute(perm)  # t = e.permute(perm^-1)  <=>  e = t.permute(perm)
        node.replace_all_uses_with(permuted)
        graph.erase_node(node)
        count += 1
    return _recompiled(gm, count)


def replace_negative_pad(gm: torch.fx.GraphModule) -> int:
    """Rewrite `aten.constant_pad_nd` with negative pads (crops) as `aten.slice` (+ a non-negative pad).

    LoRA on a slice of a fused weight (GPT-2's c_attn q/k/v) pads its update to the full output;
    the backward of that pad is a pad by negative amounts, which ExecuTorch's portable kernel
    refuses ("Padding values must be non-negative", error 0x12). Returns the number rewritten.
    """
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.constant_pad_nd.default:
            continue
        pad = list(node.args[1])
        if all(p >= 0 for p in pad):
            continue
        x = node.args[0]
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        val = x.meta["val"]
        cur, cur_val = x, val
        with graph.inserting_before(node):
            for i in range(len(pad) // 2):
                dim = val.dim() - 1 - i
                lo, hi = pad[2 * i], pad[2 * i + 1]
                if lo >= 0 and hi >= 0:
                    continue
                size = cur_val.shape[dim]
                start, end = max(-lo, 0), size + min(hi, 0)
                cur = graph.call_function(aten.slice.Tensor, (cur, dim, start, end))
                cur_val = aten.slice.Tensor(cur_val, dim, start, end)
                cur.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                cur.meta["val"] = cur_val
            rest = [max(p, 0) for p in pad]
            if any(rest):
                cur = graph.call_function(aten.constant_pad_nd.default, (cur, rest, value))
                cur.meta.update(node.meta)
        node.replace_all_uses_with(cur)
        graph.erase_node(node)
        count += 1
    return _recompiled(gm, count)


def replace_small_powers(gm: torch.fx.GraphModule) -> int:
    """Rewrite `aten.pow(x, 1)` as x, `pow(x, 2)` as `x * x` and `pow(x, 3)` as `x * x * x`.

    RMSNorm squares its input and the backward of a square is `2 * pow(x, 1)`: activation-sized
    powers that both runtimes compute with a general `pow` kernel (onnxruntime: 6 % of a SmolLM2
    backward at k=2), where a multiply is as exact and several times cheaper. Returns the number
    of nodes rewritten.
    """
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.pow.Tensor_Scalar:
            continue
        x, exponent = node.args
        if exponent not in (1, 2, 3):
            continue
        result = x
        with graph.inserting_before(node):
            for _ in range(int(exponent) - 1):
                result = graph.call_function(aten.mul.Tensor, (result, x))
                result.meta.update(node.meta)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    return _recompiled(gm, count)


def _is_zeros(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target == aten.full.default and node.args[1] == 0)


def _zero_scatter(node) -> tuple | None:
    """(src, dim, start, end, size) if `node` writes src into a zero tensor along dim with step 1."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target == aten.slice_scatter.default and _is_zeros(node.args[0])):
        return None
    names = ("dim", "start", "end", "step")
    values = dict(zip(names, node.args[2:]), **{k: v for k, v in node.kwargs.items() if k in names})
    if values.get("step", 1) != 1:
        return None
    size = node.meta["val"].shape
    dim = values.get("dim", 0) % len(size)
    start = values.get("start") or 0
    end = values.get("end")
    end = size[dim] if end is None else min(end, size[dim])
    start, end = (i + size[dim] if i < 0 else i for i in (start, end))
    return node.args[1], dim, start, end, size[dim]


def replace_zero_slice_scatter(gm: torch.fx.GraphModule) -> int:
    """Rewrite gradients of slices written into zero tensors without the scatter.

    The backward of `x[..., a:b]` is `slice_scatter(zeros, g, dim, a, b)`; rotary embeddings
    (`cat(-x2, x1)`) sum two of them that tile the whole axis. Both runtimes take slice_scatter
    slowly (onnxruntime: a ScatterND between two full transposes, 8 % of a SmolLM2 backward at
    k=2). Such a sum becomes `cat(lower, upper, dim)`; a lone one a `constant_pad_nd`. Returns the
    number of nodes rewritten.
    """
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.add.Tensor or len(node.args) != 2:
            continue
        parts = [_zero_scatter(a) for a in node.args]
        if None in parts or node.kwargs.get("alpha", 1) != 1 or parts[0][1] != parts[1][1]:
            continue
        (lo_src, dim, lo_start, lo_end, size), (hi_src, _, hi_start, hi_end, _) = sorted(parts, key=lambda p: p[2])
        if not (lo_start == 0 and lo_end == hi_start and hi_end == size):
            continue
        with graph.inserting_before(node):
            cat = graph.call_function(aten.cat.default, ([lo_src, hi_src], dim))
        cat.meta.update(node.meta)
        node.replace_all_uses_with(cat)
        graph.erase_node(node)
        count += 1
    for node in list(graph.nodes):
        scatter = _zero_scatter(node)
        if scatter is None:
            continue
        src, dim, start, end, size = scatter
        if node.users:  # else it was half of a pair
            pad = [0, 0] * (node.meta["val"].dim() - 1 - dim) + [start, size - end]
            with graph.inserting_before(node):
                padded = graph.call_function(aten.constant_pad_nd.default, (src, pad, 0.0))
            padded.meta.update(node.meta)
            node.replace_all_uses_with(padded)
            count += 1
        zeros = node.args[0]
        graph.erase_node(node)
        if not zeros.users:
            graph.erase_node(zeros)
    return _recompiled(gm, count)


def remove_multiply_by_one(gm: torch.fx.GraphModule) -> int:
    """Drop `x * 1`: autograd scales a LoRA gradient by alpha / rank, which is 1 when alpha equals
    the rank (rank 16, alpha 16), leaving an activation-sized multiply that no runtime removes.
    Only where the product has x's dtype and shape. Returns the number of nodes removed.
    """
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mul.Tensor, aten.mul.Scalar):
            continue
        x, factor = node.args
        if not isinstance(x, torch.fx.Node) or isinstance(factor, torch.fx.Node) or factor != 1:
            continue
        val, x_val = node.meta.get("val"), x.meta.get("val")
        if val is None or x_val is None or val.dtype != x_val.dtype or val.shape != x_val.shape:
            continue
        node.replace_all_uses_with(x)
        graph.erase_node(node)
        count += 1
    return _recompiled(gm, count)


def _call(graph: torch.fx.Graph, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """Insert target(*args) at the graph's insertion point, its meta["val"] computed from the args' vals."""
    node = graph.call_function(target, args, kwargs or {})
    vals = torch.fx.node.map_arg((args, kwargs or {}), lambda n: n.meta["val"])
    node.meta["val"] = target(*vals[0], **vals[1])
    return node


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def drop_no_op_views(gm: torch.fx.GraphModule) -> int:
    """Drop `alias` / `detach` (autograd's bookkeeping) and `expand` to the input's own shape.

    Functionally they return their input; ExecuTorch runs each as a copy kernel (alias_copy,
    expand_copy), 1-2 % of a SmolLM2 step. Returns the number of nodes dropped.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        same = node.target in (aten.alias.default, aten.detach.default) or (
            node.target == aten.expand.default and _shape(node) is not None and _shape(node) == _shape(node.args[0]))
        if same:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return _recompiled(gm, count)


def broadcast_instead_of_expand(gm: torch.fx.GraphModule) -> int:
    """Let elementwise ops broadcast a small tensor instead of materializing its `expand`.

    RMSNorm's backward expands a per-token [B, T, 1] value to [B, T, D], scales it and multiplies
    it into a [B, T, D] tensor; ExecuTorch copies every expanded element (expand_copy: 6 % of its
    SmolLM2 backward). A scalar op on the expanded tensor moves before the expand; an expand whose
    every user is a binary elementwise op with an operand of the expanded shape goes away. Returns
    the number of rewrites.
    """
    graph = gm.graph
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target != aten.expand.default:
                continue
            src, out = node.args[0], _shape(node)
            if _shape(src) is None or out is None or len(_shape(src)) != len(out):
                continue
            users = list(node.users)
            scalar_op = (len(users) == 1 and users[0].target in (*_ELEMENTWISE, *_SCALAR_TO_TENSOR)
                         and len(users[0].args) == 2 and users[0].args[0] is node
                         and not isinstance(users[0].args[1], torch.fx.Node) and not users[0].kwargs)
            if scalar_op:
                user = users[0]
                with graph.inserting_before(user):
                    small = _call(graph, user.target, (src, user.args[1]))
                    expanded = _call(graph, aten.expand.default, (small, node.args[1]))
                user.replace_all_uses_with(expanded)
                graph.erase_node(user)
                graph.erase_node(node)
            elif users and all(u.target in _ELEMENTWISE and len(u.args) == 2 and not u.kwargs
                               and any(a is not node and _shape(a) == out for a in u.args) for u in users):
                for user in users:
                    user.args = tuple(src if a is node else a for a in user.args)
                graph.erase_node(node)
            else:
                continue
            count += 1
            changed = True
            break
    return _recompiled(gm, count)


def drop_unit_loss_seed(gm: torch.fx.GraphModule) -> int:
    """`expand(ones_like(loss)) * g` -> g: the backward's seed for loss = sum(h * g) is d loss / dh = g,
    which autograd computes as an activation-sized multiply by ones. Returns the number dropped."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.mul.Tensor:
            continue
        for i, ones in enumerate(node.args[:2]):
            other = node.args[1 - i]
            if (isinstance(ones, torch.fx.Node) and ones.target == aten.expand.default
                    and isinstance(ones.args[0], torch.fx.Node) and ones.args[0].target == aten.full_like.default
                    and ones.args[0].args[1] == 1 and isinstance(other, torch.fx.Node)
                    and _shape(other) == _shape(node) and other.meta["val"].dtype == node.meta["val"].dtype):
                node.replace_all_uses_with(other)
                gm.graph.erase_node(node)
                count += 1
                break
    gm.graph.eliminate_dead_code()
    return _recompiled(gm, count)


def _safe_softmax_parts(where: torch.fx.Node) -> tuple | None:
    """For `where(!any(!(s == -inf), -1), 0, softmax(s))` with s = scores + where(m, 0, -inf):
    (the softmax, the -inf scalar_tensor node, the boolean mask m); else None."""
    try:
        cond, zeros, probs = where.args
        any_ = cond.args[0]
        eq = any_.args[0].args[0]
        scores = eq.args[0]
        mask_add = next(a for a in scores.args if isinstance(a, torch.fx.Node) and a.target == aten.where.self)
        mask, zero, minus_inf = mask_add.args
        matched = (cond.target == aten.logical_not.default and any_.target == aten.any.dim
                   and any_.args[1:] in ((-1, True), ([-1], True)) and any_.args[0].target == aten.logical_not.default
                   and eq.target == aten.eq.Scalar and eq.args[1] == -math.inf
                   and zeros.target == aten.full_like.default and zeros.args[1] == 0
                   and probs.target == aten._softmax.default and probs.args[0] is scores and probs.args[1] == -1
                   and scores.target == aten.add.Tensor
                   and zero.target == aten.scalar_tensor.default and zero.args[0] == 0
                   and minus_inf.target == aten.scalar_tensor.default and minus_inf.args[0] == -math.inf
                   and mask.meta["val"].dtype == torch.bool and _shape(mask)[-2:] == _shape(scores)[-2:])
    except (AttributeError, IndexError, StopIteration, TypeError, ValueError):
        return None
    return (probs, minus_inf, mask) if matched else None


def mask_softmax_by_the_mask(gm: torch.fx.GraphModule) -> int:
    """Rewrite the math attention's safe softmax so that it reads the mask, not every score.

    torch decomposes SDPA's softmax as `where(!any(s != -inf, -1), 0, softmax(s))` over the
    masked scores s = scores + where(m, 0, -inf): four passes over [B, heads, T, T] to zero the
    rows the mask hides entirely (ExecuTorch runs them in portable kernels: 14 % of a SmolLM2
    forward; onnxruntime 4 %). Here the mask adds the float minimum instead of -inf and the
    softmax is multiplied by `any(m, -1)`, computed once on the [B, 1, T, T] mask. With finite
    scores the values are the same: exp(min + score - max) is 0 in float32 wherever -inf gave 0,
    and a fully masked row is multiplied by 0. Returns the number of softmaxes rewritten.
    """
    graph = gm.graph
    count = 0
    keep_rows = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.where.self:
            continue
        parts = _safe_softmax_parts(node)
        if parts is None:
            continue
        probs, minus_inf, mask = parts
        minus_inf.args = (torch.finfo(probs.meta["val"].dtype).min, *minus_inf.args[1:])
        minus_inf.meta["val"] = minus_inf.target(*minus_inf.args, **minus_inf.kwargs)
        if mask not in keep_rows:
            with graph.inserting_after(mask):
                any_row = _call(graph, aten.any.dim, (mask, -1, True))
            with graph.inserting_after(any_row):
                keep_rows[mask] = _call(graph, aten._to_copy.default, (any_row,), {"dtype": probs.meta["val"].dtype})
        with graph.inserting_before(node):
            masked = _call(graph, aten.mul.Tensor, (probs, keep_rows[mask]))
        node.replace_all_uses_with(masked)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    return _recompiled(gm, count)


def scalar_ops_as_tensor_ops(gm: torch.fx.GraphModule) -> int:
    """`mul/add/sub/div.Scalar(x, c)` -> the `.Tensor` overload with the same Python scalar.

    XNNPACK's partitioner takes only the `.Tensor` form: the `.Scalar` ones (attention scaling,
    norm backward) stay in ExecuTorch's portable kernels. Same values. Returns the number renamed.
    """
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SCALAR_TO_TENSOR:
            node.target = _SCALAR_TO_TENSOR[node.target]
            count += 1
    return _recompiled(gm, count)


def prepare_joint(ep: ExportedProgram) -> ExportedProgram:
    """All passes the joint forward-backward program needs before either back end (in place)."""
    replace_empty_permuted(ep.graph_module)
    replace_negative_pad(ep.graph_module)
    replace_small_powers(ep.graph_module)
    replace_zero_slice_scatter(ep.graph_module)
    remove_multiply_by_one(ep.graph_module)
    drop_unit_loss_seed(ep.graph_module)
    mask_softmax_by_the_mask(ep.graph_module)
    drop_no_op_views(ep.graph_module)
    broadcast_instead_of_expand(ep.graph_module)
    scalar_ops_as_tensor_ops(ep.graph_module)
    return ep
