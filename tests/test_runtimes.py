"""Device runtimes (eager torch, onnxruntime, ExecuTorch) against eager autograd, and the SDK AdamW."""

from __future__ import annotations

import json

import pytest
import torch

from edge_sdk.runtimes import (
    AdamW,
    ArtifactError,
    available_runtimes,
    choose_runtime,
    fresh_lora,
    open_runtime,
)
from edge_sdk.runtimes.torch_runtime import TorchRuntime
from export.testing import cached_build, copy_export
from hsplitlora.federation.protocol import MERGE, Update, tensors_to_factors
from hsplitlora.lora import Target, apply_lora
from hsplitlora.models import load_model

CONFIGS = {
    "llama-k1": ("tiny-llama", 1, "q=4,v=2,0.down=3"),
    "gpt2-k2": ("tiny-gpt2", 2, "q=4,k=2,v=3,1.up=2"),
}
ARTIFACT_RUNTIMES = ("onnxruntime", "executorch")
RTOL = 1e-5


def eager(config: str) -> TorchRuntime:
    """The reference: the same frozen model and ranks as the export, in eager PyTorch."""
    name, split, ranks = CONFIGS[config]
    return TorchRuntime.from_model(load_model(name)[0], split, ranks)


def random_lora(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * (s[1] ** -0.5 if k.endswith(".A") else 0.1) for k, s in shapes.items()}


def batch(manifest_or_shape, seed):
    b, t, d, vocab = manifest_or_shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (b, t), generator=gen), torch.ones(b, t, dtype=torch.long),
            torch.randn(b, t, d, generator=gen))


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    return float((a.double() - ref.double()).abs().max()) / (scale or float(ref.abs().max()) or 1.0)


def grad_err(grads, ref) -> float:
    scale = max(float(g.abs().max()) for g in ref.values())
    return max(rel_err(grads[k], g, scale) for k, g in ref.items())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request):
    return request.param


@pytest.fixture(scope="module")
def built(config):
    return cached_build(*CONFIGS[config])


def dims(manifest):
    return manifest.batch, manifest.seq, manifest.hidden, manifest.vocab


@pytest.mark.parametrize("runtime", ARTIFACT_RUNTIMES)
def test_step_matches_eager_autograd(config, built, runtime):
    out, manifest = built
    ref = eager(config)
    rt = open_runtime(runtime, out)
    assert rt.lora_shapes() == ref.lora_shapes()
    lora = random_lora(ref.lora_shapes(), seed=7)
    ref.set_lora_tensors(lora)
    rt.set_lora_tensors(lora)
    ids, mask, up = batch(dims(manifest), seed=3)
    h_ref, g_ref = ref.step(ids, mask, up)
    h, grads = rt.step(ids, mask, up)
    assert set(grads) == set(g_ref)
    assert rel_err(h, h_ref) <= RTOL and grad_err(grads, g_ref) <= RTOL
    assert rel_err(rt.forward(ids, mask), h_ref) <= RTOL
    # The device's path: the forward keeps its activations, the backward reads them.
    for each in (rt, ref):
        h = each.forward(ids, mask, keep=True)
        grads = each.backward(up)
        assert set(grads) == set(g_ref)
        assert rel_err(h, h_ref) <= RTOL and grad_err(grads, g_ref) <= RTOL, each.name


@pytest.mark.parametrize("runtime", ["torch", *ARTIFACT_RUNTIMES])
def test_backward_needs_its_own_forward(config, built, runtime):
    out, manifest = built
    rt = eager(config) if runtime == "torch" else open_runtime(runtime, out)
    ids, mask, up = batch(dims(manifest), seed=4)
    with pytest.raises(RuntimeError, match="forward\(..., keep=True\) first"):
        rt.backward(up)
    rt.forward(ids, mask, keep=True)
    rt.backward(up)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        rt.backward(up)
    rt.forward(ids, mask, keep=True)
    rt.forward(ids, mask)  # a forward that keeps nothing drops what the last one kept
    with pytest.raises(RuntimeError, match="keep=True"):
        rt.backward(up)
    if runtime != "torch":
        rt.forward(ids, mask, keep=True)
        with pytest.raises(ValueError, match="upstream_grad has shape"):
            rt.backward(up[:, :-1])


