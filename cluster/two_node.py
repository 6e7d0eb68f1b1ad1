"""A real 2-node Ray cluster on one Linux machine: a head and a worker in separate network
namespaces joined by a veth pair, with a shared folder as storage.

    head  (netns lrh<id>h, 10.77.0.1/24) --veth-- worker (netns lrh<id>w, 10.77.0.2/24)

Each node is a `ray start --block` of its own (its own --temp-dir, 1 CPU by default); the
addresses exist only inside the two namespaces, so nothing leaves the machine and the Ray
ports cannot clash with another Ray on the host. Both namespaces share the host's
filesystem, so a folder is storage every node really sees (declare it with
`ray.shared_storage: true`; the harness cannot recognise it from /proc/mounts).

Needs root (CAP_NET_ADMIN, `ip netns`). Used by tests/test_cluster.py; by hand:

    sudo .venv/bin/python cluster/two_node.py -- \\
        .venv/bin/harness sweep CONFIG.yaml --address 10.77.0.1:6379

starts the cluster, runs the command inside the head's namespace (RAY_ADDRESS set), and
tears everything down (every process in both namespaces, then the namespaces).

Killing a node: `kill_worker()` SIGKILLs every process in the worker's namespace (raylet,
its workers and trials) - `ray stop` would not do: it finds Ray processes by name across the
whole host, the head's and other users' included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, WORKER_IP, PORT = "10.77.0.1", "10.77.0.2", 6379
HEAD_ADDRESS = f"{HEAD_IP}:{PORT}"

# Notice a killed node within seconds (defaults: 3 s period x 5 failures + 10 s timeouts).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class ClusterError(RuntimeError):
    pass


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise ClusterError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def netns_available() -> str | None:
    """None if `ip netns` + veth work here, else why not (the exact error)."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth)"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is missing"
    name = f"lrhprobe{os.getpid()}"
    try:
        done = _sh("ip", "netns", "add", name, check=False)
        if done.returncode:
            return f"ip netns add failed: {done.stderr.strip()}"
        return None
    finally:
        _sh("ip", "netns", "del", name, check=False)


