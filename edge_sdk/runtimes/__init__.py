"""Device runtimes: one interface (`DeviceRuntime`), three implementations, an optimizer in SDK code.

    torch        TorchRuntime(segment)          eager PyTorch, always available, the reference
    onnxruntime  OnnxRuntime(export_dir)        plain onnxruntime over device_segment.onnx
    executorch   ExecuTorchRuntime(export_dir)  ExecuTorch + XNNPACK over device_segment.pte/.ptd

A training step on the device:

    h = rt.forward(ids, mask, keep=True)        # keeps the activations; send h, receive dL/dh
    grads = rt.backward(dL_dh)                  # the LoRA gradients from the kept activations
    opt.step(rt.lora_tensors(), grads)          # AdamW in place (edge_sdk.runtimes.optim)

`rt.step(ids, mask, dL_dh)` does both at once where dL/dh is known up front.

Artifacts come from `hsplitlora export` (docs/export.md).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from edge_sdk.runtimes.base import DeviceRuntime, fresh_lora
from edge_sdk.runtimes.optim import AdamW
from hsplitlora.federation.manifest import ArtifactError

log = logging.getLogger(__name__)

# Preference when nothing is asked for: onnxruntime was the fastest per step on this project's CPU
# measurements (docs/export.md), eager torch next, ExecuTorch (the mobile-native runtime) last.
PREFERENCE = ("onnxruntime", "torch", "executorch")
FORMAT_OF = {"onnxruntime": "onnx", "executorch": "pte", "torch": None}
_MODULES = {"torch": ("torch", "transformers"), "onnxruntime": ("onnxruntime",),
            "executorch": ("executorch.extension.training",)}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_runtimes() -> list[str]:
    """The runtimes whose packages are installed, in preference order."""
    return [name for name in PREFERENCE if all(_installed(m) for m in _MODULES[name])]


def choose_runtime(preferred: str | None = None, formats: list[str] | None = None) -> str:
    """The runtime to use: `preferred` if installed (and its artifact format is in `formats`, when
    given), else the first installed one that fits, with a warning. Eager torch needs no artifact."""
    if preferred is not None and preferred not in PREFERENCE:
        raise ValueError(f"unknown runtime {preferred!r}; choose from {', '.join(PREFERENCE)}")

    def fits(name: str) -> bool:
        return formats is None or FORMAT_OF[name] is None or FORMAT_OF[name] in formats

    usable = [name for name in available_runtimes() if fits(name)]
    if not usable:
        raise RuntimeError("no device runtime is installed: install torch, onnxruntime or executorch")
    if preferred is None or preferred in usable:
        return preferred or usable[0]
    log.warning("runtime %s is not usable here (installed: %s; artifact formats: %s); using %s",
                preferred, ", ".join(available_runtimes()) or "none", formats, usable[0])
    return usable[0]


def open_runtime(name: str, source, **kwargs) -> DeviceRuntime:
    """`source` is an export directory for onnxruntime / executorch, a device Segment for torch."""
    if name == "torch":
        from edge_sdk.runtimes.torch_runtime import TorchRuntime

        return TorchRuntime(source, **kwargs)
    if name == "onnxruntime":
        from edge_sdk.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(Path(source), **kwargs)
    if name == "executorch":
        from edge_sdk.runtimes.executorch_runtime import ExecuTorchRuntime

        return ExecuTorchRuntime(Path(source), **kwargs)
    raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(PREFERENCE)}")


def __getattr__(name: str):
    # The implementations import their (heavy, optional) packages lazily.
    if name == "TorchRuntime":
        from edge_sdk.runtimes.torch_runtime import TorchRuntime

        return TorchRuntime
    if name == "OnnxRuntime":
        from edge_sdk.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime
    if name == "ExecuTorchRuntime":
        from edge_sdk.runtimes.executorch_runtime import ExecuTorchRuntime

        return ExecuTorchRuntime
    raise AttributeError(name)


__all__ = [
    "PREFERENCE", "AdamW", "ArtifactError", "DeviceRuntime", "ExecuTorchRuntime", "OnnxRuntime",
    "TorchRuntime", "available_runtimes", "choose_runtime", "fresh_lora",
    "open_runtime",
]
