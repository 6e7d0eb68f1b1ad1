"""Code generation: Code-Feedback -> HumanEval (tasks/protocols/humaneval.py, tasks/sandbox.py).

`code_feedback`: train on Code-Feedback conversations (m-a-p/Code-Feedback, `messages`),
formatted with the tokenizer's chat template; the loss is on the last assistant turn (the
earlier turns are the prompt). Evaluation: HumanEval, one greedy completion per problem,
pass@1; every completion runs with its tests in the sandbox (a separate, network-less,
resource-limited process), never in the harness process. HumanEval's prompt is sent as a
user turn asking for the completed function; `extract_completion` reads the code back.

Selection: free-form code has no answer key, so the LR is chosen by the teacher-forced loss
on held-out training conversations (`neg_loss`, higher is better); HumanEval is test only.

`codealpaca_offline` is a STAND-IN (labelled in every row): CodeAlpaca-20k instructions
(sahil2801/CodeAlpaca, CC BY-NC 4.0: non-commercial) instead of Code-Feedback.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks import sandbox
from tasks.base import DataSplits
from tasks.data import load_split, roles_provenance, split_roles, subsample
from tasks.generative import GenerativeTask
from tasks.protocols import humaneval as protocol
from tasks.registry import register_task

PROTOCOL_SEED = 0
DECODING = "greedy,max_new_tokens=512,n=1"
USER_PROMPT = (
    "Complete the following Python function. Reply with the whole function in one "
    "```python code block.\n\n```python\n{prompt}```"
)
# A plain template for tokenizers without a chat template (base models).
PLAIN = "### Instruction:\n{user}\n\n### Response:\n"


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(PLAIN.format(user=m["content"]) for m in messages if m["role"] == "user")


class CodeTask(GenerativeTask):
    max_new_tokens = 512
    selection_by_loss = True
    selection_metric = "neg_loss"
    headline_metric = "pass@1"

    def add_special_tokens(self, tokenizer: Any) -> bool:
        # A chat-formatted prompt already carries the template's special tokens.
        return not getattr(tokenizer, "chat_template", None)

    def prompt(self, row, tokenizer) -> str:
        return _chat_prompt(tokenizer, list(row["prompt_messages"]))

    def target(self, row) -> str:
        return row["response"]

    def is_correct(self, generation: str, row) -> bool:
        return self.score([generation], pd.DataFrame([row]))[1][0]

    def score(self, generations: list[str], rows: pd.DataFrame) -> tuple[dict[str, float], list]:
        """pass@1 over problems; completions run in parallel in the sandbox."""
        if len(generations) != len(rows):
            raise ValueError(f"{len(generations)} generations for {len(rows)} rows")
        problems = {r["task_id"]: r for _, r in rows.iterrows()}
        samples = [
            (r["task_id"], protocol.extract_completion(g, r))
            for g, (_, r) in zip(generations, rows.iterrows(), strict=True)
        ]
        result = protocol.evaluate(problems, samples, ks=(1,))
        passed = [s.passed for s in result["samples"]]
        return {"pass@1": float(np.mean(passed)) if passed else 0.0}, passed

    def _train(self, data_dir) -> tuple[pd.DataFrame, dict]:
        raise NotImplementedError

    def splits(self, data_dir, *, train_rows=None, selection_rows=None, test_rows=None):
        train_full, train_prov = self._train(data_dir)
        pool, selection, train = split_roles(
            train_full, train_rows=train_rows, selection_rows=selection_rows,
            selection_cap=200, seed=PROTOCOL_SEED,
        )  # fmt: skip
        df, test_prov = load_split("openai/openai_humaneval", "openai_humaneval", "test", data_dir)
        test = df[["task_id", "prompt", "test", "entry_point"]].copy()
        test["prompt_messages"] = [
            [{"role": "user", "content": USER_PROMPT.format(prompt=p)}] for p in test["prompt"]
        ]
        test = subsample(test, test_rows, seed=PROTOCOL_SEED)
        provenance = roles_provenance(
            train_prov,
            {"humaneval": test_prov},
            pool,
            train,
            selection,
            {"humaneval": test},
            decoding=DECODING,
            # how this machine enforces the protocol's sandbox limits (varies by host)
            sandbox={
                "isolation": sandbox.ISOLATION_DESCRIPTION,
                "memory_limit": sandbox.describe_memory_limit(
                    protocol.MEMORY_MB, protocol.MAX_PROCS
                ),
            },
        )
        return DataSplits(train, selection, {"humaneval": test}, provenance)


@register_task("code_feedback")
class CodeFeedback(CodeTask):
    description = "Code-Feedback (chat) -> HumanEval pass@1, sandboxed execution"
    protocol = f"{protocol.PROTOCOL};decoding={DECODING};select=neg_loss"

    def _train(self, data_dir):
        df, prov = load_split("m-a-p/Code-Feedback", None, "train", data_dir)
        prompts, responses = [], []
        for messages in df["messages"]:
            messages = [dict(m) for m in messages]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(messages[:last])
            responses.append(messages[last]["content"])
        return pd.DataFrame({"prompt_messages": prompts, "response": responses}), prov


@register_task("codealpaca_offline")
class CodeAlpacaOffline(CodeTask):
    description = "STAND-IN: CodeAlpaca (CC BY-NC) instead of Code-Feedback -> HumanEval pass@1"
    protocol = f"{protocol.PROTOCOL};decoding={DECODING};select=neg_loss;stand-in=codealpaca"

    def _train(self, data_dir):
        df, prov = load_split("sahil2801/CodeAlpaca", "new_codealpaca", "train", data_dir)
        users = [
            f"{i}\n\n{x}" if isinstance(x, str) and x.strip() else i
            for i, x in zip(df["instruction"], df["input"], strict=True)
        ]
        rows = pd.DataFrame(
            {
                "prompt_messages": [[{"role": "user", "content": u}] for u in users],
                "response": df["output"],
            }
        )
        prov = {
            **prov,
            "stand_in": "not Code-Feedback: CodeAlpaca instructions",
            "license": "CC BY-NC 4.0 (non-commercial)",
        }
        return rows, prov
