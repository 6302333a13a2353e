"""`manifest.json`: what an export directory holds, for the SDK, the server and a person.

One contract, three readers: `export` writes it (`Manifest.save`), the server caches artifacts by
its `SCHEMA`, and a device checks a downloaded directory with `read_manifest`. The format is
documented in docs/export.md ("The manifest"); bump SCHEMA on incompatible changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hsplitlora.hashing import sha256_file

SCHEMA = "hsplitlora.device-segment/2"  # 2: forward and backward graphs
MANIFEST = "manifest.json"
DEFAULT_RTOL = 1e-5  # the verification bound of an export, relative to the largest |h| / |gradient|


class ArtifactError(RuntimeError):
    """An export directory that cannot be used: missing, corrupted, or of another shape."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class Artifact:
    """One format's files and how to call them."""

    format: str  # "onnx" | "pte"
    files: dict[str, str]  # role -> file name; onnx: program, weights, forward, backward; pte: program, lora
    sha256: dict[str, str]  # file name -> hex digest, as written (in-place merges change it later)
    bytes: dict[str, int]  # file name -> size
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    gradients: dict[str, str]  # LoRA key -> output name (onnx) or parameter FQN (pte)
    # max error relative to the largest magnitude: the joint step's {"h", "grads"}, forward + backward's
    # {"forward_h", "backward"} (h of the forward graph, gradients of the backward graph)
    parity: dict[str, float]
    export_seconds: float
    frozen_weights: list[dict] = field(default_factory=list)  # see export/frozen.py
    # role -> method name inside a multi-method program;
    # pte: {"step": "forward", "forward": "forward_h", "backward": "backward_h"}
    methods: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    schema: str
    model: str
    family: str
    split: int  # the device segment is embeddings + blocks[0:split]
    ranks: dict[str, int]  # '3.q' -> rank, device-side targets only
    alpha: dict[str, float]  # '3.q' -> alpha; the graph applies alpha / rank
    batch: int
    seq: int
    hidden: int
    vocab: int
    lora: list[TensorSpec]  # '3.q.A' (r x d_in), '3.q.B' (d_out x r), in step order
    lora_fqns: dict[str, str]  # '3.q.A' -> parameter FQN inside the program (ExecuTorch names)
    tolerance: float  # the verification bound every artifact met (relative, see docs/export.md)
    tools: dict[str, str]  # package -> version used to export
    artifacts: dict[str, Artifact]  # format -> artifact

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported manifest schema {data.get('schema')!r}, expected {SCHEMA!r}")
        data = dict(data)
        data["lora"] = [TensorSpec(**t) for t in data["lora"]]
        data["artifacts"] = {
            fmt: Artifact(**{**a, "inputs": [TensorSpec(**t) for t in a["inputs"]],
                             "outputs": [TensorSpec(**t) for t in a["outputs"]]})
            for fmt, a in data["artifacts"].items()
        }
        return cls(**data)

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls.from_dict(json.loads((Path(directory) / MANIFEST).read_text()))


def check_files(directory: Path, artifact: Artifact | dict) -> list[str]:
    """Files of an artifact (a manifest's entry, or its JSON) whose size or sha256 differs from
    the manifest (empty: all intact)."""
    art = asdict(artifact) if isinstance(artifact, Artifact) else artifact
    bad = []
    for name, digest in art["sha256"].items():
        path = Path(directory) / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif path.stat().st_size != art["bytes"][name] or sha256_file(path) != digest:
            bad.append(f"{name}: does not match its sha256 in {MANIFEST} (corrupted or changed)")
    return bad


def read_manifest(directory: Path, fmt: str, verify_hashes: bool = True) -> dict:
    """The manifest of an export directory as JSON, checked: schema, the format present, files
    intact (ArtifactError otherwise, saying what to do)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} holds no {MANIFEST}: not an export directory (hsplitlora export)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path}: schema {manifest.get('schema')!r}, this SDK reads {SCHEMA!r}: "
                            "export the segment again (hsplitlora export) or let the server rebuild it")
    if fmt not in manifest["artifacts"]:
        raise ArtifactError(f"{directory} has no {fmt} artifact (it has {sorted(manifest['artifacts'])})")
    bad = check_files(directory, manifest["artifacts"][fmt]) if verify_hashes else []
    if bad:
        raise ArtifactError(f"{directory}: {'; '.join(bad)}; download the artifact again")
    return manifest
