"""Export of device segments with trainable LoRA to ONNX and ExecuTorch (being built)."""
