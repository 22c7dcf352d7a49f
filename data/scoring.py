"""VQA answer scoring: the official VQA accuracy with its answer normalisation, exact match,
and multiple-choice letter extraction.

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
# 2 score 0.6); with a single gold answer the VQA score is 0 or 1, so it means a match.
CORRECT_THRESHOLD = 0.5

METRICS: tuple[str, ...] = ("vqa", "exact", "mc")

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


def score(prediction: str, answers: Sequence[str] | str, metric: str = "vqa") -> float:
    """Score in [0, 1] of a prediction against gold answers with metric "vqa", "exact" or "mc"."""
    gold = [answers] if isinstance(answers, str) else list(answers)
    if metric == "vqa":
        return vqa_accuracy(prediction, gold)
    if metric == "exact":
        return exact_match(prediction, gold)
    if metric == "mc":
        return multiple_choice(prediction, gold)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def is_correct(prediction: str, answers: Sequence[str] | str, metric: str = "vqa") -> bool:
    """Whether score(...) reaches CORRECT_THRESHOLD."""
    return score(prediction, answers, metric) >= CORRECT_THRESHOLD
