"""`build`: a model, a split and LoRA ranks in; verified device-segment artifacts and a manifest out.

Every artifact is written into a temporary sibling of the output directory, run once through its
own runtime on a fixed random input and compared with PyTorch eager autograd; only when every
requested format passes does the directory move into place. A failing build leaves the output
directory as it was and raises `VerificationError` naming the mismatch and its size.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from transformers import PreTrainedModel

from export import executorch_backend as et_backend
from export import onnx_backend
from export.config import ExportConfig
from export.frozen import adapted_weights, locate
from export.joint import JointProgram, eager_step, export_joint, lora_parameters
from hsplitlora.federation.manifest import MANIFEST, SCHEMA, Artifact, Manifest, TensorSpec
from hsplitlora.hashing import sha256_file
from export.verify import VerificationError, compare, verification_inputs
from hsplitlora.family import family_of, num_layers
from hsplitlora.importance import all_targets
from hsplitlora.lora import Target, adapters, apply_lora, lora_layer, parse_ranks
from hsplitlora.models import load_model
from hsplitlora.split import split_model

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pte")
TOOLS = ("torch", "executorch", "onnx", "onnxruntime", "onnxscript", "transformers", "hsplitlora")


def parse_formats(formats: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'onnx' | 'pte' | 'both' or a list of them -> the formats in build order (onnx first)."""
    items = [formats] if isinstance(formats, str) else list(formats)
    chosen = set()
    for item in items:
        if item == "both":
            chosen.update(FORMATS)
        elif item in FORMATS:
            chosen.add(item)
        else:
            raise ValueError(f"unknown export format {item!r}; choose onnx, pte or both")
    if not chosen:
        raise ValueError("no export format given")
    return tuple(f for f in FORMATS if f in chosen)


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model(model: str | PreTrainedModel) -> tuple[str, PreTrainedModel]:
    if isinstance(model, str):
        return model, load_model(model)[0]
    name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return name, copy.deepcopy(model)  # apply_lora wraps layers: never change the caller's model


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 directories and some writers 0600 files: give them the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _check_out_dir(out_dir: Path) -> None:
    """out_dir must be absent, empty or an earlier export (which is replaced)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise FileExistsError(f"{out_dir} exists and is not an export directory (no {MANIFEST}); "
                              "choose an empty or new --out")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the verified temp dir into place, replacing an earlier export."""
    _check_out_dir(out_dir)
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old / "x", out_dir)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@dataclass
class _Run:
    """One artifact's verification run and how its files and tensors are named."""

    h: torch.Tensor  # the joint step's
    grads: dict[str, torch.Tensor]
    split_h: torch.Tensor  # the forward graph's, then the backward graph's gradients
    split_grads: dict[str, torch.Tensor]
    roles: dict[str, str]
    gradients: dict[str, str]
    inputs: list[dict]
    outputs: list[dict]
    methods: dict[str, str] = field(default_factory=dict)


def _run_onnx(joint: JointProgram, files: list[Path], check) -> _Run:
    program, weights, forward, backward = files
    ids, mask, upstream, lora = check
    h, grads = onnx_backend.run_onnx(program, ids, mask, upstream, lora)
    inputs, outputs = onnx_backend.tensor_specs(program)
    return _Run(h, grads, *onnx_backend.run_onnx_split(forward, backward, *check),
                roles={"program": program.name, "weights": weights.name, "forward": forward.name,
                       "backward": backward.name},
                gradients={k: onnx_backend.grad_output_name(k) for k in joint.lora_fqns},
                inputs=inputs, outputs=outputs)


def _run_pte(joint: JointProgram, files: list[Path], check) -> _Run:
    pte, ptd = files
    inputs, outputs = et_backend.tensor_specs(pte, ptd)
    return _Run(*et_backend.run_pte(pte, ptd, joint.lora_fqns, *check), roles={"program": pte.name, "lora": ptd.name},
                gradients=dict(joint.lora_fqns), inputs=inputs, outputs=outputs, methods=dict(et_backend.METHODS))


