"""Export of device segments with trainable LoRA: parity with eager autograd, manifest, refusals."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from torch import nn
from torch.export.experimental import _export_forward_backward
from torch.nn.attention import SDPBackend, sdpa_kernel

import export
from export import Manifest, onnx_backend, parse_formats
from export.cli import build_parser, main
from export.executorch_backend import load_training_module
from hsplitlora.federation.manifest import SCHEMA, check_files
from export.partition import Op, cut
from export.passes import (broadcast_instead_of_expand, drop_no_op_views, drop_unit_loss_seed, mask_softmax_by_the_mask,
                           remove_multiply_by_one, replace_empty_permuted, replace_small_powers,
                           replace_zero_slice_scatter, scalar_ops_as_tensor_ops)
from export.testing import cached_build
from hsplitlora.family import FAMILIES
from hsplitlora.hashing import sha256_file
from server.artifacts import ArtifactCache, ArtifactKey

# Both families, splits 1 and 2, mixed ranks; GPT-2's fused c_attn carries q, k and v adapters of
# different ranks (three slices of one weight).
CONFIGS = {
    "llama-k1": ("tiny-llama", 1, "q=4,v=2,0.down=3"),
    "gpt2-k2": ("tiny-gpt2", 2, "q=4,k=2,v=3,1.up=2"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request):
    return cached_build(*CONFIGS[request.param])


def test_every_artifact_matches_eager_autograd(built):
    _, manifest = built
    assert set(manifest.artifacts) == {"onnx", "pte"}
    for fmt, art in manifest.artifacts.items():
        # The joint step, and the forward + backward pair the device trains with.
        for what in ("h", "grads", "forward_h", "backward"):
            assert art.parity[what] <= manifest.tolerance, f"{fmt}: {what} parity {art.parity[what]:.2e}"


def test_executorch_program_has_split_methods_sharing_the_frozen_weights(built):
    out, manifest = built
    art = manifest.artifacts["pte"]
    assert art.methods == {"step": "forward", "forward": "forward_h", "backward": "backward_h"}
    program = load_training_module(out / art.files["program"], out / art.files["lora"]).model
    assert {"forward", "forward_h", "backward_h"} <= set(program.method_names())
    forward, backward = program.method_meta("forward_h"), program.method_meta("backward_h")
    assert forward.num_inputs() == 2 + len(manifest.lora)
    saved = forward.num_outputs() - 1  # h, then the activations the backward reads
    assert saved > 0
    assert backward.num_inputs() == 1 + len(manifest.lora) + saved and backward.num_outputs() == len(manifest.lora)
    # One stored copy of each frozen weight serves every method (not one per method).
    assert all(len(w["copies"]) == 1 for w in art.frozen_weights), [w["copies"] for w in art.frozen_weights]


def test_onnx_forward_and_backward_graphs_share_the_weight_file(built):
    out, manifest = built
    import onnx

    art = manifest.artifacts["onnx"]
    forward, backward = (onnx.load(str(out / art.files[role]), load_external_data=False)
                         for role in ("forward", "backward"))
    saved = [o.name for o in forward.graph.output][1:]
    assert [o.name for o in forward.graph.output][0] == "h" and saved
    lora = [onnx_backend.lora_input_name(t.name) for t in manifest.lora]
    assert [i.name for i in backward.graph.input] == ["upstream_grad", *lora, *saved]
    assert [o.name for o in backward.graph.output] == list(art.gradients.values())
    for graph in (forward, backward):
        locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {art.files["weights"]}


def test_manifest_names_the_segment_and_its_tensors(built):
    out, manifest = built
    model, split, _ = next(c for c in CONFIGS.values() if c[0] == manifest.model)
    assert manifest.split == split and manifest.batch == 2 and manifest.seq == 8
    # Only device-side targets (blocks < split), named '<layer>.<proj>'.
    assert all(int(t.split(".")[0]) < split for t in manifest.ranks)
    if model == "tiny-gpt2":
        assert {manifest.ranks["0.q"], manifest.ranks["0.k"], manifest.ranks["0.v"]} == {4, 2, 3}
        assert manifest.ranks["1.up"] == 2
    else:
        assert manifest.ranks == {"0.down": 3, "0.q": 4, "0.v": 2}
    shapes = {t.name: t.shape for t in manifest.lora}
    for target, rank in manifest.ranks.items():
        assert shapes[f"{target}.A"][0] == rank and shapes[f"{target}.B"][1] == rank
    onnx_art = manifest.artifacts["onnx"]
    names = [t.name for t in onnx_art.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "upstream_grad"]
    assert names[3:] == [f"lora.{t.name}" for t in manifest.lora]
    assert onnx_art.inputs[2].shape == [2, 8, manifest.hidden]
    assert [t.name for t in onnx_art.outputs] == ["h"] + [f"grad.{t.name}" for t in manifest.lora]
    pte_art = manifest.artifacts["pte"]
    assert [t.shape for t in pte_art.inputs] == [[2, 8], [2, 8], [2, 8, manifest.hidden]]
    assert pte_art.outputs[1].shape == [2, 8, manifest.hidden]
    assert set(pte_art.gradients) == set(shapes)
    assert manifest.tools["executorch"] == "1.4.1" and manifest.tools["torch"].startswith("2.13.0")
    # Hashes and sizes are those of the files; the JSON round-trips into the same dataclass.
    for art in manifest.artifacts.values():
        assert check_files(out, art) == []
        for name, digest in art.sha256.items():
            assert sha256_file(out / name) == digest
    assert Manifest.load(out) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *manifest.artifacts["onnx"].sha256, *manifest.artifacts["pte"].sha256])


def test_frozen_weights_table_locates_every_device_weight(built):
    """Every projection of the device's blocks, adapted or not: a round's aggregate can change a
    weight this device does not adapt (another client adapts it)."""
    _, manifest = built
    projections = FAMILIES["gpt2" if manifest.model == "tiny-gpt2" else "llama"].projections
    device = {f"{layer}.{p}" for layer in range(manifest.split) for p in projections}
    assert set(manifest.ranks) <= device
    for fmt, art in manifest.artifacts.items():
        targets = {f"{w['layer']}.{p}" for w in art.frozen_weights for p in w["targets"]}
        assert targets == device, fmt
        for w in art.frozen_weights:
            assert w["copies"], f"{fmt}: no stored copy of {w['name']} found"


def test_failed_verification_writes_nothing(tmp_path, monkeypatch, capsys):
    """A backward off by 1e-3 of the largest gradient is refused, through the command line."""
    real = onnx_backend.run_onnx_split

    def off_by_a_little(*args, **kwargs):
        h, grads = real(*args, **kwargs)
        grads["0.q.A"] = grads["0.q.A"] + 1e-3 * max(g.abs().max() for g in grads.values())
        return h, grads

    monkeypatch.setattr(onnx_backend, "run_onnx_split", off_by_a_little)
    out = tmp_path / "segment"
    assert main(["--model", "tiny-llama", "--split", "1", "--ranks", "q=2", "--batch", "1", "--seq", "4",
                 "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "onnx artifact's forward + backward does not match PyTorch eager autograd" in err
    assert "gradients: max error 1.00e-03" in err and "(worst: 0.q.A)" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_refuses_to_overwrite_a_directory_that_is_not_an_export(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an export directory"):
        export.build("tiny-gpt2", 1, "q=2", batch=1, seq=4, formats="onnx", out_dir=out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must satisfy"):
        export.build("tiny-llama", 4, "q=2", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="no rank > 0 falls in the device segment"):
        export.build("tiny-llama", 1, "2-3:q=2", out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown export format"):
        parse_formats("tflite")
    assert parse_formats("both") == ("onnx", "pte") and parse_formats(["pte", "onnx"]) == ("onnx", "pte")


def test_empty_permuted_pass_keeps_the_values():
    class M(nn.Module):
        def forward(self, x):
            buf = torch.empty_permuted((2, 3, 4), (0, 2, 1), dtype=x.dtype)
            return buf.fill_(1.0) + x

    x = torch.randn(2, 3, 4)
    ep = torch.export.export(M(), (x,))
    gm = ep.graph_module
    assert replace_empty_permuted(gm) == 1
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.empty_permuted.default not in ops
    assert torch.allclose(ep.module()(x), x + 1)


def test_small_powers_pass_keeps_the_values():
    class M(nn.Module):
        def forward(self, x):
            return x.pow(1) + x.pow(2) + x.pow(3) + x.pow(0.5)

    x = torch.rand(3, 4) + 0.5
    ep = torch.export.export(M(), (x,))
    gm = ep.graph_module
    assert replace_small_powers(gm) == 3
    powers = [n.args[1] for n in gm.graph.nodes if n.target == torch.ops.aten.pow.Tensor_Scalar]
    assert powers == [0.5]  # only the power with no exact product form is left
    assert torch.allclose(ep.module()(x), x + x * x + x * x * x + x.sqrt())


def test_slice_gradient_and_unit_scale_passes_keep_the_gradients():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6))
            self.u = nn.Parameter(torch.randn(6))

        def forward(self, x):
            y = x * self.w
            rotated = torch.cat([-y[..., 3:], y[..., :3]], -1)  # rotary's rotate_half: two slices tiling the axis
            middle = (x * self.u)[..., 1:4]  # a lone slice
            return (rotated * x).sum() + (middle * middle * 1.0).sum(), rotated.detach()

    m, x = M(), torch.randn(2, 6)
    joint = _export_forward_backward(torch.export.export(m, (x,), strict=False))
    gm = joint.graph_module

    def count(op):
        return sum(n.target == op for n in gm.graph.nodes)

    assert count(torch.ops.aten.slice_scatter.default) == 3
    assert replace_zero_slice_scatter(gm) == 2  # the pair as one cat, the lone one as a pad
    assert count(torch.ops.aten.slice_scatter.default) == 0 and count(torch.ops.aten.constant_pad_nd.default) == 1
    assert remove_multiply_by_one(gm) >= 1
    assert not any(n.target == torch.ops.aten.mul.Tensor and n.args[1] == 1 for n in gm.graph.nodes)
    loss, _, grad_w, grad_u = gm(m.w.detach(), m.u.detach(), x)
    assert torch.allclose(grad_w, torch.autograd.grad(m(x)[0], m.w)[0])
    assert torch.allclose(grad_u, torch.autograd.grad(m(x)[0], m.u)[0])


def test_attention_passes_keep_values_and_gradients_with_fully_masked_rows():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Parameter(torch.randn(8, 8) * 0.3)

        def forward(self, x, mask, g):
            q = (x @ self.q).view(2, 6, 2, 4).transpose(1, 2)
            k = x.view(2, 6, 2, 4).transpose(1, 2)
            causal = torch.ones(6, 6, dtype=torch.bool).tril()
            keep = causal[None, None] & mask[:, None, None, :].bool()
            out = nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=keep) * 0.5
            h = nn.functional.rms_norm(out.transpose(1, 2).reshape(2, 6, 8), (8,))
            return (h * g).sum(), h.detach()

    x, g = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # left padding: rows 0-1 see no key
    m = Attention()
    with sdpa_kernel([SDPBackend.MATH]):
        joint = _export_forward_backward(torch.export.export(m, (x, mask, g), strict=False))
        loss = m(x, mask, g)[0]
    ref_h, (ref_grad,) = m(x, mask, g)[1], torch.autograd.grad(loss, [m.q])
    gm = joint.graph_module
    assert mask_softmax_by_the_mask(gm) == 1
    assert not any(n.target == torch.ops.aten.eq.Scalar for n in gm.graph.nodes)
    assert drop_unit_loss_seed(gm) == 1
    assert drop_no_op_views(gm) >= 1 and broadcast_instead_of_expand(gm) >= 1 and scalar_ops_as_tensor_ops(gm) >= 1
    assert not any(n.target in (torch.ops.aten.alias.default, torch.ops.aten.mul.Scalar) for n in gm.graph.nodes)
    _, h, grad = gm(m.q.detach(), x, mask, g)
    assert torch.equal(h[0, :2], ref_h[0, :2]) and not h.isnan().any()  # the fully masked rows
    assert torch.allclose(h, ref_h, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--split", "--ranks", "--batch", "--seq", "--format", "--out"):
        assert flag in text
    args = build_parser().parse_args(["--split", "2", "--out", "d"])
    assert (args.formats, args.batch, args.seq, args.ranks) == ("both", 4, 128, "q=8,v=8")
    assert main(["--model", "tiny-llama", "--split", "9", "--out", str(tmp_path / "x")]) == 2
    assert "split must satisfy" in capsys.readouterr().err


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["--model", "tiny-gpt2", "--split", "2", "--ranks", "q=4", "--batch", "2", "--seq", "8",
                 "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks 0-1" in printed and "onnx:" in printed and "pte:" not in printed and "manifest.json" in printed
    manifest = Manifest.load(out)
    assert manifest.split == 2 and set(manifest.artifacts) == {"onnx"}
    assert manifest.ranks == {"0.q": 4, "1.q": 4}


def test_server_rebuilds_an_artifact_an_older_exporter_built(tmp_path):
    """Schema 1 artifacts have no backward half: the cache builds the key again rather than serve one."""
    cache = ArtifactCache(tmp_path)
    key = ArtifactKey("tiny-llama", 1, "0.q=2", 16.0, 1, 4, "onnx")
    old = cache.directory(key.id)
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"schema": "hsplitlora.device-segment/1", "artifacts": {}}))
    manifest = asyncio.run(cache.ensure(key))
    assert manifest["schema"] == SCHEMA
    assert {"forward", "backward"} <= set(manifest["artifacts"]["onnx"]["files"])
    assert (old / manifest["artifacts"]["onnx"]["files"]["backward"]).is_file()


def test_the_cut_saves_activations_and_recomputes_the_rest():
    """A toy graph: x = embed(ids, W); y = x @ Wt (Wt = transpose(W)); h = view(y); the backward
    reads view(x), Wt and dL/dh."""
    ops = [
        Op(("ids", "W"), ("x",)),                 # 0: depends on the tokens
        Op(("W",), ("Wt",), view=True),          # 1: a weight transpose, no token in it
        Op(("x", "Wt"), ("y",)),                 # 2
        Op(("y",), ("h",), view=True),           # 3
        Op(("x",), ("xv",), view=True),          # 4: a view of x the backward reads
        Op(("dh", "xv", "Wt"), ("grad",)),       # 5
    ]
    parts = cut(ops, "h", ["grad"], {"ids"})
    assert parts.forward == [0, 1, 2, 3]
    assert parts.saved == ["x"]  # the base, not its view; not the weight transpose
    assert parts.backward == [1, 4, 5]  # the transpose and the view are recomputed
    with pytest.raises(ValueError, match="reads the graph input 'ids'"):
        cut([*ops, Op(("ids", "dh"), ("g2",))], "h", ["grad", "g2"], {"ids"})
