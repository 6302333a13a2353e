"""`hsplitlora export`: the argparse front of `export.build`.

`add_arguments(parser)` fills any (sub)parser, so the project CLI can mount it as a subcommand;
`main(argv)` runs it standalone (`python -m export ...`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict

from export.config import ExportConfig
from hsplitlora.configs import add_arguments as config_arguments
from hsplitlora.configs import from_arguments

DESCRIPTION = """\
Export the device segment of a model (embeddings + blocks[0:K]) with trainable LoRA as a joint
forward-backward graph: inputs are the tokens, the attention mask, the server's dL/dh and the LoRA
factors; outputs are h and the LoRA gradients. Every artifact is run once through its runtime and
compared with PyTorch eager autograd before anything is written; the output directory then holds
the artifact files and a manifest.json (shapes, tensor names, sha256, tool versions).
"""

EPILOG = """\
formats:
  onnx  device_segment.onnx + device_segment.onnx.data, for plain onnxruntime (Linux, Android,
        iOS); the LoRA factors are model inputs, the optimizer runs in the SDK
  pte   device_segment.pte + device_segment.ptd (the LoRA tensors), for the ExecuTorch runtime
        with XNNPACK (Android, iOS, Linux)
  both  both of the above into one directory

examples:
  hsplitlora export --model tiny-llama --split 2 --ranks q=8,v=8 --batch 2 --seq 32 --out out/tiny
  hsplitlora export --model smollm2-135m --split 2 --ranks 0-1:q=16,0-1:v=8 --batch 4 --seq 128 \\
      --format onnx --out out/smollm2-k2

See docs/export.md for shipping the result to devices.
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return config_arguments(parser, ExportConfig)


def build_parser(prog: str = "hsplitlora export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run a parsed `export` command; prints a summary, returns the exit status."""
    from export.pipeline import build
    from export.verify import VerificationError

    try:
        manifest = build(**asdict(from_arguments(ExportConfig, args)))
    except VerificationError as e:
        print(f"export failed verification: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    targets = ", ".join(f"{t}={r}" for t, r in manifest.ranks.items())
    print(f"{manifest.model}: device segment = embeddings + blocks 0-{manifest.split - 1}, "
          f"batch {manifest.batch} x seq {manifest.seq}, LoRA {targets}")
    for fmt, art in manifest.artifacts.items():
        sizes = ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in art.bytes.items())
        print(f"  {fmt}: {sizes}; export {art.export_seconds:.1f} s; parity h {art.parity['h']:.1e}, "
              f"grads {art.parity['grads']:.1e} (bound {manifest.tolerance:.0e})")
    print(f"wrote {args.out_dir}/manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
