"""Exported device segments the server builds for plans and serves to devices (docs/export.md).

An artifact is exported from the base checkpoint, not from the merged weights, so one build serves
every device with the same (split, device ranks, format) in every round: the device brings its copy
up to date by merging the run's deltas for its blocks (`GET /v1/deltas`) into it in place, and the
round updates after that, as the eager client does. Builds run `hsplitlora export` in a child
process: tracing and lowering take seconds to a minute, must not block the event loop, and a
crash in an exporter must not take the server down.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hsplitlora.federation.manifest import SCHEMA
from hsplitlora.planner import Plan

log = logging.getLogger(__name__)
FORMATS = ("onnx", "pte")


class BuildError(RuntimeError):
    """The export of an artifact failed (its log is in the message)."""


@dataclass(frozen=True)
class ArtifactKey:
    """What an artifact depends on; equal keys are the same files."""

    model: str
    split: int
    ranks: str  # the device ranks as a rank spec, '0.q=16,0.v=8,...' in target order
    alpha: float
    batch: int
    seq: int
    format: str

    @classmethod
    def for_plan(cls, model: str, plan: Plan, alpha: float, batch: int, seq: int, fmt: str) -> ArtifactKey:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        ranks = ",".join(f"{t}={r}" for t, r in sorted(plan.ranks.items()) if t.layer < plan.split and r > 0)
        return cls(model, plan.split, ranks, float(alpha), batch, seq, fmt)

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


class ArtifactCache:
    """Built artifacts under `<state>/artifacts/<id>/`, each built once (concurrent asks wait)."""

    def __init__(self, root: Path):
        self.root = Path(root) / "artifacts"
        self._locks: dict[str, asyncio.Lock] = {}

    def directory(self, artifact_id: str) -> Path:
        return self.root / artifact_id

    def manifest(self, artifact_id: str) -> dict | None:
        path = self.directory(artifact_id) / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    async def ensure(self, key: ArtifactKey) -> dict:
        """The manifest of the key's artifact, exporting it first if it is not built yet."""
        lock = self._locks.setdefault(key.id, asyncio.Lock())
        async with lock:
            manifest = self.manifest(key.id)
            if manifest is None or manifest.get("schema") != SCHEMA:  # not built, or by an older exporter
                await self._build(key)
                manifest = self.manifest(key.id)
            return manifest

    async def _build(self, key: ArtifactKey) -> None:
        out = self.directory(key.id)
        log.info("exporting %s artifact %s: split %d, ranks %s", key.format, key.id, key.split, key.ranks)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "export", "--model", key.model, "--split", str(key.split),
            "--ranks", key.ranks, "--alpha", repr(key.alpha), "--batch", str(key.batch), "--seq", str(key.seq),
            "--format", key.format, "--out", str(out),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise BuildError(f"export of artifact {key.id} failed (exit {proc.returncode}): "
                             f"{output.decode(errors='replace')[-2000:]}")
        log.info("artifact %s built", key.id)

    def describe(self, artifact_id: str, manifest: dict, fmt: str) -> dict:
        """What a device needs to fetch an artifact: its manifest and each file's size, hash and URL."""
        art = manifest["artifacts"][fmt]
        return {
            "id": artifact_id, "format": fmt, "manifest": manifest,
            "files": [{"name": name, "bytes": art["bytes"][name], "sha256": digest,
                       "url": f"/v1/artifacts/{artifact_id}/{name}"} for name, digest in sorted(art["sha256"].items())],
        }

    def file(self, artifact_id: str, name: str) -> Path | None:
        """A file of a built artifact, if it is one (names are checked against its manifest)."""
        manifest = self.manifest(artifact_id) if artifact_id.isalnum() else None
        if manifest is None:
            return None
        names = {n for art in manifest["artifacts"].values() for n in art["sha256"]}
        return self.directory(artifact_id) / name if name in names else None