def build(
    model: str | PreTrainedModel,
    split: int,
    ranks: str | dict[Target, int] | None,
    alpha: float = ExportConfig.alpha,
    batch: int = ExportConfig.batch,
    seq: int = ExportConfig.seq,
    formats: str | list[str] | tuple[str, ...] = ExportConfig.formats,
    out_dir: str | Path = "device-segment",
    *,
    rtol: float = ExportConfig.rtol,
    seed: int = ExportConfig.seed,
) -> Manifest:
    """Export the device segment (embeddings + blocks[0:split]) with trainable LoRA.

    model: a name for `hsplitlora.models.load_model` or a loaded model (copied, never changed).
    ranks: a spec ('q=8,v=8', '0-1:q=16', ...), a {Target: rank} dict, or None to keep the
        adapters the model already has (with their current values). Targets at or past the split
        belong to the server and are left out.
    formats: 'onnx', 'pte', 'both' or a list. (batch, seq) are fixed in the artifact.
    Raises VerificationError (nothing written) if an artifact's step differs from eager autograd
    by more than rtol relative to the largest magnitude of h / of the LoRA gradients.
    """
    fmts = parse_formats(formats)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir)
    name, model = _model(model)
    model.float().eval()
    n = num_layers(model)
    if not 1 <= split < n:
        raise ValueError(f"split must satisfy 1 <= split < {n} (the model has {n} blocks), got {split}")
    if ranks is None:
        if not any(t.layer < split for t in adapters(model)):
            raise ValueError(f"ranks=None keeps the model's adapters, but it has none in blocks 0-{split - 1}")
        model.requires_grad_(False)
    else:
        if isinstance(ranks, str):
            ranks = parse_ranks(ranks, n)
        device_ranks = {t: r for t, r in ranks.items() if t.layer < split and r > 0}
        if not device_ranks:
            raise ValueError(f"no rank > 0 falls in the device segment (blocks 0-{split - 1}): nothing to train")
        apply_lora(model, device_ranks, alpha)
    for target in all_targets(model, range(split)):
        lora_layer(model, target)  # wrap every projection, so any of them can take a merged update
    segment, _ = split_model(model, split)
    segment.eval()
    t0 = time.perf_counter()
    joint = export_joint(segment, batch, seq)
    trace_seconds = time.perf_counter() - t0
    initial = {k: p.detach().clone() for k, (_, p) in lora_parameters(segment).items()}
    ids, mask, upstream, lora = verification_inputs(batch, seq, joint.hidden, joint.vocab, joint.lora_shapes, seed)
    ref_h, ref_grads = eager_step(segment, ids, mask, upstream, lora)
    weights = adapted_weights(segment)

    check = (ids, mask, upstream, lora)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        artifacts = {}
        for fmt in fmts:
            t0 = time.perf_counter()
            files = (onnx_backend.export_onnx(joint, tmp, initial) if fmt == "onnx"
                     else et_backend.export_pte(joint, tmp))
            seconds = trace_seconds + time.perf_counter() - t0
            run = _run_onnx(joint, files, check) if fmt == "onnx" else _run_pte(joint, files, check)
            parity = compare(ref_h, ref_grads, run.h, run.grads)
            halves = compare(ref_h, ref_grads, run.split_h, run.split_grads)
            log.info("%s artifact, joint step: %s", fmt, parity.describe())
            log.info("%s artifact, forward + backward: %s", fmt, halves.describe())
            for what, result in (("joint step", parity), ("forward + backward", halves)):
                if not result.ok(rtol):
                    raise VerificationError(
                        f"the {fmt} artifact's {what} does not match PyTorch eager autograd within {rtol:.1e}: "
                        f"{result.describe()}; nothing was written to {out_dir}")
            errors = {"h": parity.h, "grads": parity.grads, "forward_h": halves.h, "backward": halves.grads}
            artifacts[fmt] = Artifact(
                format=fmt,
                files=run.roles,
                sha256={f.name: sha256_file(f) for f in files},
                bytes={f.name: f.stat().st_size for f in files},
                inputs=[TensorSpec(**spec) for spec in run.inputs],
                outputs=[TensorSpec(**spec) for spec in run.outputs],
                gradients=run.gradients,
                parity=errors,
                export_seconds=round(seconds, 2),
                frozen_weights=locate(weights, files),
                methods=run.methods,
            )
        manifest = Manifest(
            schema=SCHEMA,
            model=name,
            family=family_of(model).name,
            split=split,
            ranks={f"{t.layer}.{t.proj}": f.rank for t, f in adapters(model).items() if t.layer < split},
            alpha={f"{t.layer}.{t.proj}": f.alpha for t, f in adapters(model).items() if t.layer < split},
            batch=batch,
            seq=seq,
            hidden=joint.hidden,
            vocab=joint.vocab,
            lora=[TensorSpec(k, list(s), "float32") for k, s in joint.lora_shapes.items()],
            lora_fqns=dict(joint.lora_fqns),
            tolerance=rtol,
            tools=tool_versions(),
            artifacts=artifacts,
        )
        manifest.save(tmp)
        _publish_permissions(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest

