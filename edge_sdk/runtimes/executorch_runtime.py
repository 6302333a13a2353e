"""ExecuTorch (XNNPACK) over an exported `device_segment.pte` + `device_segment.ptd`.

`executorch.extension.training.TrainingModule` runs the joint method "forward" and exposes the
live LoRA tensors (loaded from the .ptd) and their gradients by parameter FQN; the manifest maps
FQNs to '0.q.A' keys. A training step runs the program's "forward_h" method (h and the activations
the backward reads) and then "backward_h" (the gradients from those and dL/dh), both fed the live
LoRA tensors (method names from the manifest's `methods`); `step` runs the joint method. The
runtime only exposes its tensors after a first call, so loading runs one warm-up step. Only SGD
ships in the runtime: AdamW runs in SDK code over the live tensors. A merged update is written
into the .pte in place and the program is reloaded (the LoRA values are carried over). Pinned to
executorch 1.4.1 (the training API is experimental).
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import torch

from edge_sdk.runtimes.base import DeviceRuntime, check_grad, check_inputs, patch_frozen_weights
from hsplitlora.federation.manifest import read_manifest

FORMAT = "pte"


class ExecuTorchRuntime(DeviceRuntime):
    name = "executorch"

    def __init__(self, directory: str | Path, *, verify_hashes: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, FORMAT, verify_hashes)
        self.artifact = self.manifest["artifacts"][FORMAT]
        self.fqns = self.manifest["lora_fqns"]
        self.methods = self.artifact["methods"]
        self._order = [t["name"] for t in self.manifest["lora"]]  # the split methods' LoRA inputs
        self._open()

    def _open(self) -> None:
        with warnings.catch_warnings():  # "experimental": known, the version is pinned
            warnings.filterwarnings("ignore", message=".*experimental.*")
            from executorch.extension.pybindings.portable_lib import _load_for_executorch
            from executorch.extension.training import TrainingModule

            files = self.artifact["files"]
            self.module = TrainingModule(_load_for_executorch(str(self.directory / files["program"]),
                                                              str(self.directory / files["lora"])))
        b, t, d = self.manifest["batch"], self.manifest["seq"], self.manifest["hidden"]
        self.module.forward_backward(self.methods["step"], (torch.zeros(b, t, dtype=torch.long),
                                                            torch.ones(b, t, dtype=torch.long), torch.zeros(b, t, d)))
        params = self.module.named_parameters()
        missing = set(self.fqns.values()) - set(params)
        if missing:
            raise RuntimeError(f"the program's trainable tensors lack {sorted(missing)}")
        self._lora = {key: params[fqn] for key, fqn in self.fqns.items()}

    def _live(self) -> list[torch.Tensor]:
        return [self._lora[key] for key in self._order]

    def step(self, input_ids, attention_mask, upstream_grad):
        input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        upstream_grad = torch.as_tensor(upstream_grad)
        check_inputs(self.manifest, input_ids, attention_mask, upstream_grad)
        outs = self.module.forward_backward(self.methods["step"], (input_ids.long(), attention_mask.long(),
                                                                   upstream_grad.detach().float().contiguous()))
        grads = self.module.named_gradients()
        return outs[1], {key: grads[fqn] for key, fqn in self.fqns.items()}

    def forward(self, input_ids, attention_mask, *, keep=False):
        self._keep(None)
        input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        check_inputs(self.manifest, input_ids, attention_mask)
        # Uncloned outputs live in the method's planned memory until its next call: h is copied out,
        # the activations are read by backward() before any next forward (which drops them first).
        outputs = self.module.model.run_method(self.methods["forward"],
                                               (input_ids.long(), attention_mask.long(), *self._live()),
                                               clone_outputs=False)
        if keep:
            self._keep(outputs[1:])
        return outputs[0].clone()

    def backward(self, upstream_grad):
        saved = self._take_kept()
        upstream_grad = torch.as_tensor(upstream_grad)
        check_grad(self.manifest, upstream_grad)
        grads = self.module.model.run_method(self.methods["backward"],
                                             (upstream_grad.detach().float().contiguous(), *self._live(), *saved))
        return dict(zip(self._order, grads))

    def lora_tensors(self):
        return self._lora

    def _merge(self, deltas):
        keep = {k: v.clone() for k, v in self._lora.items()}
        self.module = self._lora = None
        gc.collect()
        try:
            patch_frozen_weights(self.directory, self.manifest, FORMAT, deltas)
        finally:
            self._open()
            self.set_lora_tensors(keep)
