"""cluster/gpu_check.py's dry run on CPU, as on the GPU machine: ray, deepspeed and datasets
hidden (a sitecustomize makes importing them fail, in the script and its bench subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR") or REPO.parent / "shared" / "data")
HIDDEN = ("ray", "deepspeed", "datasets")

BLOCKER = f"""
import sys


class HideModules:
    '''Every import finder, blind to {", ".join(HIDDEN)}: importing them raises
    ModuleNotFoundError and importlib.util.find_spec says None, as when not installed.'''

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [HideModules(finder) for finder in sys.meta_path]
"""


@pytest.mark.skipif(
    not (DATA_DIR / "nyu-mll" / "glue" / "sst2").is_dir(), reason="needs the data mirror"
)
def test_gpu_check_dry_run_without_ray_deepspeed_datasets(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "HARNESS_DATA_DIR": str(DATA_DIR), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "cluster" / "gpu_check.py"), "--dry-run",
         "--out-dir", str(out), "--copy-to", str(tmp_path / "copied")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list(out.glob("*/gpu_check_dry_run.json"))
    result = json.loads(path.read_text())
    assert (tmp_path / "copied" / "gpu_check_dry_run.md").is_file()

    # The blocker held, and nothing on the path imported Ray.
    assert result["importable"] == dict.fromkeys(HIDDEN, False)
    assert result["ray_imported"] is False
    assert result["mode"] == "dry_run" and result["device"] == "cpu"

    # (a) both trials ran the harness's single-device path to the end, with sane numbers.
    assert [t["method"] for t in result["trials"]] == ["lora", "lora_ga"]
    for trial in result["trials"]:
        assert trial["status"] == "ok", trial.get("error")
        assert trial["steps"] == 3 and trial["train_rows"] == 32
        assert json.loads(trial["test_rows"]) == {"validation": 16}
        assert 0.0 <= trial["test_score"] <= 1.0 and 0.0 <= trial["selection_score"] <= 1.0
        assert trial["tokens_per_s"] > 0 and trial["init_time_s"] >= 0
        assert trial["trainable_params"] == trial["expected_trainable_params"]
        assert trial["mfu"] > 0 and len(trial["key"]) == 16
    lora, lora_ga = result["trials"]
    # Both start at the base function: LoRA with B = 0 exactly, LoRA-GA by offsetting W0
    # by its gradient-SVD init (equal up to round-off, not bit for bit).
    assert lora["sanity_init"].startswith("identity: max|delta output|=0 ")
    assert lora_ga["sanity_init"].startswith("identity: ")
    assert not lora_ga["sanity_init"].startswith("identity: max|delta output|=0 ")
    assert lora_ga["init_time_s"] > lora["init_time_s"]  # it reads gradients, LoRA does not

    # (b) the bench ran in its subprocess and printed a table; (c) skipped, and says why.
    assert result["bench"]["status"] == "ok", result["bench"]
    assert "lora" in result["bench"]["table"]
    assert result["zero2"]["status"] == "skipped"
    assert "deepspeed" in result["zero2"]["reason"]


def test_resolve_model_honours_model_dir_variable_without_a_config(tmp_path, monkeypatch):
    """The GPU check's bench finds the carried MiniLM through HARNESS_MODEL_DIR, as a sweep
    would (harness bench passes no model_dir of its own)."""
    from harness.modeling.models import resolve_model

    model_id = "acme/gpu-check-stand-in"
    (tmp_path / model_id).mkdir(parents=True)
    monkeypatch.setenv("HARNESS_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the absent id: no hub lookup
    source = resolve_model(model_id, None, None)
    assert (source.kind, source.location) == ("local", str(tmp_path / model_id))
    monkeypatch.delenv("HARNESS_MODEL_DIR")
    with pytest.raises(FileNotFoundError):
        resolve_model("acme/gpu-check-absent", None, None)
