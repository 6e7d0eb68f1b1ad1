"""Generative-task protocols: commonsense prompts/extraction, GSM8K and MATH scoring, pass@k.

Hand-written model outputs, including the awkward ones; the real mirror checks that every
gold answer is reachable by the extractor (skipped when the mirror is absent).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest

from tasks.protocols import commonsense as cs
from tasks.protocols import humaneval as he
from tasks.protocols import math as pm

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMONSENSE = MIRROR / "llm-adapters" / "commonsense"


def _mirror_file(*parts: str) -> Path:
    path = MIRROR.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"data mirror file not found: {path}")
    return path


# ------------------------------------------------------------------------- commonsense

INSTRUCTION = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: "
    "Sarah was a much better surgeon than Maria so _ always got the easier cases.\n\n"
    "Option1: Sarah Option2: Maria Answer format: option1/option2"
)
PAD = " " * 16


def test_prompt_is_llm_adapters_generate_prompt_verbatim():
    # commonsense_evaluate.py's generate_prompt, written out by hand: 16-space indented
    # section lines, empty blank lines, one trailing space after "request." without input.
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. \n\n"
        f"{PAD}### Instruction:\n{PAD}Do X.\n\n{PAD}### Response:\n{PAD}"
    )
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        f"{PAD}### Instruction:\n{PAD}Do X.\n\n{PAD}### Input:\n{PAD}an input\n\n"
        f"{PAD}### Response:\n{PAD}"
    )
    assert cs.build_prompt("Do X.") == no_input
    assert cs.build_prompt("Do X.", "") == no_input
    assert cs.build_prompt("Do X.", None) == no_input
    assert cs.build_prompt("Do X.", float("nan")) == no_input  # a missing parquet value
    assert cs.build_prompt("Do X.", "an input") == with_input


@pytest.mark.parametrize("input_", ["", "some context"])
def test_training_text_is_exactly_eval_prompt_plus_output(input_):
    output = "the correct answer is option2"
    train = cs.build_training_text(INSTRUCTION, input_, output)
    prompt = cs.build_prompt(INSTRUCTION, input_)
    assert train.startswith(prompt)
    assert train[len(prompt) :] == output
    # and the response the evaluator extracts from it is the output itself
    assert cs.response_text(train) == output
    assert cs.extract_answer("winogrande", train) == "option2"


@pytest.mark.parametrize(
    "dataset, text, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "True", ""),  # case-sensitive, as officially
        ("boolq", "it is not untrue", "true"),  # no word boundaries, as officially
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "Solution1 looks right", ""),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer3.", "answer3"),
        ("ARC-Challenge", "the correct answer is answer4", "answer4"),
        ("ARC-Easy", "the correct answer is answer1\n\n### Instruction:", "answer1"),
        ("openbookqa", "the correct answer is answer5", "answer5"),
        ("openbookqa", "the correct answer is answer12", "answer1"),  # no boundaries
        ("winogrande", "the correct answer is option2", "option2"),
        ("winogrande", "Option2", ""),
        ("hellaswag", "the correct answer is ending3", "ending3"),
    ],
)
def test_extract_answer_per_dataset(dataset, text, expected):
    assert cs.extract_answer(dataset, text) == expected


@pytest.mark.parametrize(
    "dataset, text, expected",
    [
        # several candidate words: the FIRST match wins, even when the model then corrects
        # itself (the official rule)
        ("winogrande", "option1 is tempting but the correct answer is option2", "option1"),
        ("winogrande", "the correct answer is option2, not option1", "option2"),
        ("ARC-Challenge", "answer2 or answer3? the correct answer is answer3", "answer2"),
        ("boolq", "false. Wait, true", "false"),
        ("piqa", "solution2 beats solution1", "solution2"),
    ],
)
def test_first_match_rule(dataset, text, expected):
    assert cs.extract_answer(dataset, text) == expected


def test_extraction_reads_only_the_response_after_the_marker():
    # The prompt itself lists every allowed word ("Answer format: option1/option2"): a
    # decoded sequence that includes the prompt must be judged on its response only.
    prompt = cs.build_prompt(INSTRUCTION)
    assert "option1" in prompt
    decoded = prompt + "the correct answer is option2"
    assert cs.extract_answer("winogrande", decoded) == "option2"
    # a second example invented after the answer is dropped (official split(...)[1])
    runaway = decoded + "\n\n### Instruction:\nmore\n\n### Response:\noption1"
    assert cs.extract_answer("winogrande", runaway) == "option2"
    # a response with no allowed word is unanswered even though the prompt has them
    assert cs.extract_answer("winogrande", prompt + "I am not sure.") == ""


def test_no_answer_scores_wrong_and_accuracy_macro():
    texts = [
        "the correct answer is option2",  # right
        "the correct answer is option1",  # wrong
        "I cannot decide",  # unanswered -> wrong
        "",  # empty -> wrong
    ]
    labels = ["option2", "option2", "option1", "option1"]
    assert not cs.is_correct("winogrande", "I cannot decide", "option1")
    assert not cs.is_correct("winogrande", "", "")  # an empty label never matches
    res = cs.accuracy("winogrande", texts, labels)
    assert res == {"accuracy": 0.25, "correct": 1.0, "total": 4.0, "unanswered": 2.0}
    boolq = cs.accuracy("boolq", ["true", "false"], ["true", "true"])
    assert boolq["accuracy"] == 0.5
    assert cs.macro_average({"winogrande": 0.25, "boolq": 0.5, "piqa": 0.9}) == pytest.approx(
        (0.25 + 0.5 + 0.9) / 3
    )
    with pytest.raises(ValueError):
        cs.accuracy("boolq", ["true"], ["true", "false"])
    with pytest.raises(KeyError, match="unknown commonsense dataset"):
        cs.extract_answer("hellaswag2", "ending1")


def test_mirror_gold_outputs_extract_to_their_labels():
    if not COMMONSENSE.is_dir():
        pytest.skip(f"data mirror not found at {COMMONSENSE}")
    sets = sorted(p.name for p in COMMONSENSE.iterdir() if p.is_dir())
    assert set(sets) <= set(cs.DATASETS) and len(sets) == 7
    for name in sets:
        for split in ("train", "test"):
            path = COMMONSENSE / name / f"{split}.parquet"
            if not path.is_file():
                continue
            df = pd.read_parquet(path)
            texts = [
                cs.build_training_text(i, x, o)
                for i, x, o in zip(df.instruction, df.input, df.output, strict=True)
            ]
            res = cs.accuracy(name, texts, list(df.answer))
            assert res["accuracy"] == 1.0, (name, split, res)


# ------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "field, value",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", 18),
        ("... so 1,450,000 in all.\n#### 1,450,000", 1450000),
        ("The change is -3.\n#### -3", -3),
        ("#### 2,125", 2125),
    ],
)
def test_gsm8k_gold_parsing(field, value):
    assert pm.parse_gsm8k_gold(field) == value


def test_gsm8k_gold_without_marker_is_an_error():
    with pytest.raises(ValueError, match="####"):
        pm.parse_gsm8k_gold("18")


@pytest.mark.parametrize(
    "text, value",
    [
        # marker preference: '####' first, then "The answer is", then the last number
        ("She has 3 apples and 4 pears.\n#### 7\nQuestion: Tom has 12 cars", 7),
        ("So 5 + 6 = 11. The answer is 11.\n#### 12", 12),
        ("5 + 6 = 11 and 2 more. The answer is 13. Check: 13 - 2 = 11.", 13),
        ("the answer is: $18.00.", 18),
        ("First 3 + 4 = 7, then 7 * 2 = 14", 14),
        ("#### \nThe answer is 9", 9),  # an empty '####' falls through
        # numbers
        ("The answer is -7 degrees", -7),
        ("The temperature fell to \u22127", -7),  # unicode minus
        ("x = -3", -3),
        ("10 - 3", 3),  # a binary minus is not a sign
        ("The answer is 1,234.50", Fraction("1234.5")),
        ("The answer is 12.50 dollars", Fraction(25, 2)),
        ("The answer is .5", Fraction(1, 2)),
        ("She ate 3/4 of the pie", Fraction(3, 4)),
        ("The answer is -3/4", Fraction(-3, 4)),
        ("He drove 60 km/h", 60),
        ("a 25% discount", 25),
        ("The total is $1,000.", 1000),
        ("I paid $ 18", 18),
        ("1, 2, 3", 3),  # a list is not a thousands group
    ],
)
def test_gsm8k_extraction_and_normalisation(text, value):
    assert pm.extract_gsm8k_answer(text) == value


def test_gsm8k_scoring():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert pm.gsm8k_is_correct("48 + 24 = 72. The answer is 72.", gold)
    assert pm.gsm8k_is_correct("The answer is 72.00", gold)
    assert not pm.gsm8k_is_correct("The answer is 7.2", gold)
    assert not pm.gsm8k_is_correct("I don't know", gold)  # no number: wrong
    # never rounding: 12.5 is not 12
    assert not pm.gsm8k_is_correct("The answer is 12.5", 12)
    assert pm.gsm8k_is_correct("The answer is 12.5", "#### 12.50")
    assert pm.gsm8k_is_correct("The answer is 3/4", 0.75)
    assert pm.gsm8k_is_correct("#### 1,234", "#### 1234")
    assert pm.gsm8k_is_correct("The answer is $18.00.", "#### 18")
    assert not pm.gsm8k_is_correct("The answer is -18", "#### 18")
    # a gold given as a plain number string, e.g. str(parse_gsm8k_gold(...))
    assert pm.gsm8k_is_correct("The answer is 72.", str(pm.parse_gsm8k_gold(gold)))
    assert pm.gsm8k_is_correct("#### -3", "-3")
    assert pm.gsm8k_is_correct("The answer is 12.5", str(Fraction(25, 2)))  # "25/2"
    with pytest.raises(ValueError):
        pm.gsm8k_is_correct("The answer is 3", "no number")


def test_numbers_equal_tolerance():
    assert pm.numbers_equal(Fraction("12.50"), 12.5)
    assert pm.numbers_equal(1_000_000, 1_000_000.5)  # relative 5e-7
    assert not pm.numbers_equal(1_000, 1_000.5)  # relative 5e-4
    assert not pm.numbers_equal(12.5, 12)
    assert not pm.numbers_equal(0, 1e-9)  # exact at zero
    assert pm.numbers_equal(0, 0.0)
    assert pm.parse_number("no digits here") is None


def test_gsm8k_mirror_gold_parses_and_scores_itself():
    for split in ("train", "test"):
        df = pd.read_parquet(_mirror_file("openai", "gsm8k", "main", f"{split}.parquet"))
        golds = [pm.parse_gsm8k_gold(a) for a in df.answer]
        assert all(g.denominator == 1 for g in golds)  # GSM8K golds are integers
        # the reference solution itself, read as a model output, is correct
        assert all(pm.gsm8k_is_correct(a, g) for a, g in zip(df.answer, golds, strict=True))


# -------------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{1}, then \\boxed{2} and finally \\boxed{3}", "3"),
        ("we guess \\boxed{7} but the answer is \\boxed{2}.", "2"),
        ("\\fbox{4}", "4"),
        ("\\boxed{1} and later \\fbox{5}", "5"),  # whichever comes last
        ("The answer is $\\boxed 5$.", "5"),
        ("The answer is \\boxed 5.", "5"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\text{(A)}}", "\\text{(A)}"),
        ("\\boxed {12}", "12"),
        ("no box at all: 5", None),
        ("unbalanced \\boxed{\\frac{1}{2}", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert pm.last_boxed(text) == expected


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("\\tfrac{1}{2}", "\\frac{1}{2}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("10\\text{ units}", "10", True),
        ("x = 5", "5", True),
        ("\\sqrt3", "\\sqrt{3}", True),
        ("3/4", "\\frac{3}{4}", True),
        ("90^\\circ", "90", True),
        ("50\\%", "50", True),
        ("\\$5", "5", True),
        (".5", "0.5", True),
        ("1\\!000", "1000", True),
        # the one decimal the Hendrycks normaliser converts ...
        ("0.5", "\\frac{1}{2}", True),
        # ... and the ones it does not: no numeric evaluation
        ("0.25", "\\frac14", False),
        ("1/2", "0.50", False),
        ("2x", "x2", False),
        ("10, 4, -2", "4, 10, -2", False),
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", False),
        ("5", "6", False),
    ],
)
def test_is_equiv(a, b, equal):
    assert pm.is_equiv(a, b) is equal
    assert pm.is_equiv(b, a) is equal


def test_is_equiv_edge_cases():
    assert pm.is_equiv(None, None)
    assert not pm.is_equiv(None, "5")
    # stripping raises on a trailing \sqrt: raw comparison, as in the original
    assert pm.is_equiv("\\sqrt", "\\sqrt")
    assert not pm.is_equiv("\\sqrt", "\\sqrt{}")
    assert pm.normalize_math_answer("\\left( 3, \\frac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert pm.normalize_math_answer("\\dfrac12") == "\\frac{1}{2}"


def test_math_scoring_and_gold():
    gold = pm.math_gold_answer({"solution": "... thus $\\boxed{\\dfrac{1}{2}}$."})
    assert gold == "\\dfrac{1}{2}"
    assert pm.math_is_correct("The answer is $\\boxed{\\frac12}$.", gold)
    assert not pm.math_is_correct("The answer is 1/2.", gold)  # not boxed: no answer
    assert pm.math_gold_answer({"answer": "42", "solution": "\\boxed{41}"}) == "42"
    with pytest.raises(ValueError):
        pm.math_gold_answer({"solution": "no box"})


def test_math_mirror_gold_answers():
    m500 = pd.read_parquet(_mirror_file("HuggingFaceH4", "MATH-500", "default", "test.parquet"))
    # MATH-500's answer column is the boxed answer of its solution
    assert all(
        pm.is_equiv(pm.last_boxed(s), a) for s, a in zip(m500.solution, m500.answer, strict=True)
    )
    full = pd.read_parquet(_mirror_file("hendrycks", "competition_math", "default", "test.parquet"))
    golds = [pm.math_gold_answer(row) for row in full.to_dict("records")]
    assert len(golds) == 5000 and all(isinstance(g, str) for g in golds)


# ---------------------------------------------------------------------------- HumanEval


def _comb_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_by_hand():
    assert he.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert he.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert he.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert he.pass_at_k(10, 0, 5) == 0.0
    assert he.pass_at_k(10, 8, 5) == 1.0  # n - c < k
    assert he.pass_at_k(200, 1, 100) == pytest.approx(0.5)
    for n in (1, 2, 7, 20, 50):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = float(_comb_pass_at_k(n, c, k))
                assert he.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    # large n: the product form stays finite where comb() ratios in floats would overflow
    assert he.pass_at_k(2000, 5, 100) == pytest.approx(
        float(_comb_pass_at_k(2000, 5, 100)), rel=1e-9
    )
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            he.pass_at_k(*bad)


def test_mean_pass_at_k_only_reports_reachable_k():
    outcomes = {"a": [True, False, False, False], "b": [False, False, False, False]}
    res = he.mean_pass_at_k(outcomes, ks=(1, 2, 10))
    assert set(res) == {"pass@1", "pass@2"}
    assert res["pass@1"] == pytest.approx((0.25 + 0.0) / 2)
    assert res["pass@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert he.mean_pass_at_k({}) == {}


PROBLEM = {
    "task_id": "Toy/0",
    "prompt": (
        "from typing import List\n\n\ndef helper(x: int) -> int:\n    return x * 2\n\n\n"
        'def double_all(xs: List[int]) -> List[int]:\n    """Double every element.\n'
        '    >>> double_all([1, 2])\n    [2, 4]\n    """\n'
    ),
    "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
    "entry_point": "double_all",
}


