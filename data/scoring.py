"""Answer scoring: the official VQA accuracy with its answer normalisation, exact match,
multiple-choice letter extraction, ANLS (DocVQA), ChartQA's relaxed accuracy and POPE's yes/no.

The normalisation follows the official VQA evaluation script (as also used by LLaVA's
TextVQA evaluator): lower-case; drop or space out punctuation; drop periods not followed by
a digit; number words zero..ten (and "none") to digits; drop the articles a/an/the; map
apostrophe-less contractions ("dont") to their apostrophe form ("don't"). Unlike the official
script, gold answers are normalised exactly like predictions, so raw gold strings work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# A sample counts as correct when its score reaches this. With 10 human answers (VQA v2,
# TextVQA) 0.5 means at least 2 annotators gave the predicted answer (1 match scores 0.3,
# 2 score 0.6); with a single gold answer the VQA score is 0 or 1, so it means a match; ANLS
# is 0 below its own threshold of 0.5, so any answer it accepts counts.
CORRECT_THRESHOLD = 0.5

ANLS_THRESHOLD = 0.5
"""ANLS counts a similarity below this as 0 (the DocVQA challenge's tau)."""
RELAXED_TOLERANCE = 0.05
"""ChartQA: a numeric answer within 5 % of the gold number is correct."""

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (see the module docstring)."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of a prediction against gold answers, both normalised.

    With >= 3 gold answers, the official formula: the mean over the leave-one-out subsets of
    min(1, matches in the subset / 3). With 1 or 2 gold answers (no annotator consensus to
    measure), 1.0 if the prediction matches any gold answer, else 0.0: for a single gold
    answer that is normalised exact match.
    """
    gold = [normalize_answer(a) for a in answers]
    if not gold:
        return 0.0
    pred = normalize_answer(prediction)
    hits = [g == pred for g in gold]
    if len(gold) < 3:
        return float(any(hits))
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(gold)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) == pred for a in answers))


_MC_PATTERNS = (
    re.compile(r"^\s*\(?([A-E])\s*(?:[.:)]|$)"),  # "B", "(B)", "B. dog", "B) dog", "B: dog"
    re.compile(r"^\s*\(?([a-e])\)?\.?\s*$"),  # the whole answer is "b", "(b)" or "b."
    re.compile(r"\b[Aa]nswer\s*(?:is|:)?\s*(?:[Oo]ption\s*)?\(?([A-E])\b"),  # "answer is (B)"
    re.compile(r"\b[Oo]ption\s*\(?([A-E])\b"),  # "option C"
    re.compile(r"\(([A-E])\)"),  # "... (B) ..."
    re.compile(r"\b([B-E])\b|\b(A)\b(?!\s+[a-z])"),  # a lone capital; "A dog" is an article
)


def extract_choice(text: str) -> str | None:
    """The option letter A-E a multiple-choice answer names, upper-case, or None.

    Tried in order: a capital letter opening the text ("B", "(B)", "B. dog"), a text that is
    only a lower-case letter ("b"), "the answer is (B)" / "Answer: B", "option C", a
    parenthesised capital anywhere, a lone capital (not "A" before a lower-case word, which
    is the article).
    """
    for pattern in _MC_PATTERNS:
        match = pattern.search(str(text))
        if match:
            return next(g for g in match.groups() if g).upper()
    return None


def multiple_choice(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the letter extracted from the prediction is one of the gold letters."""
    letter = extract_choice(prediction)
    gold = {extract_choice(a) for a in answers} - {None}
    return float(letter is not None and letter in gold)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA, InfographicVQA).

    Both sides are lower-cased with runs of whitespace collapsed; the similarity to a gold
    answer is 1 - distance / the longer length; the best gold answer counts, and a
    similarity below `threshold` counts 0. The mean of this over samples is the benchmark's
    ANLS.
    """
    pred = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        gold = _anls_text(answer)
        length = max(len(gold), len(pred))
        similarity = 1.0 if length == 0 else 1.0 - levenshtein(gold, pred) / length
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(
    prediction: str, answers: Sequence[str], tolerance: float = RELAXED_TOLERANCE
) -> float:
    """ChartQA's relaxed accuracy: 1.0 if a gold answer is a non-zero number and the prediction
    is within `tolerance` of it relatively ("12%" reads as 0.12), or if the two are equal
    ignoring case; else 0.0."""
    pred = str(prediction).strip()
    pred_number = _number(pred)
    for answer in answers:
        gold = str(answer).strip()
        gold_number = _number(gold)
        if pred_number is not None and gold_number:
            if abs(pred_number - gold_number) / abs(gold_number) <= tolerance:
                return 1.0
        elif pred.lower() == gold.lower():
            return 1.0
    return 0.0


def yes_no(text: str) -> str:
    """LLaVA's POPE reading of an answer: its first sentence is "no" if it holds the word
    "no", "No" or "not", else "yes"."""
    first = str(text).split(".")[0].replace(",", "")
    words = first.split()
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def yes_no_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the yes/no reading of the prediction equals a (lower-cased) gold answer."""
    return float(yes_no(prediction) in {str(a).strip().lower() for a in answers})


_SCORERS = {
    "vqa": vqa_accuracy,
    "exact": exact_match,
    "mc": multiple_choice,
    "anls": anls,
    "relaxed": relaxed_accuracy,
    "yesno": yes_no_match,
}
METRICS: tuple[str, ...] = tuple(_SCORERS)


def score(prediction: str, answers: Sequence[str] | str, metric: str = "vqa") -> float:
    """Score in [0, 1] of a prediction against gold answers with one of `METRICS`: "vqa"
    (VQA accuracy), "exact", "mc" (option letter), "anls", "relaxed" (ChartQA), "yesno"."""
    if metric not in _SCORERS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    gold = [answers] if isinstance(answers, str) else list(answers)
    return _SCORERS[metric](prediction, gold)


def is_correct(prediction: str, answers: Sequence[str] | str, metric: str = "vqa") -> bool:
    """Whether score(...) reaches CORRECT_THRESHOLD."""
    return score(prediction, answers, metric) >= CORRECT_THRESHOLD
