"""hsplitlora core: split learning + LoRA for heterogeneous devices (HSplitLoRA, arXiv 2505.02795).

Pure computation shared by every side: models and their cut, LoRA, adapters on disk, data,
metrics. The edge SDK, the server and the export pipeline import this package.
"""

import logging

# peft imports torchao, which warns on every CPU-only machine about CUDA kernels it cannot load,
# and torch warns about a deprecated pytree registration inside torchao: noise for our users.
for _name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