class TwoNodeCluster:
    """Context manager: `with TwoNodeCluster(env=...) as c: c.run_in_head([...])`."""

    def __init__(self, env: dict[str, str] | None = None, cpus_per_node: int = 1,
                 object_store_mb: int = 256, start_timeout_s: float = 90,
                 logs_to: str | Path | None = None) -> None:  # fmt: skip
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.head_ns, self.worker_ns = f"lrh{tag}h", f"lrh{tag}w"
        self.veth = (f"lrh{tag}a", f"lrh{tag}b")  # <= 15 characters
        self.cpus, self.object_store = cpus_per_node, object_store_mb * 1024 * 1024
        self.start_timeout_s = start_timeout_s
        self.logs_to = Path(logs_to) if logs_to else None  # where stop() copies node logs
        # Short paths: Ray's unix sockets live under --temp-dir (108-character limit).
        self.root = Path(tempfile.mkdtemp(prefix="lrh2n-", dir="/tmp"))
        self.temp = {"head": self.root / "h", "worker": self.root / "w"}
        self.env = {
            **os.environ,
            **FAST_HEALTH_CHECKS,
            # Token auth, as on a real cluster (cluster/README.md): one token for all nodes.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # ------------------------------------------------------------------ network
    def _network_up(self) -> None:
        a, b = self.veth
        for ns in (self.head_ns, self.worker_ns):
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for dev, ns, ip in ((a, self.head_ns, HEAD_IP), (b, self.worker_ns, WORKER_IP)):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def exec_prefix(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.head_ns if node == "head" else self.worker_ns]

    # ------------------------------------------------------------------ nodes
    def _start_node(self, node: str) -> None:
        self.temp[node].mkdir(parents=True)
        args = ["--head", f"--port={PORT}", f"--node-ip-address={HEAD_IP}",
                "--include-dashboard=false"] if node == "head" else [
                f"--address={HEAD_ADDRESS}", f"--node-ip-address={WORKER_IP}"]  # fmt: skip
        log = open(self.root / f"{node}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        self.nodes[node] = subprocess.Popen(
            [*self.exec_prefix(node), RAY, "start", "--block", *args,
             f"--num-cpus={self.cpus}", "--num-gpus=0",
             f"--object-store-memory={self.object_store}",
             f"--temp-dir={self.temp[node]}", "--disable-usage-stats"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def alive_nodes(self) -> int:
        """Alive nodes as the head's GCS sees them (a short driver in the head's namespace)."""
        code = (
            f"import ray; ray.init(address={HEAD_ADDRESS!r}, include_dashboard=False, "
            "log_to_driver=False, configure_logging=False); "
            "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"
        )
        done = subprocess.run(
            [*self.exec_prefix("head"), sys.executable, "-c", code],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        for line in done.stdout.splitlines():
            if line.startswith("ALIVE "):
                return int(line.split()[1])
        raise ClusterError(f"could not query the head: {done.stderr.strip()[-800:]}")

    def _wait_nodes(self, want: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = None
        while time.monotonic() < deadline:
            for node, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise ClusterError(f"ray start ({node}) exited: {self.log(node)[-1500:]}")
            try:
                last = self.alive_nodes()
                if last >= want:
                    return
            except (ClusterError, subprocess.TimeoutExpired) as err:
                last = err
            time.sleep(1)
        raise ClusterError(f"{want} nodes not up within {self.start_timeout_s:g} s ({last})")

    def start(self) -> TwoNodeCluster:
        try:
            self._network_up()
            self._start_node("head")
            self._wait_nodes(1)
            self._start_node("worker")
            self._wait_nodes(2)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self, node: str) -> str:
        try:
            return (self.root / f"{node}.log").read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ faults
    def pids(self, node: str) -> list[int]:
        ns = self.head_ns if node == "head" else self.worker_ns
        done = _sh("ip", "netns", "pids", ns, check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def _kill_ns(self, node: str, timeout_s: float = 20) -> None:
        """SIGKILL every process in the node's namespace (all started by this cluster)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        raise ClusterError(f"processes left in {node}'s namespace: {self.pids(node)}")

    def kill_worker(self) -> None:
        """The worker node dies: raylet, object store, its workers and trials, at once."""
        self._kill_ns("worker")
        proc = self.nodes.get("worker")
        if proc is not None:
            proc.wait(timeout=20)

    def worker_trial_dirs(self) -> list[str]:
        """Tune trials that started on the worker: each one's working dir in its temp dir."""
        found = self.temp["worker"].glob("session_*/artifacts/*/*/working_dirs/*")
        return sorted({p.name for p in found if p.is_dir()})

    # ------------------------------------------------------------------ driver
    def run_in_head(self, cmd: list[str], **popen) -> subprocess.Popen:
        """A process in the head's namespace (e.g. the sweep driver), RAY_ADDRESS set."""
        env = {**self.env, "RAY_ADDRESS": HEAD_ADDRESS, **popen.pop("env", {})}
        return subprocess.Popen([*self.exec_prefix("head"), *cmd], env=env, cwd=REPO,
                                start_new_session=True, **popen)  # fmt: skip

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        errors = []
        for node in ("worker", "head"):
            try:
                if (self.worker_ns if node == "worker" else self.head_ns) in _sh(
                    "ip", "netns", "list", check=False
                ).stdout:
                    self._kill_ns(node)
            except ClusterError as err:
                errors.append(str(err))
        for proc in self.nodes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                errors.append(f"ray start {proc.pid} did not exit")
        for ns in (self.head_ns, self.worker_ns):
            _sh("ip", "netns", "del", ns, check=False)  # the veth pair goes with them
        for log in self._logs:
            log.close()
        if self.logs_to:
            self.logs_to.mkdir(parents=True, exist_ok=True)
            for log in self.root.glob("*.log"):
                shutil.copy(log, self.logs_to / log.name)
        shutil.rmtree(self.root, ignore_errors=True)  # temp dirs of both nodes
        if errors:
            raise ClusterError("; ".join(errors))

    def __enter__(self) -> TwoNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1 :]
    why = netns_available()
    if why:
        print(f"two_node: cannot build the cluster: {why}", file=sys.stderr)
        return 1
    with TwoNodeCluster() as cluster:
        print(
            f"two_node: head {HEAD_ADDRESS} (netns {cluster.head_ns}), worker {WORKER_IP} "
            f"(netns {cluster.worker_ns}), node temp dirs under {cluster.root}",
            flush=True,
        )
        proc = cluster.run_in_head(cmd)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGINT)
            return proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
