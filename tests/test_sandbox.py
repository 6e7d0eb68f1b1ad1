"""The untrusted-code sandbox: hostile programs fail safely; HumanEval canonical solutions pass.

These tests need the namespaced sandbox (root / CAP_SYS_ADMIN, as on CI); they fail, not
skip, when it is unavailable, since then the HumanEval protocol cannot run. Only the
HumanEval-on-the-mirror test skips, when the mirror is absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from tasks import sandbox
from tasks.protocols import humaneval as he
from tasks.sandbox import IsolationStatus, SandboxUnavailableError, run_untrusted

REPO = Path(__file__).resolve().parents[1]
HUMANEVAL = (
    REPO.parent / "shared" / "data" / "openai" / "openai_humaneval" / "openai_humaneval"
) / "test.parquet"
SLACK_S = 4.0  # start-up and teardown allowance on a loaded 2-core machine
# The caller kills the process group at the timeout; the launcher's own alarm (timeout + 2 s)
# is only a backstop, so a kill later than this means the caller's kill did not work.
KILL_SLACK_S = 1.5


def _run(program: str, **kw) -> sandbox.SandboxResult:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("memory_mb", 512)
    return run_untrusted(program, **kw)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                continue
    return pids


def _assert_no_processes_left(uid: int) -> None:
    deadline = time.monotonic() + 2.0
    while _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_of(uid) == []


def _fresh_uid() -> int:
    return 1_500_000_000 + int.from_bytes(os.urandom(3), "little")


def test_isolation_is_available_here():
    status = sandbox.isolation_status()
    assert status.available, status.reason


def test_a_correct_program_passes_in_a_clean_unprivileged_environment(monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_SECRET", "do-not-leak")
    program = (
        "import os, sys\n"
        "assert os.getuid() != 0 and os.getgid() != 0, 'still root'\n"
        "assert os.getgroups() == [], os.getgroups()\n"
        "assert set(os.environ) <= {'PATH', 'LANG'}, sorted(os.environ)\n"
        "assert sys.stdin is None, 'stdin is open'\n"
        "assert sys.flags.isolated == 1\n"
        "open('scratch.txt', 'w').write('ok')\n"  # the working directory is writable
        "assert open('scratch.txt').read() == 'ok'\n"
        "print(os.getcwd())\n"
    )
    res = _run(program)
    assert res.status == "passed", res.stderr_tail
    assert res.passed and res.returncode == 0
    assert res.network_isolated and res.isolation == sandbox.ISOLATION_DESCRIPTION
    workdir = res.stdout_tail.strip()
    assert workdir.startswith("/") and not Path(workdir).exists()  # deleted afterwards


def test_failures_are_failed_not_passed():
    res = _run("assert 1 + 1 == 3, 'wrong answer'")
    assert res.status == "failed" and not res.passed
    assert "wrong answer" in res.stderr_tail
    assert _run("raise SystemExit(3)").status == "failed"
    assert _run("import sys; sys.stdout.write('x'); input()").status == "failed"  # stdin closed


def test_infinite_loop_times_out_and_is_killed():
    uid = _fresh_uid()
    start = time.monotonic()
    res = _run("while True:\n    pass\n", timeout_s=1.0, uid=uid)
    elapsed = time.monotonic() - start
    assert res.status == "timeout" and not res.passed
    assert 1.0 <= elapsed < 1.0 + KILL_SLACK_S
    _assert_no_processes_left(uid)


def test_sleeping_forever_times_out_on_the_wall_clock():
    # no CPU used, so RLIMIT_CPU never fires: the wall-clock kill must
    start = time.monotonic()
    res = _run("import time\ntime.sleep(1000)\n", timeout_s=1.0)
    assert res.status == "timeout"
    assert time.monotonic() - start < 1.0 + KILL_SLACK_S


def test_background_process_that_escapes_the_session_is_killed():
    uid = _fresh_uid()
    program = (
        "import subprocess\n"
        "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "print('spawned')\n"
    )
    res = _run(program, uid=uid)
    assert res.status == "passed", res.stderr_tail
    assert "spawned" in res.stdout_tail
    _assert_no_processes_left(uid)


@pytest.mark.parametrize(
    "program",
    [
        "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n",
        "x = bytearray(8 * 1024 ** 3)\n",
        "x = ' ' * (2 ** 40)\n",
    ],
    ids=["unbounded-growth", "one-huge-allocation", "huge-string"],
)
def test_unbounded_memory_fails_safely(program):
    start = time.monotonic()
    res = _run(program, memory_mb=256, timeout_s=10.0)
    assert res.status == "failed" and not res.passed
    assert "MemoryError" in res.stderr_tail
    assert time.monotonic() - start < 10.0


def test_no_network_even_to_the_hosts_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "print('connected')\n"
        )
        res = _run(program)
        assert res.status == "failed" and "connected" not in res.stdout_tail
        assert "Network is unreachable" in res.stderr_tail, res.stderr_tail
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever reached the host's listener


def test_no_name_resolution():
    start = time.monotonic()
    res = _run("import socket\nprint(socket.getaddrinfo('pypi.org', 443))\n")
    assert res.status == "failed"
    assert "gaierror" in res.stderr_tail
    assert time.monotonic() - start < 5.0 + SLACK_S


def test_only_a_down_loopback_interface_is_visible():
    program = (
        "import socket\n"
        "names = [n for _, n in socket.if_nameindex()]\n"
        "assert names in ([], ['lo']), names\n"
    )
    assert _run(program).status == "passed"


def test_writes_outside_the_working_directory_fail():
    tag = uuid.uuid4().hex
    targets = [
        Path("/tmp") / f"{tag}_escape",
        REPO / f"{tag}_escape",
        Path("/dev/shm") / f"{tag}_escape",
        Path("/var/tmp") / f"{tag}_escape",
    ]
    try:
        for target in targets:
            program = f"open({str(target)!r}, 'w').write('escaped')\n"
            res = _run(program)
            assert res.status == "failed", (target, res.stdout_tail)
            assert not target.exists(), target
        # nor can it delete or modify existing files
        victim = REPO / "pyproject.toml"
        before = victim.read_bytes()
        res = _run(f"import os\nos.remove({str(victim)!r})\n")
        assert res.status == "failed" and victim.read_bytes() == before
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_secrets_outside_world_readable_files_stay_hidden():
    # /root is 0700 on these machines; the program may see only the interpreter under it
    program = (
        "import os\n"
        "for path in ('/root/.ssh', '/root/.cache', '/root/.bash_history'):\n"
        "    assert not os.path.exists(path), path\n"
        "assert not os.access('/proc/1/environ', os.R_OK)\n"
        # its own PID namespace: pid 1 is the sandbox's init, no host process is visible
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "assert pids == [1, os.getpid()], pids\n"
    )
    res = _run(program)
    assert res.status == "passed", res.stderr_tail


def test_fork_bomb_is_contained():
    uid = _fresh_uid()
    start = time.monotonic()
    res = _run("import os\nwhile True:\n    os.fork()\n", timeout_s=3.0, uid=uid, max_procs=16)
    assert not res.passed and res.status in ("failed", "timeout")
    assert time.monotonic() - start < 3.0 + SLACK_S
    _assert_no_processes_left(uid)


def test_output_flood_and_big_files_are_capped():
    res = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n", max_file_mb=1)
    assert res.status == "failed" and len(res.stdout_tail) <= 2000
    res = _run("open('big', 'wb').write(b'x' * (8 * 1024 * 1024))\n", max_file_mb=1)
    assert res.status == "failed" and "File too large" in res.stderr_tail


def test_refuses_without_isolation_unless_fallback_allowed(monkeypatch):
    monkeypatch.setattr(
        sandbox, "isolation_status", lambda: IsolationStatus(False, "forced off by a test")
    )
    with pytest.raises(SandboxUnavailableError, match="forced off by a test"):
        _run("print('hi')")
    try:
        res = _run("print('hi')", allow_network_fallback=True)
    except SandboxUnavailableError as e:  # no interpreter an unprivileged uid can run
        pytest.fail(f"fallback could not run: {e}")
    assert res.status == "passed", res.stderr_tail
    assert res.network_isolated is False
    assert res.isolation.startswith("none: forced off by a test")


# ------------------------------------------------------------ memory: per run, not per process


def _fork_and_allocate(n: int, mb: int) -> str:
    """A program whose n forked children each touch mb MB, then report their total RSS."""
    return f"""
