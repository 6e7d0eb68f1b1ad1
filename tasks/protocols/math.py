"""Math word-problem protocols: GSM8K (numeric answers) and MATH / MATH-500 (LaTeX answers).

GSM8K (gsm8k-v1)
- Gold: the number after the last '####' of the `answer` field, commas removed
  ("#### 1,450,000" -> 1450000).
- Prediction, from a model's text, first rule that yields a number:
  1. the first number after the first '####' (the training format; a model that goes on to
     invent a new question after its answer is judged on its first answer),
  2. the first number after the first "The answer is" (case-insensitive; the chain-of-thought
     exemplar format, as in lm-evaluation-harness' strict match),
  3. the last number anywhere in the text (lm-evaluation-harness' flexible match).
  No number at all scores wrong.
- Numbers: optional sign ('-' or U+2212, directly attached, and not a binary minus after a
  number or ')': "5 - 3" and "5 -3" are 5 and 3, "= -3" is -3), optional '$', thousands
  separators ("1,234.50"), decimals (".5"), simple fractions ("3/4"); a trailing period,
  '%' and unit words are not part of the number. Values are exact fractions ("12.50" ==
  "12.5" == 25/2; nothing is rounded, so 12.5 != 12), and equality allows a relative
  tolerance of 1e-6 (exact when either side is 0).

MATH (math-v1) and MATH-500 (math500-v1)
- Prediction: `last_boxed(text)`: the contents of the last \\boxed{...} or \\fbox{...} in
  the text (whichever comes last; braces matched, so nested braces are kept whole), or for
  the brace-less form "\\boxed 5" the text after it up to '$' or the end of the line (as in
  the Minerva/lm-eval `last_boxed_only_string`), trailing period removed. No box: no answer.
- Gold: MATH (hendrycks/competition_math) has no answer column: `last_boxed(solution)`;
  MATH-500 has an `answer` column, used as is (it equals the boxed solution, tested).
- Equivalence: Hendrycks et al.'s `is_equiv` with `_strip_string`, reimplemented here with
  the same steps in the same order (github.com/hendrycks/math, modeling/math_equivalence.py,
  MIT): drop newlines, '\\!', '\\left', '\\right', '^{\\circ}'/'^\\circ', '\\$', '\\%' (a bare
  '%' stays);
  '\\\\' -> '\\'; 'tfrac'/'dfrac' -> 'frac'; a trailing unit given as '\\text{ ...}' is cut;
  ' .5' -> ' 0.5' and a leading '.' gets a '0'; a short left side of a single '=' is dropped
  ("x = 5" -> "5"); '\\sqrt3' -> '\\sqrt{3}'; all spaces removed; '\\frac12' -> '\\frac{1}{2}',
  '\\frac1b' -> '\\frac{1}{b}'; the exact string '0.5' -> '\\frac{1}{2}' (the ONLY decimal it
  converts: "0.25" vs "\\frac14" are NOT equivalent); 'a/b' with integer a, b ->
  '\\frac{a}{b}'. Then the two strings must be identical. If stripping raises (as the
  original does on e.g. two '\\text{ ' units), the raw strings are compared, as in the
  original. No symbolic algebra: "2x" vs "x*2" are not equivalent.
"""

from __future__ import annotations

import re
from fractions import Fraction

GSM8K_PROTOCOL = (
    "gsm8k-v1:gold=after-####;pred=first-num-after-####|first-num-after-'the answer is'|"
    "last-num;num=exact-fraction,rel_tol=1e-6"
)
MATH_PROTOCOL = "math-v1:pred=last-boxed;gold=last-boxed(solution);equiv=hendrycks-is_equiv"
MATH500_PROTOCOL = "math500-v1:pred=last-boxed;gold=answer;equiv=hendrycks-is_equiv"
PROTOCOL_VERSION = 1

REL_TOL = 1e-6

# ---------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(
    r"(?<![\w.])"  # a token start: not inside a word or another number
    r"(?P<sign>[-\u2212])?(?:\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+)(?![\d/]))?"
)
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def _to_fraction(match: re.Match, text: str) -> Fraction | None:
    value = Fraction(match.group("num").replace(",", ""))
    if match.group("den") is not None:
        den = int(match.group("den"))
        if den == 0:
            return None
        value /= den
    if not match.group("sign"):
        return value
    before = text[: match.start()].rstrip()
    if before and (before[-1].isdigit() or before[-1] == ")"):
        return value  # "10 - 3": a binary minus, not the sign of 3
    return -value