def test_humaneval_program_is_official_format():
    program = he.humaneval_program(PROBLEM, "    return [helper(x) for x in xs]\n")
    assert program == (
        PROBLEM["prompt"]
        + "    return [helper(x) for x in xs]\n"
        + "\n"
        + PROBLEM["test"]
        + "\n"
        + "check(double_all)"
    )


def _compiles(completion: str) -> None:
    compile(he.humaneval_program(PROBLEM, completion), "<program>", "exec")


def test_extract_completion_chat_fenced_with_repeated_signature():
    text = (
        "Sure! Here is the implementation:\n\n```python\nfrom typing import List\n\n"
        "def double_all(xs: List[int]) -> List[int]:\n    return [helper(x) for x in xs]\n\n"
        'if __name__ == "__main__":\n    print(double_all([int(input())]))\n```\n'
        "This doubles each element.\n```python\nprint('example')\n```"
    )
    completion = he.extract_completion(text, PROBLEM)
    assert completion.startswith("\n")  # the full definition goes after the prompt's stub
    assert "def double_all(xs: List[int])" in completion
    assert "__main__" not in completion and "input()" not in completion
    assert "Sure!" not in completion and "example" not in completion
    _compiles(completion)


def test_extract_completion_prefers_the_block_defining_the_entry_point():
    text = (
        "```\n>>> double_all([1])\n[2]\n```\n"
        "```py\n    def double_all(xs):\n        return [2 * x for x in xs]\n```"
    )
    completion = he.extract_completion(text, PROBLEM)
    assert completion.strip().startswith("def double_all(xs):")  # dedented
    _compiles(completion)


def test_extract_completion_body_only():
    # a base-model continuation: cut at the Codex stop sequences
    raw = "    return [helper(x) for x in xs]\n\n\ndef unrelated():\n    pass\nprint(1)"
    assert he.extract_completion(raw, PROBLEM) == "    return [helper(x) for x in xs]\n\n"
    raw = "    out = []\n    for x in xs:\n        out.append(2 * x)\n    return out\n# done"
    assert he.extract_completion(raw, PROBLEM).endswith("    return out")  # "\n#" cut
    # a fenced body written without the function's indentation lands inside the function
    fenced = "```python\nreturn [helper(x) for x in xs]\n```"
    completion = he.extract_completion(fenced, PROBLEM)
    assert completion == "    return [helper(x) for x in xs]\n"
    _compiles(completion)
    # an unclosed fence runs to the end of the text
    assert he.extract_completion("```python\n    return xs", PROBLEM) == "    return xs"


def test_extract_completion_echoed_prompt():
    text = PROBLEM["prompt"] + "    return [helper(x) for x in xs]\n"
    completion = he.extract_completion(text, PROBLEM)
    _compiles(completion)
    assert completion.count("def double_all") == 1
