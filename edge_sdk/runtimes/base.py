"""The one small interface every device runtime shares, and what the artifact-backed ones need.

A runtime runs the device segment (embeddings + blocks[0:k] + LoRA) for one training step:

    step(input_ids, attention_mask, upstream_grad) -> (h, {'0.q.A': dL/dA, ...})

with upstream_grad = dL/dh from the server; the gradients are those of sum(h * upstream_grad),
i.e. exactly the LoRA gradients of the server's loss. The optimizer lives outside the runtime
(`edge_sdk.runtimes.optim.AdamW`) and updates `lora_tensors()` in place. All tensors are
`torch.Tensor` on the CPU; LoRA keys are the project's '<layer>.<proj>.A' / '.B'.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from hsplitlora.federation.manifest import MANIFEST, ArtifactError
from hsplitlora.hashing import sha256_file
from hsplitlora.lora import Target, init_generator, initial_A

class DeviceRuntime(ABC):
    """A device segment with trainable LoRA, behind one of the runtimes."""

    name: str = "abstract"

    @abstractmethod
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, upstream_grad: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """h and the gradient of sum(h * upstream_grad) w.r.t. every LoRA tensor."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, keep: bool = False) -> torch.Tensor:
        """h (what the device sends before it knows dL/dh). With keep=True the runtime also keeps
        what `backward` needs (the activations), until that backward."""

    @abstractmethod
    def backward(self, upstream_grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradient of sum(h * upstream_grad) w.r.t. every LoRA tensor, for the h of the last
        `forward(..., keep=True)`, from the activations it kept (the forward does not run again);
        releases them. The LoRA tensors must not change in between: step the optimizer after this.
        """

    def _keep(self, kept) -> None:
        self._kept = kept

    def _take_kept(self):
        kept, self._kept = getattr(self, "_kept", None), None
        if kept is None:
            raise RuntimeError("backward() needs a forward(..., keep=True) first (one backward per forward)")
        return kept

    def batch_shape(self) -> tuple[int, int] | None:
        """(batch, seq) every batch must be padded to (an exported segment's fixed shapes), or None."""
        manifest = getattr(self, "manifest", None)
        return (manifest["batch"], manifest["seq"]) if manifest else None

    def importance_probe(self):
        """A context manager scoring this segment's weights' importance over the forward and
        backward it spans (`.normalised()` after it), or None where the runtime computes no weight
        gradients (the exported artifacts)."""
        return None

    @abstractmethod
    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The live LoRA tensors by key; an optimizer updates them in place."""

    def set_lora_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy values into the live LoRA tensors (every key must exist, shapes must match)."""
        live = self.lora_tensors()
        unknown = set(tensors) - set(live)
        if unknown:
            raise KeyError(f"no LoRA tensors {sorted(unknown)} in this segment; it has {sorted(live)}")
        with torch.no_grad():
            for key, value in tensors.items():
                value = torch.as_tensor(value)
                if tuple(value.shape) != tuple(live[key].shape):
                    raise ValueError(f"{key}: shape {tuple(value.shape)}, the segment's is {tuple(live[key].shape)}")
                live[key].copy_(value.to(live[key].dtype))

    def apply_merged_update(self, changes: dict[str, torch.Tensor]) -> None:
        """Add dense changes to the frozen weights (design §4: no new download): '<layer>.<proj>'
        -> (d_out, d_in), e.g. a merge update's `Update.dense()` keyed by `str(target)`. The LoRA
        tensors are left as they are: after a merge the caller restarts them (`fresh_lora`, or
        values from the server) and resets the optimizer.
        """
        for key in changes:
            Target.parse(key)  # ValueError for anything but '<layer>.<proj>'
        self._merge({k: torch.as_tensor(v).float() for k, v in changes.items()})

    def _merge(self, deltas: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"the {self.name} runtime cannot merge updates into its frozen weights")

    def lora_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.lora_tensors().items()}


def fresh_lora(shapes: dict[str, tuple[int, ...]], seed: tuple = (0,)) -> dict[str, torch.Tensor]:
    """Fresh adapters exactly as `hsplitlora.lora.apply_lora(..., seed=seed)` makes them: A
    Kaiming-uniform from `init_generator(*seed, target)`, B = 0 (the update B @ A starts at zero)."""
    out = {}
    for key, shape in shapes.items():
        target, _, kind = key.rpartition(".")
        out[key] = initial_A(shape, init_generator(*seed, target)) if kind == "A" else torch.zeros(shape)
    return out


# ---- artifact directories (hsplitlora.federation.manifest is their contract) ---------------------


def check_inputs(manifest: dict, input_ids, attention_mask, upstream_grad=None) -> None:
    """Shapes are fixed at export: say so plainly instead of a runtime's shape error."""
    want = (manifest["batch"], manifest["seq"])
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; this artifact was exported for (batch, seq) = "
                             f"{want}: pad or cut batches to it, or export again")
    if upstream_grad is not None:
        check_grad(manifest, upstream_grad)


