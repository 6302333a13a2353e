"""`hsplitlora export` options: one typed config, whose defaults `export.build` takes too."""

from __future__ import annotations

from dataclasses import dataclass

from hsplitlora.configs import ALPHA_HELP, option
from hsplitlora.federation.manifest import DEFAULT_RTOL
from hsplitlora.models import DEFAULT_MODEL, MODEL_HELP

FORMAT_CHOICES = ("onnx", "pte", "both")


@dataclass
class ExportConfig:
    """What to export, and how it is verified."""

    split: int = option(metavar="K", help="cut after block K: the device runs the embeddings and blocks 0..K-1")
    out_dir: str = option(flag="--out", metavar="DIR",
                          help="output directory; must be new, empty, or an earlier export (replaced)")
    model: str = option(DEFAULT_MODEL, help=MODEL_HELP)
    ranks: str = option("q=8,v=8", metavar="SPEC",
                        help="LoRA ranks, e.g. 'q=8,v=8' (every layer), '0-1:q=16', '1.down=4'; targets at or past "
                             "the split are the server's and are left out")
    alpha: float = option(16.0, help=ALPHA_HELP)
    batch: int = option(4, metavar="B", help="batch size, fixed in the artifact")
    seq: int = option(128, metavar="T", help="sequence length, fixed in the artifact: pad or cut batches to it")
    formats: str = option("both", flag="--format", choices=FORMAT_CHOICES, help="artifact format")
    rtol: float = option(DEFAULT_RTOL, help="verification bound: max error relative to the largest |h| / |gradient|")
    seed: int = option(1234, help="seed of the random verification input")
