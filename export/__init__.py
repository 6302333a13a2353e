"""Export of device segments with trainable LoRA to ONNX and ExecuTorch (docs/export.md).

`build(model, split, ranks, alpha, batch, seq, formats, out_dir) -> Manifest` exports, verifies
against eager autograd and writes; `main(argv)` is the `hsplitlora export` command.
"""

import importlib

# Resolved on first use: the exporters pull in executorch and onnx, seconds of import time that
# `hsplitlora --help` and the other subcommands should not pay.
_LAZY = {
    "FORMATS": "export.pipeline", "build": "export.pipeline", "parse_formats": "export.pipeline",
    "main": "export.cli", "Artifact": "hsplitlora.federation.manifest", "Manifest": "hsplitlora.federation.manifest",
    "TensorSpec": "hsplitlora.federation.manifest", "DEFAULT_RTOL": "hsplitlora.federation.manifest", "VerificationError": "export.verify",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