def check_grad(manifest: dict, upstream_grad) -> None:
    want = (manifest["batch"], manifest["seq"], manifest["hidden"])
    if tuple(upstream_grad.shape) != want:
        raise ValueError(f"upstream_grad has shape {tuple(upstream_grad.shape)}, expected {want}")


def patch_frozen_weights(directory: Path, manifest: dict, fmt: str, deltas: dict[str, torch.Tensor]) -> None:
    """Add dense deltas to the frozen weights stored in an artifact's files, in place.

    Uses the artifact's `frozen_weights` table (every byte range holding a copy of an adapted W
    and its layout). The caller must have released the program; it reloads it afterwards. The
    manifest's hashes are updated to the patched files, so `read_manifest` keeps checking them.
    """
    art = manifest["artifacts"][fmt]
    by_target = {}
    for entry in art["frozen_weights"]:
        for proj, rows in entry["targets"].items():
            by_target[f"{entry['layer']}.{proj}"] = (entry, rows)
    unknown = set(deltas) - set(by_target)
    if unknown:
        raise KeyError(f"no adapted weight for {sorted(unknown)} in this segment (it has {sorted(by_target)})")
    plans: dict[str, tuple[dict, np.ndarray]] = {}
    for target, delta in deltas.items():
        entry, (lo, hi) = by_target[target]
        if not entry["copies"]:
            raise NotImplementedError(f"the exporter found no stored copy of {entry['name']}: cannot merge into it "
                                      "in place; export the segment again with the merged weights")
        d_in = entry["shape"][1]
        if tuple(delta.shape) != (hi - lo, d_in):
            raise ValueError(f"update for {target} has shape {tuple(delta.shape)}, expected {(hi - lo, d_in)}")
        if entry["name"] not in plans:
            copies = [_read_copy(directory, entry, c) for c in entry["copies"]]
            if any(not np.array_equal(copies[0], c) for c in copies[1:]):
                raise ArtifactError(f"the stored copies of {entry['name']} disagree: the artifact was changed "
                                    "outside this SDK; download it again")
            plans[entry["name"]] = (entry, copies[0])
        plans[entry["name"]][1][lo:hi] += delta.numpy().astype(np.float32)
    touched = set()
    for entry, w in plans.values():
        for copy in entry["copies"]:
            data = w if copy["layout"] == "oi" else np.ascontiguousarray(w.T)
            with open(Path(directory) / copy["file"], "r+b") as f:
                f.seek(copy["offset"])
                f.write(data.astype("<f4").tobytes())
            touched.add(copy["file"])
    for name in touched:
        path = Path(directory) / name
        art["sha256"][name] = sha256_file(path)
        art["bytes"][name] = path.stat().st_size
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _read_copy(directory: Path, entry: dict, copy: dict) -> np.ndarray:
    d_out, d_in = entry["shape"]
    with open(Path(directory) / copy["file"], "rb") as f:
        f.seek(copy["offset"])
        raw = np.frombuffer(f.read(4 * d_out * d_in), dtype="<f4")
    if copy["layout"] == "oi":
        return raw.reshape(d_out, d_in).astype(np.float32).copy()
    return raw.reshape(d_in, d_out).T.astype(np.float32).copy()