@pytest.mark.parametrize("runtime", ARTIFACT_RUNTIMES)
def test_adamw_steps_end_where_eager_torch_ends(config, built, runtime):
    """Three steps: the runtime + SDK AdamW against the eager segment + torch.optim.AdamW."""
    out, manifest = built
    ref = eager(config)
    rt = open_runtime(runtime, out)
    start = random_lora(ref.lora_shapes(), seed=11)
    ref.set_lora_tensors(start)
    rt.set_lora_tensors(start)
    params = list(ref._params.values())
    torch_opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    sdk_opt = AdamW(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for s in range(3):
        ids, mask, up = batch(dims(manifest), seed=100 + s)
        h_ref, g_ref = ref.step(ids, mask, up)
        for p, g in zip(params, g_ref.values()):
            p.grad = g
        torch_opt.step()
        h = rt.forward(ids, mask, keep=True)  # as the client trains
        grads = rt.backward(up)
        sdk_opt.step(rt.lora_tensors(), grads)
        assert rel_err(h, h_ref) <= RTOL, f"step {s}: h differs"
    final, want = rt.lora_tensors(), ref.lora_tensors()
    for key in want:
        # A few fp32 steps of Adam amplify 1e-7 gradient differences where v is tiny: 1e-5 relative.
        assert rel_err(final[key], want[key]) <= 1e-5, key
    # `forward` and `backward` see the optimizer's in-place updates (ExecuTorch feeds the live
    # tensors to its split methods; a copy made at load would still hold the starting values).
    ids, mask, _ = batch(dims(manifest), seed=200)
    assert rel_err(rt.forward(ids, mask), ref.forward(ids, mask)) <= 1e-5


@pytest.mark.parametrize("runtime", ARTIFACT_RUNTIMES)
def test_merged_update_is_applied_in_place(config, built, runtime, tmp_path):
    out, manifest = built
    directory = copy_export(out, tmp_path / "segment")
    ref = eager(config)
    rt = open_runtime(runtime, directory)
    gen = torch.Generator().manual_seed(5)
    factors = {}
    for target, rank in manifest.ranks.items():
        a_shape = next(t.shape for t in manifest.lora if t.name == f"{target}.A")
        b_shape = next(t.shape for t in manifest.lora if t.name == f"{target}.B")
        factors[Target.parse(target)] = (torch.randn(rank + 1, a_shape[1], generator=gen) * 0.1,  # stacked: any R
                                         torch.randn(b_shape[0], rank + 1, generator=gen) * 0.1)
    update = {str(t): d for t, d in Update(MERGE, factors).dense().items()}
    # A weight this segment does not adapt changes too when another client adapts it.
    assert "0.o" not in manifest.ranks
    update["0.o"] = torch.randn(manifest.hidden, manifest.hidden, generator=gen) * 0.1
    lora = random_lora(ref.lora_shapes(), seed=9)
    rt.set_lora_tensors(lora)
    ref.apply_merged_update(update)
    rt.apply_merged_update(update)
    ref.set_lora_tensors(lora)
    ids, mask, up = batch(dims(manifest), seed=21)
    h_ref, g_ref = ref.step(ids, mask, up)
    h, grads = rt.step(ids, mask, up)
    assert rel_err(h, h_ref) <= RTOL and grad_err(grads, g_ref) <= RTOL
    # The merge persists: a new runtime over the patched directory passes its hash check and agrees.
    again = open_runtime(runtime, directory)
    again.set_lora_tensors(lora)
    h2, _ = again.step(ids, mask, up)
    assert rel_err(h2, h_ref) <= RTOL


@pytest.mark.parametrize("runtime", ARTIFACT_RUNTIMES)
def test_corrupted_artifact_is_refused(built, runtime, tmp_path):
    out, manifest = built
    directory = copy_export(out, tmp_path / "segment")
    fmt = "onnx" if runtime == "onnxruntime" else "pte"
    victim = directory / manifest.artifacts[fmt].files["program"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        open_runtime(runtime, directory)


def test_an_artifact_of_an_older_schema_is_refused(built, tmp_path):
    out, _ = built
    directory = copy_export(out, tmp_path / "segment")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["schema"] = "hsplitlora.device-segment/1"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="export the segment again"):
        open_runtime("onnxruntime", directory)


def test_fixed_shapes_are_explained(built):
    out, manifest = built
    rt = open_runtime("onnxruntime", out)
    ids, mask, up = batch((manifest.batch, manifest.seq + 1, manifest.hidden, manifest.vocab), seed=0)
    with pytest.raises(ValueError, match="exported for \\(batch, seq\\)"):
        rt.step(ids, mask, up)


def test_merging_an_adapter_into_the_weights_keeps_the_output(config):
    """Merging B @ A (scale folded) and zeroing B leaves h as it was: the merge semantics."""
    rt = eager(config)
    rt.set_lora_tensors(random_lora(rt.lora_shapes(), seed=1))
    config_ = rt.segment.config
    ids, mask, _ = batch((2, 5, config_.hidden_size, config_.vocab_size), seed=2)
    before = rt.forward(ids, mask)
    lora = rt.lora_tensors()
    factors = {t: (a.clone(), b * (16.0 / a.shape[0])) for t, (a, b) in tensors_to_factors(lora).items()}
    rt.apply_merged_update({str(t): d for t, d in Update(MERGE, factors).dense().items()})
    rt.set_lora_tensors({k: torch.zeros_like(v) for k, v in lora.items() if k.endswith(".B")})
    assert rel_err(rt.forward(ids, mask), before) <= 1e-5


def test_fresh_lora_is_what_apply_lora_makes_with_the_same_seed():
    model, _ = load_model("tiny-llama")
    factors = apply_lora(model, {Target(0, "q"): 4, Target(1, "down"): 2}, seed=(7, 3, 1))
    lora = fresh_lora({"0.q.A": (4, 32), "0.q.B": (32, 4), "1.down.A": (2, 64), "1.down.B": (32, 2)}, seed=(7, 3, 1))
    assert lora["0.q.B"].abs().max() == 0
    assert 0 < lora["0.q.A"].abs().max() <= 32 ** -0.5
    assert torch.equal(lora["0.q.A"], factors[Target(0, "q")].A.detach())
    assert torch.equal(lora["1.down.A"], factors[Target(1, "down")].A.detach())
    assert not torch.equal(lora["0.q.A"], fresh_lora({"0.q.A": (4, 32)}, seed=(7, 3, 2))["0.q.A"])


def test_sdk_adamw_matches_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    shapes = {"0.q.A": (4, 16), "0.q.B": (16, 4), "1.v.A": (2, 16)}
    ours = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    theirs = [torch.nn.Parameter(v.clone()) for v in ours.values()]
    hyper = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    sdk, ref = AdamW(**hyper), torch.optim.AdamW(theirs, **hyper)
    for _ in range(20):
        grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        sdk.step(ours, grads)
        for p, g in zip(theirs, grads.values()):
            p.grad = g.clone()
        ref.step()
    for (key, value), p in zip(ours.items(), theirs):
        torch.testing.assert_close(value, p.detach(), rtol=1e-6, atol=1e-7, msg=key)
    state = sdk.state_dict()
    assert state["t"] == 20
    sdk.reset()
    assert sdk.t == 0 and not sdk.m


def test_available_and_chosen_runtimes():
    available = available_runtimes()
    assert available == ["onnxruntime", "torch", "executorch"]  # all three are installed here
    assert choose_runtime() == "onnxruntime"
    assert choose_runtime("executorch") == "executorch"
    assert choose_runtime("executorch", formats=["onnx"]) == "onnxruntime"
    assert choose_runtime("torch", formats=[]) == "torch"
    with pytest.raises(ValueError, match="unknown runtime"):
        choose_runtime("tflite")


def test_onnxruntime_workers_do_not_spin_unless_single_threaded():
    """A pool of several threads waits passively between ops (the SDK's choice, docs/export.md)."""
    from edge_sdk.runtimes.onnx_runtime import OnnxRuntime

    directory, _ = cached_build(*CONFIGS["llama-k1"])

    def spinning(rt):
        def entry(session):
            try:
                return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            except RuntimeError:  # not set: onnxruntime's default, spinning
                return None
        return [entry(s) for s in (rt.session, rt.forward_session, rt.backward_session)]

    assert spinning(OnnxRuntime(directory, threads=2)) == ["0"] * 3
    assert spinning(OnnxRuntime(directory)) == ["0"] * 3
    assert spinning(OnnxRuntime(directory, threads=1)) == [None] * 3
