"""The project's environment as a newcomer meets it: importing what it is built on prints no load errors."""

import subprocess
import sys


def test_importing_peft_loads_no_torchao_kernels_built_for_cuda():
    """executorch brings torchao; its platform wheel holds only CUDA kernels, which a CPU torch fails
    to load on every import ("Failed to load ..._C_*.so"): `make install` puts its pure-Python
    wheel in place instead."""
    out = subprocess.run([sys.executable, "-c", "import peft, torchao"], capture_output=True, text=True, check=True)
    assert "Failed to load" not in out.stderr, out.stderr
