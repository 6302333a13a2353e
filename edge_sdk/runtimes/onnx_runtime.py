"""Plain onnxruntime over an exported `device_segment.onnx` (no onnxruntime-training needed).

The model takes the LoRA factors as inputs and returns h and their gradients, so the runtime
holds the LoRA tensors itself (fresh adapters until `set_lora_tensors`) and feeds them on every
call. `forward` runs `device_segment_forward.onnx`, the subgraph that computes h alone. Frozen
weights live in `device_segment.onnx.data`, shared by both graphs; a merged update is written
into that file in place and the sessions are rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_sdk.runtimes.base import DeviceRuntime, check_inputs, fresh_lora, patch_frozen_weights, read_manifest

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
        files = self.artifact["files"]
        self.session = self._ort.InferenceSession(str(self.directory / files["program"]), options,
                                                  providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self.session.get_outputs()]
        # The forward-only graph shares the weight file (ORT maps it: little extra memory).
        self.forward_session = None
        if "forward" in files:
            self.forward_session = self._ort.InferenceSession(str(self.directory / files["forward"]), options,
                                                              providers=["CPUExecutionProvider"])

    def _feeds(self, input_ids, attention_mask, upstream_grad) -> dict[str, np.ndarray]:
        input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        upstream_grad = torch.as_tensor(upstream_grad)
        check_inputs(self.manifest, input_ids, attention_mask, upstream_grad)
        feeds = {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.numpy().astype(np.int64, copy=False),
                 "upstream_grad": upstream_grad.detach().float().numpy()}
        feeds.update({f"lora.{k}": v.numpy() for k, v in self._lora.items()})
        return feeds

    def step(self, input_ids, attention_mask, upstream_grad):
        values = dict(zip(self._outputs, self.session.run(None, self._feeds(input_ids, attention_mask, upstream_grad))))
        h = torch.from_numpy(values["h"])
        return h, {k: torch.from_numpy(values[self.artifact["gradients"][k]]) for k in self._lora}

    def forward(self, input_ids, attention_mask):
        shape = (self.manifest["batch"], self.manifest["seq"], self.manifest["hidden"])
        feeds = self._feeds(input_ids, attention_mask, torch.zeros(shape))
        if self.forward_session is None:  # an artifact without the forward graph: the joint one
            return torch.from_numpy(self.session.run(["h"], feeds)[0])
        del feeds["upstream_grad"]
        return torch.from_numpy(self.forward_session.run(["h"], feeds)[0])

    def lora_tensors(self):
        return self._lora

    def _merge(self, deltas):
        self.session = self.forward_session = None  # release the mapped weight file before patching
        try:
            patch_frozen_weights(self.directory, self.manifest, FORMAT, deltas)
        finally:
            self._open()
