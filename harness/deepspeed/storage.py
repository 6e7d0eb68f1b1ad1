"""Where distributed trials persist (Ray Tune and Ray Train storage), and the rule that a
multi-node cluster needs storage every node reaches: a cloud URI or a network filesystem
(read from /proc/mounts)."""

from __future__ import annotations

from pathlib import Path

from harness.spec.config import ConfigError, SweepConfig
from harness.spec.identity import TrialSpec

# Remote or shared storage every node reaches; anything else is one machine's disk.
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://")
SHARED_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.juicefs", "fuse.mountpoint-s3",
    "fuse.cephfs", "efs", "wekafs", "panfs",
}  # fmt: skip


def storage_path(cfg: SweepConfig, out_dir: Path) -> str:
    """Where Ray Tune and Ray Train persist: config/env, else <output_dir>/ray."""
    return cfg.resolved_storage_path() or str(out_dir / "ray")


def is_shared_storage(path: str) -> bool:
    """A cloud URI, or a folder on a network filesystem (from /proc/mounts)."""
    if path.startswith(REMOTE_SCHEMES):
        return True
    if "://" in path:  # other fsspec/pyarrow schemes (e.g. file://) are not known shared
        return False
    return mount_fstype(path) in SHARED_FILESYSTEMS


def mount_fstype(path: str) -> str | None:
    """The filesystem type of the mount holding `path` (its nearest existing parent)."""
    target = Path(path).expanduser().absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, fstype = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def check_storage(path: str, alive_nodes: int, declared_shared: bool = False) -> None:
    """Refuse node-local storage on a multi-node cluster (trials would write where the
    driver and the other nodes cannot read, and restoring would find nothing)."""
    if alive_nodes <= 1 or declared_shared or is_shared_storage(path):
        return
    raise ConfigError(
        f"the Ray cluster has {alive_nodes} nodes but the storage path {path!r} is on local "
        f"disk ({mount_fstype(path) or 'unknown filesystem'}), which the other nodes cannot "
        "read: set ray.storage_path (or $HARNESS_STORAGE_PATH) to s3://bucket/prefix, "
        "gs://bucket/prefix or a folder on a filesystem every node mounts (NFS); if that "
        "folder is shared but not recognised, also set ray.shared_storage: true"
    )


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def train_run_name(spec: TrialSpec) -> str:
    """Stable per trial (content key), so a restart finds the same Train run in storage."""
    task = spec.task.replace("/", "-")
    return f"{spec.method}_{task}_lr{spec.lr:g}_s{spec.seed}_{spec.key()}"