import os, time
r, w = os.pipe()
kids = []
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray({mb} * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os.write(w, b"k")
            time.sleep(2)
            os._exit(0)
        except MemoryError:
            os._exit(3)
    kids.append(pid)
os.set_blocking(r, False)
got, deadline = 0, time.time() + 8
while got < {n} and time.time() < deadline:
    try:
        got += len(os.read(r, 64))
    except BlockingIOError:
        time.sleep(0.05)
rss_kb = 0
for pid in kids:
    try:
        status = open(f"/proc/{{pid}}/status").read().splitlines()
        rss_kb += next(int(x.split()[1]) for x in status if x.startswith("VmRSS"))
    except (OSError, StopIteration):
        pass
print(f"allocated {{got}} of {n}; children RSS {{rss_kb // 1024}} MB", flush=True)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
assert codes == [0] * {n}, codes
"""


def _children_rss_mb(res: sandbox.SandboxResult) -> int:
    for line in res.stdout_tail.splitlines():
        if line.startswith("allocated"):
            return int(line.split("RSS ")[1].split()[0])
    return 0


@pytest.fixture(params=["active", "rlimit-fallback"])
def memory_mechanism(request, monkeypatch) -> str:
    """Each memory test on the mechanism active here, and on the forced rlimit fallback."""
    if request.param == "rlimit-fallback":
        monkeypatch.setattr(
            sandbox,
            "memory_limit_status",
            lambda: sandbox.MemoryLimitStatus(False, "", "forced off by a test"),
        )
    return request.param


def test_forked_children_together_cannot_exceed_memory_mb(memory_mechanism):
    # 6 children x 100 MB = 600 MB > memory_mb: each got 512 MB before (the run held 600+)
    res = _run(_fork_and_allocate(6, 100), memory_mb=512, max_procs=8, timeout_s=15.0)
    assert not res.passed and res.status == "failed", (res.stdout_tail, res.memory_limit)
    assert "allocated 6 of 6" not in res.stdout_tail, res.stdout_tail
    assert _children_rss_mb(res) <= 512, res.stdout_tail
    # the case: 6 children x 160 MB under memory_mb=200 held 952 MB
    res = _run(_fork_and_allocate(6, 160), memory_mb=200, timeout_s=15.0)
    assert not res.passed and "allocated 6 of 6" not in res.stdout_tail, res.stdout_tail
    assert _children_rss_mb(res) <= 200, res.stdout_tail


def test_forked_children_well_under_memory_mb_pass(memory_mechanism):
    res = _run(_fork_and_allocate(6, 20), memory_mb=512, max_procs=8, timeout_s=15.0)
    assert res.status == "passed", (res.stderr_tail, res.memory_limit)
    assert "allocated 6 of 6" in res.stdout_tail


def test_the_memory_mechanism_is_recorded(memory_mechanism):
    res = _run("print('hi')", memory_mb=512, max_procs=8)
    assert res.status == "passed", res.stderr_tail
    if sandbox.memory_limit_status().cgroup2:
        assert res.memory_limit.startswith("cgroup2:memory.max=512MB/run"), res.memory_limit
    else:
        assert res.memory_limit.startswith("rlimit:AS=64MB/process,NPROC=8(<=512MB/run)"), (
            res.memory_limit
        )
        assert sandbox.memory_limit_status().reason in res.memory_limit
    assert res.memory_limit.split(";peak")[0] == sandbox.describe_memory_limit(512, 8)


def test_rlimit_fallback_lowers_the_process_count_and_refuses_too_little_memory(monkeypatch):
    monkeypatch.setattr(
        sandbox,
        "memory_limit_status",
        lambda: sandbox.MemoryLimitStatus(False, "", "forced off by a test"),
    )
    # 256 MB / 16 processes = 16 MB: below what the interpreter needs, so fewer processes
    desc = sandbox.describe_memory_limit(256, 16)
    assert desc.startswith("rlimit:AS=32MB/process,NPROC=8(<=256MB/run),NPROC lowered"), desc
    res = _run(_fork_and_allocate(8, 1), memory_mb=256, max_procs=16)  # 1 + 8 > 8 processes
    assert res.status == "failed" and "BlockingIOError" in res.stderr_tail, res.stderr_tail
    with pytest.raises(ValueError, match="below the 32 MB"):
        _run("print('hi')", memory_mb=16)


def test_cgroup2_limit_counts_the_whole_run(monkeypatch):
    status = sandbox.memory_limit_status()
    if not status.cgroup2:
        pytest.skip(f"no cgroup v2 memory limit here: {status.reason}")
    made: list[str] = []
    real_make = sandbox._make_cgroup

    def spy(*args):
        made.append(real_make(*args))
        return made[-1]

    monkeypatch.setattr(sandbox, "_make_cgroup", spy)
    # each child may use 200 MB (RLIMIT_AS = memory_mb), but 2 x 200 MB > the run's 256 MB
    res = _run(_fork_and_allocate(2, 200), memory_mb=256, max_procs=8, timeout_s=15.0)
    assert not res.passed and "allocated 2 of 2" not in res.stdout_tail, res.stdout_tail
    assert "oom_kills=" in res.memory_limit, res.memory_limit
    assert len(made) == 1 and not os.path.exists(made[0])  # the run's cgroup is removed


# ------------------------------------------------ filesystem: a minimal root, not the host's


def test_host_files_are_not_visible(tmp_path_factory):
    host_dir = Path(tempfile.mkdtemp(prefix="sbx-host-", dir="/tmp"))
    try:
        host_dir.chmod(0o755)
        secret = host_dir / "world-readable.txt"
        secret.write_text("host data")
        secret.chmod(0o644)
        program = (
            "import os\n"
            "for path in ('/etc/hostname', '/etc/passwd', " + repr(str(secret)) + ", "
            + repr(str(REPO / "pyproject.toml")) + "):\n"
            "    assert not os.path.exists(path), path\n"
            "for path in ('/etc', '/home', '/run', '/var', '/sys'):\n"
            "    assert not os.path.exists(path), path\n"
        )  # fmt: skip
        assert Path("/etc/hostname").exists() or Path("/etc/passwd").exists()
        res = _run(program)
        assert res.status == "passed", res.stderr_tail
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def test_world_writable_host_unix_socket_is_unreachable():
    host_dir = Path(tempfile.mkdtemp(prefix="sbx-sock-", dir="/tmp"))
    path = host_dir / "open.sock"
    try:
        host_dir.chmod(0o755)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            path.chmod(0o777)
            server.listen(1)
            server.setblocking(False)
            program = (
                "import socket\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                f"s.connect({str(path)!r})\n"
                "print('connected')\n"
            )
            res = _run(program)
            assert res.status == "failed" and "connected" not in res.stdout_tail
            assert "FileNotFoundError" in res.stderr_tail, res.stderr_tail
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody reached the host's socket
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def test_a_concurrent_runs_program_file_is_not_visible():
    token = f"OTHER-RUN-{uuid.uuid4().hex}"
    parent = Path(sandbox._sandbox_parent())
    other: dict[str, sandbox.SandboxResult] = {}
    thread = threading.Thread(
        target=lambda: other.update(
            res=_run(f"# {token}\nimport time\ntime.sleep(3)\n", timeout_s=15.0)
        )
    )
    thread.start()
    try:
        found: list[Path] = []
        deadline = time.monotonic() + 5.0
        while not found and time.monotonic() < deadline:
            for candidate in parent.glob("sandbox-*/program.py"):
                try:
                    if token in candidate.read_text():
                        found.append(candidate)
                except OSError:
                    continue
            time.sleep(0.05)
        assert found, "the other run's program file never appeared on the host"
        program = (
            "import glob, os\n"
            f"assert not os.path.exists({str(found[0])!r})\n"
            f"for path in glob.glob({str(parent / 'sandbox-*' / 'program.py')!r}):\n"
            # the token split in two, so that this program's own file does not hold it
            f"    assert {token[:10]!r} + {token[10:]!r} not in open(path).read(), path\n"
        )
        res = _run(program)
        assert res.status == "passed", res.stderr_tail
    finally:
        thread.join()
    assert other["res"].status == "passed", other["res"].stderr_tail


# --------------------------------------------------------------------------- HumanEval

TOY = {
    "task_id": "Toy/0",
    "prompt": (
        "def helper(x):\n    return x * 2\n\n\n"
        'def double_all(xs):\n    """Double every element."""\n'
    ),
    "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n",
    "entry_point": "double_all",
}


@pytest.mark.parametrize(
    "completion, passed",
    [
        ("    return [helper(x) for x in xs]\n", True),
        ("    return xs\n", False),
        ("    return [helper(x) for x in xs]\n\nraise SystemExit(0)\n", False),
        ("    return [helper(x) for x in xs]\n\nimport os\nos._exit(0)\n", False),
        ("    return [helper(x) for x in xs]\n\nexit()\n", False),
        (
            he.extract_completion(
                "```python\ndef double_all(xs):\n    return [2*x for x in xs]\n```", TOY
            ),
            True,
        ),
    ],
    ids=["right", "wrong", "SystemExit(0)", "os._exit(0)", "exit()", "chat-redefinition"],
)
def test_run_problem_counts_only_completed_checks(completion, passed):
    res = he.run_problem(TOY, completion)
    assert res.passed is passed, (res.status, res.stderr_tail)
    assert res.status == ("passed" if passed else "failed")


@pytest.fixture(scope="module")
def humaneval_problems() -> dict[str, dict]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"HumanEval not in the data mirror: {HUMANEVAL}")
    df = pd.read_parquet(HUMANEVAL)
    return {row["task_id"]: row for row in df.to_dict("records")}


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval_problems):
    problems = humaneval_problems
    assert len(problems) == 164
    wrong_ids = ["HumanEval/0", "HumanEval/10", "HumanEval/38", "HumanEval/163"]
    samples = [(tid, p["canonical_solution"]) for tid, p in problems.items()]
    samples += [(tid, "    return None\n") for tid in wrong_ids]  # a wrong solution
    samples += [("HumanEval/0", "    while True:\n        pass\n")]  # a hanging one
    # ending the script with status 0 before check() runs is a failure, not a pass
    samples += [("HumanEval/3", "    import sys\n    sys.exit(0)\n" + "\nimport os\nos._exit(0)\n")]
    # a chat-style answer repeating the signature, through the extractor
    p0 = problems["HumanEval/2"]
    chat = (
        "Here you go:\n```python\n"
        + p0["prompt"].split('"""')[0].rstrip()
        + "\n"
        + p0["canonical_solution"]
        + "```\n"
    )
    samples += [("HumanEval/2", he.extract_completion(chat, p0))]
    start = time.monotonic()
    out = he.evaluate(problems, samples, timeout_s=he.TIMEOUT_S, workers=2, ks=(1, 2))
    elapsed = time.monotonic() - start
    by_task = out["per_task"]
    canonical = {tid: by_task[tid][0] for tid in problems}
    failing = [tid for tid, ok in canonical.items() if not ok]
    assert failing == [], [
        (r.task_id, r.status, r.stderr_tail[-300:]) for r in out["samples"] if not r.passed
    ][:5]
    for tid in wrong_ids:
        assert by_task[tid][1] is False, tid
    assert by_task["HumanEval/0"][2] is False
    assert next(
        r for r in out["samples"] if r.task_id == "HumanEval/0" and r.index == 2
    ).status == ("timeout")
    assert by_task["HumanEval/2"] == [True, True]  # canonical, and the extracted chat answer
    assert by_task["HumanEval/3"] == [True, False]  # the early exit(0)
    assert out["n_samples"] == 164 + len(wrong_ids) + 3
    # pass@1 averages per-problem c/n; pass@2 exists only if every problem had 2 samples
    assert "pass@2" not in out
    # HumanEval/0: 1 of 3; HumanEval/3 and the other wrong ids: 1 of 2; all others all passed
    expected = (164 - len(wrong_ids) - 1 + 0.5 * len(wrong_ids) + 1 / 3) / 164
    assert out["pass@1"] == pytest.approx(expected)
    assert elapsed < 90.0  # about 20-40 s on a loaded 2-core machine
    # every run got this machine's per-run memory mechanism, and the result says which
    expected_limit = sandbox.describe_memory_limit(he.MEMORY_MB, he.MAX_PROCS)
    assert out["sandbox"]["memory_limit"] == [expected_limit]
    assert out["sandbox"]["isolation"] == [sandbox.ISOLATION_DESCRIPTION]


