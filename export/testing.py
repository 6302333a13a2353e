"""Helpers for tests: one build per configuration per process, shared by every test file.

An export of a tiny model takes seconds; the export and runtime tests use the same few
configurations, so they are built once into a process-wide temporary directory. Tests that change
an artifact (merges patch files in place) must work on a `copy_export` of it.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from export.pipeline import build
from hsplitlora.federation.manifest import Manifest

_ROOT: Path | None = None
_BUILT: dict[tuple, tuple[Path, Manifest]] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="hsplitlora-export-tests-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def cached_build(model: str, split: int, ranks: str, batch: int = 2, seq: int = 8,
                 formats: str = "both", alpha: float = 16.0) -> tuple[Path, Manifest]:
    """(export directory, manifest) of a build, made on first request. Do not modify the directory."""
    key = (model, split, ranks, batch, seq, formats, alpha)
    if key not in _BUILT:
        out = _root() / f"{model}-k{split}-{len(_BUILT)}"
        _BUILT[key] = (out, build(model, split, ranks, alpha=alpha, batch=batch, seq=seq, formats=formats,
                                  out_dir=out))
    return _BUILT[key]


def copy_export(directory: Path, dest: Path) -> Path:
    shutil.copytree(directory, dest)
    return dest
