"""Text-generation metrics for the E2E NLG task: perplexity, BLEU, NIST, METEOR, ROUGE-L, CIDEr.

All functions are pure computations (no network).  The numbers are meant to match the official
E2E challenge scorer (``measure_scores.py`` of tuetschek/e2e-metrics):

* BLEU: sacrebleu ``BLEU(lowercase=True)`` over all references, reported as a fraction.
* NIST: an own implementation of the e2e-metrics *Python* mteval (``pymteval.py``), which gives
  8.6435 on the reference system output (the Perl mteval-v13a gives 8.6939; nltk's
  ``corpus_nist`` gives 7.11 because it computes the information weights differently).
* METEOR, ROUGE-L, CIDEr: pycocoevalcap 1.2 (PTBTokenizer, then the scorers), which needs Java.

``references[i]`` is the list of references of ``hypotheses[i]``; the count may differ per
hypothesis (E2E has 1-45 references per meaning representation).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter
from typing import Any

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

logger = logging.getLogger(__name__)

__all__ = ["perplexity", "bleu", "nist", "coco_metrics", "e2e_scores"]

# mteval's NIST brevity-penalty constant: chosen so that the penalty is exactly 0.5 when the
# system output is 2/3 as long as the references, i.e. exp(-beta * ln(2/3)^2) == 0.5.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2

_TOKENIZER_13A = Tokenizer13a()


def _validate(hypotheses: list[str], references: list[list[str]]) -> None:
    """Raise ``ValueError`` unless the inputs are a non-empty, aligned corpus with references."""
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses must be a list of strings and references a list of lists of strings")
    if len(hypotheses) == 0:
        raise ValueError("need at least one hypothesis, got an empty list")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references differ in length: {len(hypotheses)} hypotheses, "
            f"{len(references)} reference groups"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string; it must be a list of reference strings")
        if len(refs) == 0:
            raise ValueError(f"hypothesis {i} has no reference (every hypothesis needs at least one)")


def perplexity(mean_nll: float) -> float:
    """Return the perplexity ``exp(mean_nll)`` of a mean per-token negative log-likelihood (nats).

    Returns ``inf`` instead of raising ``OverflowError`` when the loss is huge (diverged run).
    """
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU as a fraction in [0, 1] (0.6636, not 66.36), as the E2E challenge reports it.

    Uses sacrebleu ``BLEU(lowercase=True)`` (13a tokenisation) over all references of each
    hypothesis; a variable number of references per hypothesis is supported.
    """
    _validate(hypotheses, references)
    # sacrebleu wants reference *streams* (stream k = k-th reference of every segment); segments
    # with fewer references are padded with None, which sacrebleu drops per segment.
    max_refs = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(max_refs)]
    return BLEU(lowercase=True).corpus_score(list(hypotheses), streams).score / 100.0


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def nist(hypotheses: list[str], references: list[list[str]], n: int = 5) -> float:
    """Corpus NIST score (Doddington 2002) as computed by the E2E metrics' Python mteval.

    Reproduces 8.6435 on the E2E reference system output ``tgen-std.run0.txt``.
    """
    _validate(hypotheses, references)
    # mteval-v13a tokenisation, case-insensitive matching (as pymteval's default).
    hyps = [_TOKENIZER_13A(h.lower()).split() for h in hypotheses]
    refs = [[_TOKENIZER_13A(r.lower()).split() for r in group] for group in references]
    # Information weights come from the n-gram counts over ALL references of ALL segments (every
    # reference counts, duplicates included); the empty 0-gram () counts all reference words, so
    # a unigram's weight is log2(total words / its count).
    ref_counts: Counter[tuple[str, ...]] = Counter()
    for group in refs:
        for ref in group:
            ref_counts[()] += len(ref)
            for k in range(1, n + 1):
                ref_counts.update(_ngrams(ref, k))
    info_sum = [0.0] * n  # per order: sum of information of matched n-grams
    sys_len = [0] * n  # per order: number of n-grams in the system output
    ref_len = 0.0  # brevity penalty uses the *average* reference length of each segment, summed
    for hyp, group in zip(hyps, refs):
        ref_len += sum(len(ref) for ref in group) / len(group)
        for k in range(1, n + 1):
            # pymteval adds len - k + 1 even when negative (hyp shorter than k); we count real
            # n-grams (never negative), which is what the formula means; same result on E2E.
            sys_len[k - 1] += max(0, len(hyp) - k + 1)
            hyp_ng = _ngrams(hyp, k)
            # Clip each n-gram by its maximum count in any single reference (as BLEU does).
            max_ref: Counter[tuple[str, ...]] = Counter()
            for ref in group:
                max_ref |= _ngrams(ref, k)
            for gram, cnt in hyp_ng.items():
                hits = min(cnt, max_ref[gram])
                if hits:
                    info_sum[k - 1] += hits * math.log2(ref_counts[gram[:-1]] / ref_counts[gram])
    # NIST sums (not geometric-means) the per-order information precisions; an order with no
    # system n-grams at all has no hits either and contributes 0.
    score = sum(info / length for info, length in zip(info_sum, sys_len) if length > 0)
    ratio = sys_len[0] / ref_len if ref_len > 0 else 1.0
    # Penalise only outputs shorter than the references: exp(-beta * ln(ratio)^2), capped at 1.
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return penalty * score


def _close_meteor(meteor: Any) -> None:
    """Stop pycocoevalcap's METEOR java subprocess (its only cleanup is ``__del__``)."""
    proc = meteor.meteor_p
    with meteor.lock:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def coco_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float] | None:
    """METEOR, ROUGE_L and CIDEr via pycocoevalcap 1.2, exactly as the E2E challenge scorer.

    Returns ``None`` (and logs a one-line warning) when no ``java`` executable is on PATH, so
    callers can print "skipped (no Java)".
    """
    _validate(hypotheses, references)
    if shutil.which("java") is None:
        logger.warning("METEOR/ROUGE_L/CIDEr skipped: no 'java' on PATH (pycocoevalcap needs Java)")
        return None
    # Imported lazily: pycocoevalcap is only needed here.
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Tokenise references and hypotheses in two separate runs, as COCOEvalCap.evaluate does.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        _close_meteor(meteor)
    rouge_score, _ = Rouge().compute_score(gts, res)
    cider_score, _ = Cider().compute_score(gts, res)
    return {"METEOR": float(meteor_score), "ROUGE_L": float(rouge_score), "CIDEr": float(cider_score)}


def e2e_scores(hypotheses: list[str], references: list[list[str]], coco: bool = True) -> dict[str, float]:
    """All E2E challenge metrics in one dict: BLEU, NIST, METEOR, ROUGE_L, CIDEr.

    The METEOR/ROUGE_L/CIDEr keys are absent when Java is not available or `coco` is False
    (they cost ~20 s of Java start-up, too much for a quick check).
    """
    scores = {"BLEU": bleu(hypotheses, references), "NIST": nist(hypotheses, references)}
    if not coco:
        return scores
    coco = coco_metrics(hypotheses, references)
    if coco is not None:
        scores.update(coco)
    return scores