def test_code_task_provenance_records_the_sandbox_mechanism(mirror_dir):
    from tasks import get_task

    task = get_task("codealpaca_offline")
    splits = task.splits(mirror_dir, train_rows=4, selection_rows=2, test_rows=2)
    assert splits.provenance["sandbox"] == {
        "isolation": sandbox.ISOLATION_DESCRIPTION,
        "memory_limit": sandbox.describe_memory_limit(he.MEMORY_MB, he.MAX_PROCS),
    }
    assert "mem=1024MB/run" in task.protocol and f"procs={he.MAX_PROCS}" in task.protocol


# ------------------------------------------------------- forged passes (hostile tester)
HE0 = {
    "task_id": "HumanEval/0",
    "prompt": (
        "from typing import List\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        '    """ Check if in given list of numbers, are any two numbers closer to each other '
        'than\n    given threshold.\n    """\n'
    ),
    "test": (
        "\n\nMETADATA = {'author': 'jt', 'dataset': 'test'}\n\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
        "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
        "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n"
        "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n"
    ),
    "entry_point": "has_close_elements",
}
RIGHT = (
    "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
    " for b in numbers[i + 1:])\n"
)
# The tester's attack: read the success marker from the program file, print it, exit 0.
FORGE_FROM_FILE = (
    "    return False\n\n"
    "import os, re, sys\n"
    "_text = open(__file__).read()\n"
    'for _m in re.findall(r"[A-Z][A-Z_-]*-[0-9a-f]{8,}", _text):\n'
    "    print(_m)\n"
    "for _line in _text.splitlines():\n"
    "    if 'print(' in _line and ('COMPLETED' in _line or 'VERDICT' in _line):\n"
    '        print(_line.split("\'")[1] if "\'" in _line else _line)\n'
    "sys.stdout.flush()\n"
    "os._exit(0)\n"
)
# A marker guessed from the harness source: every constant-looking string of the checker.
FORGE_FROM_SOURCE = (
    "    return False\n\n"
    "import os, re, sys\n"
    "for _path in ('tasks/sandbox.py', 'tasks/protocols/humaneval.py'):\n"
    "    for _root in (os.path.dirname(os.path.abspath(__file__)), " + repr(str(REPO)) + "):\n"
    "        try:\n"
    "            _text = open(os.path.join(_root, _path)).read()\n"
    "        except OSError:\n"
    "            continue\n"
    '        for _m in re.findall(r"[A-Z]+-[A-Z]*-?", _text):\n'
    "            print(_m)\n"
    "print('VERDICT-' + '0' * 32)\n"
    "sys.stdout.flush()\n"
    "os._exit(0)\n"
)
FORGE_READS_STDIN = (  # the verdict pipe is drained and closed before this code exists
    "    return False\n\n"
    "import os, sys\n"
    "for _fd in range(0, 64):\n"
    "    try:\n"
    "        os.write(1, os.read(_fd, 4096))\n"
    "    except OSError:\n"
    "        pass\n"
    "os._exit(0)\n"
)
SYSEXIT_IN_CHECK = "    raise SystemExit(0)\n"
EXIT_AT_IMPORT = "    return False\n\nimport sys\nsys.exit(0)\n"
PATCH_BUILTINS = (  # makes every later assert compare True, at import
    "    return False\n\nimport builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
    "builtins.abs = lambda x: 0\n"
)


