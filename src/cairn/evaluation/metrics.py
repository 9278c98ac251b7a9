"""Per-example metrics, each in [0, 1]: exact, choice, rouge_l, edit_sim, sari."""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

_PUNCT = string.punctuation + "“”‘’«»…–—"


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and punctuation."""
    return " ".join(text.lower().split()).strip(_PUNCT + " ")


def exact(prediction: str, answer: str, source: str = "") -> float:
    return float(normalize(prediction) == normalize(answer))


def choice(prediction: str, answer: str, source: str = "") -> float:
    """First non-space character equal to the answer's (TRACE's accuracy for lettered choices)."""
    p, a = prediction.strip(), answer.strip()
    return float(bool(p) and bool(a) and p[0].upper() == a[0].upper())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, answer: str, source: str = "") -> float:
    """ROUGE-L F1 (rouge-score's tokenizer: lower-cased alphanumeric tokens)."""
    return _rouge().score(answer, prediction)["rougeL"].fmeasure


def edit_sim(prediction: str, answer: str, source: str = "") -> float:
    """rapidfuzz's normalised Indel similarity (fuzz.ratio) / 100."""
    from rapidfuzz import fuzz

    return fuzz.ratio(prediction, answer) / 100.0


_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _sari_ngram(src: Counter, pred: Counter, refs: list[Counter]) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order (Xu et al. 2016).

    Written by hand: no maintained library on PyPI computes SARI without pulling a large
    framework. Counts are scaled by the number of references as in the original, with the
    usual fixes (keep recall over all reference-kept n-grams; 0/0 counts as 1).
    """
    k = len(refs)
    ref = sum(refs, Counter())
    src_k = Counter({g: c * k for g, c in src.items()})
    pred_k = Counter({g: c * k for g, c in pred.items()})

    kept = src_k & pred_k
    kept_good = kept & ref
    kept_all = src_k & ref
    keep_p = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1.0

    deleted = src_k - pred_k
    deleted_good = deleted - ref
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(pred) - set(src)
    added_good = added & set(ref)
    added_all = set(ref) - set(src)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(added_all) if added_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari(prediction: str, answer: str | list[str], source: str = "") -> float:
    """SARI / 100 of `prediction` as a simplification of `source` against reference(s) `answer`.

    Lower-cased word/punctuation tokens, n-grams 1..4; mean of keep F1, deletion precision and
    addition F1, each averaged over the four orders.
    """
    tok = lambda s: _TOKEN.findall(s.lower())  # noqa: E731
    refs = [answer] if isinstance(answer, str) else list(answer)
    s, p, rs = tok(source), tok(prediction), [tok(r) for r in refs]
    parts = [_sari_ngram(_ngrams(s, n), _ngrams(p, n), [_ngrams(r, n) for r in rs]) for n in range(1, 5)]
    keep, delete, add = (sum(x[i] for x in parts) / 4 for i in range(3))
    return (keep + delete + add) / 3


METRIC_FNS = {"exact": exact, "choice": choice, "rouge_l": rouge_l, "edit_sim": edit_sim, "sari": sari}


# The end of a first clause: , ; ! ? or a newline, or a full stop followed by a space or the end
# (so 3.14 and e.g. "U.S" inside a word stay whole). lm-eval-harness expresses the same with its
# `regex` filter; tests/evaluation/test_extraction.py checks Cairn's scores against lm-eval's.
_CLAUSE = re.compile(r"^(.*?)(?:[,;!?\n]|\.(?=\s|$)|$)", re.S)


def extract(prediction: str, how: str) -> str:
    """The part of a generation a metric judges (a task's `extract`):

    - `full`: the whole generation ("Jupiter, but it's not the" against "Jupiter": no match);
    - `first_line`: up to the first newline;
    - `first_clause`: up to the first , ; ! ? newline or sentence-ending full stop
      ("Jupiter, but it's not the" -> "Jupiter"; "3.14 is pi" -> "3.14 is pi");
    - `prefix`: the whole generation, which `exact` then matches when it starts with the answer at
      a word boundary ("Jupiter, but" and "jupiter is" match "Jupiter"; "Jupiterian" does not).
    """
    if how == "first_line":
        return prediction.strip().split("\n", 1)[0]
    if how == "first_clause":
        return _CLAUSE.match(prediction.strip()).group(1)
    return prediction


def starts_with(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction begins with the normalised answer, ending at a word boundary."""
    p, a = normalize(prediction), normalize(answer)
    return float(bool(a) and p.startswith(a) and (len(p) == len(a) or not (p[len(a)].isalnum() or p[len(a)] == "_")))


def score(metric: str, prediction: str, answer: str, source: str = "", extraction: str = "full") -> float:
    """Score one prediction by the named metric on the part `extraction` keeps (`source` is the
    prompt; only SARI reads it). `prefix` changes `exact` into a match at the answer's start."""
    if extraction == "prefix" and metric == "exact":
        return starts_with(prediction, answer)
    return METRIC_FNS[metric](extract(prediction, extraction), answer, source)
