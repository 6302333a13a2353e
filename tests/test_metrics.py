"""Tests for hsplitlora.metrics against the official E2E challenge scores.

The E2E data is not part of this repository: it is read from ``../shared/data/e2e`` (relative to
the repository root) or from the directory in ``HSPLITLORA_E2E_DIR``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from hsplitlora import metrics
from hsplitlora.metrics import bleu, coco_metrics, e2e_scores, nist, perplexity

E2E_DIR = Path(
    os.environ.get("HSPLITLORA_E2E_DIR", Path(__file__).resolve().parents[2] / "shared/data/e2e")
)

# Official scores of reference-output/tgen-std.run0.txt (E2E challenge measure_scores.py; NIST is
# the value of its Python mteval, see shared/data/e2e/README.md).
OFFICIAL = {"BLEU": 0.6636, "NIST": 8.6435, "METEOR": 0.4472, "ROUGE_L": 0.6827, "CIDEr": 2.2075}

no_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap (METEOR/ROUGE_L/CIDEr) needs Java on PATH"
)


@pytest.fixture(scope="module")
def tgen() -> tuple[list[str], list[list[str]]]:
    """Outputs of the published TGen system on the 630 test MRs and their grouped references."""
    out_dir = E2E_DIR / "reference-output"
    if not out_dir.is_dir():
        pytest.skip(f"E2E data not found at {out_dir} (set HSPLITLORA_E2E_DIR to the e2e data directory)")
    hyps = (out_dir / "tgen-std.run0.txt").read_text(encoding="utf-8").splitlines()
    text = (out_dir / "test_refs_multi.txt").read_text(encoding="utf-8")
    refs = [group.splitlines() for group in text.strip("\n").split("\n\n")]
    assert len(hyps) == len(refs) == 630
    assert sum(len(group) for group in refs) == 4693
    return hyps, refs


def test_bleu_matches_official(tgen):
    assert round(bleu(*tgen), 4) == OFFICIAL["BLEU"]


def test_nist_matches_official_python_mteval(tgen):
    assert round(nist(*tgen), 4) == OFFICIAL["NIST"]


def _child_pids() -> set[int]:
    """PIDs of this process's live children (Linux /proc), to detect leaked java processes."""
    pids: set[int] = set()
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        pids.update(int(p) for p in children.read_text().split())
    return pids


@no_java
def test_coco_metrics_match_official(tgen):
    before = _child_pids() if sys.platform.startswith("linux") else set()
    scores = coco_metrics(*tgen)
    assert scores is not None
    assert {k: round(v, 4) for k, v in scores.items()} == {
        k: OFFICIAL[k] for k in ("METEOR", "ROUGE_L", "CIDEr")
    }
    if sys.platform.startswith("linux"):
        assert _child_pids() - before == set(), "a java subprocess was left running"


def test_e2e_scores_without_java(monkeypatch, caplog):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    hyps = ["the eagle is a pub near the river ."]
    refs = [["the eagle is a pub near the river .", "there is a pub called the eagle"]]
    with caplog.at_level(logging.WARNING, logger="hsplitlora.metrics"):
        assert coco_metrics(hyps, refs) is None
        scores = e2e_scores(hyps, refs)
    assert set(scores) == {"BLEU", "NIST"}
    assert "java" in caplog.text.lower()
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["NIST"] > 0


def test_identical_hypothesis_gives_bleu_one():
    text = "The Eagle is a coffee shop near Burger King in the riverside area."
    assert bleu([text], [[text]]) == pytest.approx(1.0)
    assert bleu([text.upper()], [[text]]) == pytest.approx(1.0)  # case-insensitive


def test_variable_reference_counts():
    # Each hypothesis equals one of its references; the groups have different sizes, so the
    # references must be transposed into padded streams correctly for BLEU to be 1.
    hyps = ["a b c d e f", "g h i j k l", "m n o p q r"]
    refs = [["x y z w v u", "a b c d e f"], ["g h i j k l"], ["s t", "u v", "m n o p q r"]]
    assert bleu(hyps, refs) == pytest.approx(1.0)
    assert nist(hyps, refs) > 0


def test_nist_short_and_empty_hypotheses():
    # Hypotheses shorter than the n-gram order, and empty ones, must not crash or divide by zero.
    assert nist(["a"], [["a"]]) == 0.0  # a word present in every reference carries no information
    assert nist([""], [["a b"]]) == 0.0
    assert nist(["a b"], [["a b", "c"]]) > 0


@pytest.mark.parametrize("fn", [bleu, nist, coco_metrics, e2e_scores])
@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        ([], [], "at least one hypothesis"),
        (["a b"], [], "differ in length"),
        (["a b", "c d"], [["a b"]], "differ in length"),
        (["a b", "c d"], [["a b"], []], "hypothesis 1 has no reference"),
        (["a b"], ["a b"], "is a string"),
    ],
)
def test_invalid_input_raises(fn, hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        fn(hyps, refs)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e6) == math.inf  # overflow guarded