@pytest.mark.parametrize(
    "completion",
    [FORGE_FROM_FILE, FORGE_FROM_SOURCE, FORGE_READS_STDIN, SYSEXIT_IN_CHECK, EXIT_AT_IMPORT],
    ids=["marker-from-__file__", "marker-from-harness-source", "read-fds", "SystemExit-in-check",
         "sys.exit-at-import"],
)  # fmt: skip
def test_a_forged_pass_fails_and_a_right_answer_passes(completion):
    res = he.run_problem(HE0, completion)
    assert not res.passed and res.status == "failed", (res.status, res.stdout_tail)
    assert he.run_problem(HE0, RIGHT).passed


def test_a_forged_pass_fails_through_extract_completion():
    chat = "Sure:\n```python\n" + FORGE_FROM_FILE.replace("    return False\n", "") + "```\n"
    completion = he.extract_completion(chat, HE0)
    assert "os._exit(0)" in completion  # the attack survives extraction ...
    assert not he.run_problem(HE0, completion).passed  # ... and still does not pass


def test_builtins_patched_at_import_are_restored_before_the_checks():
    assert not he.run_problem(HE0, PATCH_BUILTINS).passed
    assert he.run_problem(HE0, RIGHT + PATCH_BUILTINS.replace("    return False\n", "")).passed


def test_the_verdict_secret_is_not_in_the_program_file_or_its_stdout(monkeypatch):
    seen = {}
    real = sandbox.run_untrusted

    def spy(program, *args, **kw):
        seen["program"], seen["stdin"] = program, kw.get("stdin_data")
        return real(program, *args, **kw)

    monkeypatch.setattr(sandbox, "run_untrusted", spy)
    res = he.run_problem(HE0, RIGHT + "\nprint('hello')\n")
    assert res.passed and "hello" in res.stdout_tail
    secret = seen["stdin"].decode()
    assert secret and secret not in seen["program"] and secret not in res.stdout_tail
