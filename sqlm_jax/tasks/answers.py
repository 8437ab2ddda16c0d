"""Answer extraction and normalisation for the math tasks (arithmetic, algebra).

Pure functions, no state. Two modes:

* Reference (default): the content of the last ``<answer>…</answer>`` on one line, stripped, kept
  only if Python's ``int()`` accepts it. The *string* is returned and voted on, so "05" and "5"
  are different votes (a Known trap of the reference, reproduced on purpose).
* Normalised (``normalize=True``, an improvement behind a flag): the last tag may span lines and
  may hold an integer, a decimal, a fraction ("3/4", "\\frac{3}{4}"), "x = 5", "1,234" or a
  ``\\boxed{}``/``$…$`` wrapper; the result is the canonical string of the exact rational
  (``str(Fraction)``: "3/4", "5", "-2"), so equal values vote together.
"""

from __future__ import annotations

import re
from fractions import Fraction

# The reference uses re.finditer without DOTALL: a tag whose content spans a newline never matches.
_OPEN, _CLOSE = "<answer>", "</answer>"
_HASH = re.compile(r"#### (\-?[0-9\.\,]+)")

_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_LATEX_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*\s*=\s*(.+)")
_BOXED = re.compile(r"\\boxed\{(.*)\}")
_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def last_answer_tag(text: str, *, multiline: bool = False) -> str | None:
    """Stripped content of the last ``<answer>…</answer>`` in ``text``, or None if there is none.

    The matches are those of ``re.findall(r"<answer>(.*?)</answer>", text)`` (with ``re.DOTALL`` when
    ``multiline``), the reference's rule, found in one pass: the regex retries from every unclosed
    tag, which is quadratic on a long response full of them.
    """
    last, start, close, newline = None, text.find(_OPEN), -1, -1
    while start != -1:
        body = start + len(_OPEN)
        if close < body:  # the first closing tag after `body`, reused while it stays ahead
            close = text.find(_CLOSE, body)
            if close == -1:
                break
        if not multiline and newline < body:
            newline = text.find("\n", body) % (len(text) + 1)  # none: len(text), never searched again
        if multiline or newline > close:
            last = text[body:close]
            start = text.find(_OPEN, close + len(_CLOSE))
        else:  # a line break before the close: no match from here
            start = text.find(_OPEN, start + 1)
    return None if last is None else last.strip()


def reference_answer(text: str) -> str | None:
    """The reference extractor: last one-line tag, kept as a string iff ``int()`` parses it."""
    content = last_answer_tag(text)
    if content is None:
        return None
    try:
        int(content)
    except ValueError:
        return None
    return content


def _unwrap(s: str) -> str:
    """Peel ``$…$``, ``\\(…\\)``, ``\\[…\\]``, ``\\boxed{…}`` and a trailing full stop, repeatedly."""
    while True:
        before = s
        s = s.strip().rstrip(".").strip()
        for left, right in _WRAPPERS:
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):-len(right)]
        boxed = _BOXED.fullmatch(s)
        if boxed:
            s = boxed.group(1)
        if s == before:
            return s


def _plain_number(s: str) -> Fraction | None:
    s = s.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _DECIMAL.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except ValueError:  # over Python's 4300-digit limit of int(str): a number no test could check
        return None


def to_fraction(s: str) -> Fraction | None:
    """Exact value of a written number, or None if ``s`` is not one of the accepted forms.

    Accepted: "42", "-2", "+3", "05", "5.0", ".5", "1,234", "3/4", "-3/4", "1.5/2", "\\frac{3}{4}",
    "-\\dfrac{3}{4}", "x = 5", "$5$", "\\boxed{5}", "5." (the sentence's full stop). An equation
    whose left side is not a bare variable ("2x = 10") is rejected: its right side is not the answer.
    """
    s = _unwrap(s.replace("\u2212", "-"))  # models often write the Unicode minus sign
    assignment = _ASSIGNMENT.fullmatch(s)
    if assignment:
        s = _unwrap(assignment.group(1))
    if "=" in s:
        return None
    frac = _LATEX_FRAC.fullmatch(s)
    if frac:
        sign, num, den = frac.groups()
        s = f"{sign}{num}/{den}"
    if s.count("/") == 1:
        num, den = (_plain_number(part) for part in s.split("/"))
        if num is None or den is None or den == 0:
            return None
        return num / den
    return _plain_number(s)


def normalized_answer(text: str) -> str | None:
    """Canonical exact-rational string of the last ``<answer>`` tag (may span lines), or None."""
    return parse_math_answer(text, normalize=True)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (braces balanced), or None; as verl's
    ``reward_score/math.py`` ``last_boxed_only_string`` + ``remove_boxed``, which the reference's
    majority manager uses for MATH-style data. An unclosed last box is None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, body = 0, start + len("\\boxed{")
    for i in range(body, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[body:i]
    return None


def hash_answer(text: str) -> str | None:
    """GSM8K's final answer: the number after the first ``#### `` in the last 300 characters, commas
    and dollar signs removed, or None; as verl's ``reward_score/gsm8k.py`` ``extract_solution``
    (strict), which the reference's majority manager uses for GSM8K data."""
    match = _HASH.search(text[-300:])
    return None if match is None else match.group(1).replace(",", "").replace("$", "")


# Where a response's answer is read; the tag may span lines once answers are normalised.
ANSWER_FORMATS = {"tag": lambda text: last_answer_tag(text, multiline=True), "boxed": last_boxed,
                  "hash": hash_answer}


def parse_math_answer(text: str, *, normalize: bool = False, answer_format: str = "tag") -> str | None:
    """The string a math solver response votes with: reference rules, or normalised if asked.

    ``"tag"`` keeps the reference's integer check (``reference_answer``); ``"boxed"`` and ``"hash"``
    keep the extracted string as the reference does. ``normalize`` votes on exact values instead."""
    if answer_format == "tag" and not normalize:
        return reference_answer(text)
    extracted = ANSWER_FORMATS[answer_format](text)
    if extracted is None or not normalize:
        return extracted
    value = to_fraction(extracted)
    return None if value is None else str(value)


def same_value(answer: str | None, truth: object) -> bool:
    """Evaluation match: the parsed answer and the ground truth denote the same exact number.

    Compares values, not strings (the reference's evaluation does ``int(answer) == int(truth)``),
    so "05" is correct for 5. A truth that is not a number in an accepted form matches nothing.
    """
    if answer is None:
        return False
    value, expected = to_fraction(answer), to_fraction(str(truth))
    return value is not None and value == expected