def _numbers(text: str) -> list[Fraction]:
    out = []
    for m in _NUMBER.finditer(text):
        v = _to_fraction(m, text)
        if v is not None:
            out.append(v)
    return out


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact fraction ("$1,234.50." -> 2469/2), or None."""
    nums = _numbers(text)
    return nums[0] if nums else None


def parse_gsm8k_gold(answer: str) -> Fraction:
    """Gold value of a GSM8K `answer` field: the number after the last '####'."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####': {answer[-80:]!r}")
    value = parse_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"no number after '####': {answer[-80:]!r}")
    return value


def extract_gsm8k_answer(text: str) -> Fraction | None:
    """The predicted value in a model's text (rules in the module docstring), or None."""
    idx = text.find("####")
    if idx >= 0:
        value = parse_number(text[idx + 4 :])
        if value is not None:
            return value
    m = _ANSWER_IS.search(text)
    if m:
        value = parse_number(text[m.end() :])
        if value is not None:
            return value
    nums = _numbers(text)
    return nums[-1] if nums else None


def numbers_equal(a: Fraction | float | int, b: Fraction | float | int) -> bool:
    """Equal within relative tolerance REL_TOL (exact fractions when given)."""
    a, b = Fraction(a), Fraction(b)
    if a == b:
        return True
    return abs(a - b) <= Fraction(REL_TOL) * max(abs(a), abs(b))


def gsm8k_is_correct(text: str, gold: str | Fraction | float | int) -> bool:
    """Score one generation against the gold: an `answer` field (with '####'), a number
    string such as str(parse_gsm8k_gold(...)) ("18", "-3", "25/2"), or a number."""
    if isinstance(gold, str):
        gold_value = parse_gsm8k_gold(gold) if "####" in gold else parse_number(gold)
        if gold_value is None:
            raise ValueError(f"gold answer has no number: {gold!r}")
    else:
        gold_value = Fraction(gold)
    pred = extract_gsm8k_answer(text)
    return pred is not None and numbers_equal(pred, gold_value)


# ----------------------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} / \\fbox{...} (nested braces kept), or None."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    start = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    j = start
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k]
        return None  # unbalanced: no answer
    if j > start:  # "\boxed 5" form
        answer = re.split(r"[$\n]", text[j:], maxsplit=1)[0].strip().rstrip(".").strip()
        return answer or None
    return None


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    for substr in substrs[1:]:
        new_str += "\\frac"
        if substr[0] == "{":  # IndexError on a trailing '\frac', as in the original
            new_str += substr
            continue
        if len(substr) < 2:
            return string
        a, b, post = substr[0], substr[1], substr[2:]
        if b != "{":
            new_str += "{" + a + "}{" + b + "}" + post
        else:
            new_str += "{" + a + "}" + b + post
    return new_str


def _fix_a_slash_b(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(string: str) -> str:
    # Hendrycks: '\text{ ' only ever occurs (in the val set) when describing units.
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        if len(splits) != 2:
            raise ValueError("more than one '\\text{ ' unit")
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":  # IndexError on a trailing '\sqrt', as in the original
            new_string += "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_string += "\\sqrt" + split
    return new_string


def _strip_string(string: str) -> str:
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac")
    string = string.replace("dfrac", "frac")
    string = string.replace("\\left", "")
    string = string.replace("\\right", "")
    string = string.replace("^{\\circ}", "")
    string = string.replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")  # (the original does this twice; a bare '%' stays)
    string = string.replace(" .", " 0.")
    string = string.replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def normalize_math_answer(answer: str) -> str:
    """Hendrycks `_strip_string`; on inputs where that raises, the answer unchanged."""
    try:
        return _strip_string(answer)
    except (IndexError, ValueError):
        return answer


def is_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks MATH `is_equiv`: identical after `_strip_string` (raw equality if it raises).

    None is "no answer": two Nones are equivalent (as in the original), one None is not.
    """
    if a is None and b is None:
        return True
    if a is None or b is None:
        return False
    try:
        return _strip_string(a) == _strip_string(b)
    except (IndexError, ValueError):
        return a == b


def math_gold_answer(row) -> str:
    """Gold answer of a MATH / MATH-500 row: its `answer`, else the solution's last box."""
    answer = row.get("answer") if hasattr(row, "get") else None
    if isinstance(answer, str) and answer.strip():
        return answer
    boxed = last_boxed(row["solution"])
    if boxed is None:
        raise ValueError("MATH solution has no \\boxed{} answer")
    return boxed


def math_is_correct(text: str, gold: str) -> bool:
    """Score one generation: its last box must be `is_equiv` to the gold answer."""
    pred = last_boxed(text)
    return pred is not None and is_equiv(pred, gold)
