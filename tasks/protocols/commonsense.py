"""LLM-Adapters commonsense-reasoning protocol (Hu et al. 2023, "LLM-Adapters").

Source: github.com/AGI-Edgerunners/LLM-Adapters, `commonsense_evaluate.py` at commit
8166572 (file last changed a0f9ba2, 2023-05-16): `generate_prompt`, `extract_answer`, the
scoring loop in `main`.

Prompt. The Alpaca-style template is reproduced character for character from that file's
`generate_prompt`, including its 16-space indentation of the section lines and the trailing
space after "request." in the no-input variant (the model sees exactly this text). The
repo's `finetune.py` formats training examples with a slightly different whitespace variant
of the same template (its blank lines carry 16 spaces, and the no-input header ends with two
spaces). This protocol uses ONE text for both: a training example is
`build_prompt(instruction, input) + output` (the trainer appends EOS, as finetune.py does),
and evaluation prompts are `build_prompt(instruction, input)`, so the evaluation prompt is
exactly the prefix the model was trained on.

Generation (official settings, for whoever wires the generator): beam search with 4 beams,
no sampling, max_new_tokens=32 (`OFFICIAL_GENERATION`); the decoded sequence includes the
prompt and the official code keeps `decoded.split("### Response:")[1].strip()`.

Extraction (`extract_answer`) follows the official code exactly: the FIRST match, in the
response text, of the dataset's alternation regex, case-sensitive and without word
boundaries (so "Answer1" does not match, and "answer12" matches "answer1"); no match gives
"" which never equals a label (scored wrong). Datasets and words:
boolq true|false; piqa solution1|solution2; social_i_qa, ARC-Challenge, ARC-Easy,
openbookqa answer1..answer5; hellaswag ending1..ending4; winogrande option1|option2.
The allowed words are searched in the response only: the prompt itself lists them
("Answer format: answer1/answer2/..."), so searching the whole decoded text would always
return the prompt's first option.

Scoring: accuracy = fraction of rows whose extracted answer equals the label string; the
suite headline is the unweighted (macro) mean of the per-set accuracies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

PROTOCOL = (
    "commonsense-llm-adapters-v1:prompt=commonsense_evaluate.generate_prompt(8166572);"
    "train=prompt+output;extract=first-regex-match-after-response;acc=exact;macro=mean(sets)"
)
PROTOCOL_VERSION = 1

RESPONSE_MARKER = "### Response:"
OFFICIAL_GENERATION = {"num_beams": 4, "do_sample": False, "max_new_tokens": 32}

_INDENT = " " * 16
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    "\n"
    f"{_INDENT}### Input:\n"
    f"{_INDENT}{{input}}\n"
    "\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    "\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)

ANSWER_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
DATASETS = tuple(ANSWER_PATTERNS)
_COMPILED = {name: re.compile(p) for name, p in ANSWER_PATTERNS.items()}


def _has_input(input: object) -> bool:
    # The official code tests `if input:`; a missing value read back from parquet/pandas
    # (None or NaN) counts as no input as well.
    if input is None or (isinstance(input, float) and math.isnan(input)):
        return False
    return bool(input)


def build_prompt(instruction: str, input: str | None = None) -> str:
    """The evaluation prompt (official `generate_prompt`); ends where the response begins."""
    if _has_input(input):
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def build_training_text(instruction: str, input: str | None, output: str) -> str:
    """A training example: exactly the evaluation prompt followed by the target output."""
    return build_prompt(instruction, input) + output


def response_text(text: str) -> str:
    """The generated part: official `text.split("### Response:")[1].strip()`.

    Text without the marker is taken to be generation only (the whole of it, stripped).
    Text after a second marker (the model starting a new example) is dropped, as officially.
    """
    parts = text.split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def extract_answer(dataset: str, text: str) -> str:
    """The predicted label for `dataset`: first allowed word in the response, or ""."""
    try:
        pattern = _COMPILED[dataset]
    except KeyError:
        raise KeyError(f"unknown commonsense dataset {dataset!r}; known: {DATASETS}") from None
    match = pattern.search(response_text(text))
    return match.group(0) if match else ""


def is_correct(dataset: str, text: str, label: str) -> bool:
    pred = extract_answer(dataset, text)
    return pred != "" and pred == str(label).strip()


def accuracy(dataset: str, texts: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Per-set score: {"accuracy", "correct", "total", "unanswered"}."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} generations for {len(labels)} labels")
    preds = [extract_answer(dataset, t) for t in texts]
    correct = sum(p != "" and p == str(y).strip() for p, y in zip(preds, labels, strict=True))
    total = len(labels)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": float(correct),
        "total": float(total),
        "unanswered": float(sum(p == "" for p in preds)),
    }


def macro_average(per_set: Mapping[str, float] | Iterable[float]) -> float:
    """Unweighted mean of per-set accuracies (the suite headline)."""
    values = list(per_set.values()) if isinstance(per_set, Mapping) else list(per_set)
    if not values:
        raise ValueError("no per-set accuracies to average")
    return sum(values) / len(values)
