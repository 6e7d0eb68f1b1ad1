"""What killed a trial's worker process: the signal, told by the process itself.

Ray reports a dead worker only as "its worker process has died ... exit type SYSTEM_ERROR";
the raylet, its parent, logs no exit status. So the trial leaves a witness in its own
directory while it runs:
- `faulthandler` writes "Fatal Python error: Segmentation fault" (SIGSEGV, SIGFPE, SIGABRT,
  SIGBUS, SIGILL) with the stack, from C, so it works from Tune's trainable thread;
- one file per catchable termination signal (SIGTERM, SIGHUP, SIGUSR1, SIGUSR2) that
  `faulthandler.register` fills when that signal arrives, then chains to the old handler;
- a heartbeat (time, resident memory) every few seconds.
A death with none of the signal files written was an uncatchable signal: SIGKILL (the
kernel's OOM killer, `kill -9`, `ray stop --force`). The heartbeat says how large the
process was when last seen, which tells an OOM-kill from the rest.
"""

from __future__ import annotations

import faulthandler
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FATAL_FILE = "witness.fatal"
HEARTBEAT_FILE = "witness.heartbeat"
WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
HEARTBEAT_S = 2.0


def _signal_file(sig: signal.Signals) -> str:
    return f"witness.{sig.name}"


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def crash_witness(directory: Path) -> Iterator[None]:
    """Leave the witness files in `directory` while the body runs; remove them after."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {FATAL_FILE: open(directory / FATAL_FILE, "w")}  # noqa: SIM115 - held open
    for sig in WATCHED_SIGNALS:
        files[_signal_file(sig)] = open(directory / _signal_file(sig), "w")  # noqa: SIM115
    stop = threading.Event()

    def beat() -> None:
        started = time.time()
        while not stop.wait(HEARTBEAT_S):
            rss = _rss_mb()
            text = f"{time.time():.1f} {time.time() - started:.1f} {rss if rss else 'nan'}\n"
            (directory / HEARTBEAT_FILE).write_text(text)

    heartbeat = threading.Thread(target=beat, name="crash-witness", daemon=True)
    was_enabled = faulthandler.is_enabled()  # Ray's workers enable it onto stderr
    faulthandler.enable(file=files[FATAL_FILE], all_threads=False)
    for sig in WATCHED_SIGNALS:
        faulthandler.register(sig, file=files[_signal_file(sig)], all_threads=False, chain=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join(timeout=HEARTBEAT_S)
        for sig in WATCHED_SIGNALS:
            faulthandler.unregister(sig)
        faulthandler.disable()
        if was_enabled:
            faulthandler.enable()
        for name, handle in files.items():
            handle.close()
            (directory / name).unlink(missing_ok=True)
        (directory / HEARTBEAT_FILE).unlink(missing_ok=True)


def read_witness(directory: Path | None) -> str | None:
    """The cause a dead trial's witness files tell, in one line (None: no witness there)."""
    if directory is None or not (directory / FATAL_FILE).exists():
        return None
    fatal = (directory / FATAL_FILE).read_text(errors="replace").strip()
    seen = ""
    beat = directory / HEARTBEAT_FILE
    if beat.exists():
        parts = beat.read_text().split()
        if len(parts) == 3:
            stamp, _, rss = parts
            ago = time.time() - float(stamp)
            seen = f"; last seen alive {ago:.0f} s before, resident memory {float(rss):.0f} MB"
    if fatal:
        first = fatal.splitlines()[0]  # "Fatal Python error: Segmentation fault"
        return f"the worker died of a fatal signal: {first}{seen}"
    for sig in WATCHED_SIGNALS:
        path = directory / _signal_file(sig)
        if path.exists() and path.read_text(errors="replace").strip():
            return f"the worker was terminated by {sig.name} ({int(sig)}){seen}"
    return (
        "the worker was killed by SIGKILL (9), the one signal no handler sees: the kernel's"
        f" OOM killer, `kill -9` or `ray stop --force`{seen}"
    )
