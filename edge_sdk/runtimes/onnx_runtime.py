"""Plain onnxruntime over an exported `device_segment.onnx` (no onnxruntime-training needed).

The model takes the LoRA factors as inputs and returns h and their gradients, so the runtime
holds the LoRA tensors itself (fresh adapters until `set_lora_tensors`) and feeds them on every
call. A training step runs `device_segment_forward.onnx` (h and the activations the backward
reads) and then `device_segment_backward.onnx` (the gradients from those activations and dL/dh);
`step` runs the joint `device_segment.onnx`. Frozen weights live in `device_segment.onnx.data`,
shared by the three graphs; a merged update is written into that file in place and the sessions
are rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_sdk.runtimes.base import DeviceRuntime, check_grad, check_inputs, fresh_lora, patch_frozen_weights
from hsplitlora.federation.manifest import read_manifest

FORMAT = "onnx"


class OnnxRuntime(DeviceRuntime):
    name = "onnxruntime"

    def __init__(self, directory: str | Path, *, threads: int | None = None, verify_hashes: bool = True,
                 seed: tuple = (0,)):
        import onnxruntime as ort

        self._ort = ort
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, FORMAT, verify_hashes)
        self.artifact = self.manifest["artifacts"][FORMAT]
        self.threads = threads
        self._lora = {t["name"]: torch.zeros(t["shape"]) for t in self.manifest["lora"]}
        self.set_lora_tensors(fresh_lora(self.lora_shapes(), seed))
        self._open()

    def _open(self) -> None:
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if self.threads != 1:
            # Workers that spin between ops cost more than they save when the pool fills the cores:
            # at 2 threads on the 2-core machine here a qv8 k=8 step took 444-472 ms spinning and
            # 372-376 ms not (k=2: 188 against 86-88 ms, slower than one thread). A device that
            # trains in the background also wants the cores idle between ops.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        files = self.artifact["files"]

        def session(role: str):
            return self._ort.InferenceSession(str(self.directory / files[role]), options,
                                              providers=["CPUExecutionProvider"])

        # The three graphs share the weight file (ORT maps it: little extra memory).
        self.session, self.forward_session, self.backward_session = (session(r) for r in ("program", "forward", "backward"))
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._saved = [o.name for o in self.forward_session.get_outputs()[1:]]

    def _feeds(self, input_ids, attention_mask, upstream_grad=None) -> dict[str, np.ndarray]:
        input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        check_inputs(self.manifest, input_ids, attention_mask, upstream_grad)
        feeds = {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.numpy().astype(np.int64, copy=False)}
        if upstream_grad is not None:
            feeds["upstream_grad"] = _float_array(upstream_grad)
        feeds.update(self._lora_feeds())
        return feeds

    def _lora_feeds(self) -> dict[str, np.ndarray]:
        return {f"lora.{k}": v.numpy() for k, v in self._lora.items()}

    def _gradients(self, values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(values[self.artifact["gradients"][k]]) for k in self._lora}

    def step(self, input_ids, attention_mask, upstream_grad):
        values = dict(zip(self._outputs, self.session.run(None, self._feeds(input_ids, attention_mask,
                                                                            torch.as_tensor(upstream_grad)))))
        return torch.from_numpy(values["h"]), self._gradients(values)

    def forward(self, input_ids, attention_mask, *, keep=False):
        self._keep(None)
        outputs = self.forward_session.run(None if keep else ["h"], self._feeds(input_ids, attention_mask))
        if keep:
            self._keep(dict(zip(self._saved, outputs[1:])))
        return torch.from_numpy(outputs[0])

    def backward(self, upstream_grad):
        saved = self._take_kept()
        upstream_grad = torch.as_tensor(upstream_grad)
        check_grad(self.manifest, upstream_grad)
        names = list(self.artifact["gradients"].values())
        grads = self.backward_session.run(names, {"upstream_grad": _float_array(upstream_grad),
                                                  **self._lora_feeds(), **saved})
        return self._gradients(dict(zip(names, grads)))

    def lora_tensors(self):
        return self._lora

    def _merge(self, deltas):
        self.session = self.forward_session = self.backward_session = None  # release the mapped weights
        try:
            patch_frozen_weights(self.directory, self.manifest, FORMAT, deltas)
        finally:
            self._open()


def _float_array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()
