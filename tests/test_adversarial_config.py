"""A hostile tester's bad configs: each is refused before Ray starts, with exit code 2, one
`error:` line (no traceback), and an existing output dir left byte-identical."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.spec.config import ConfigError, validate_config
from tests.conftest import MINILM, REPO

BASE = {
    "name": "adv",
    "model": {"id": MINILM},
    "tasks": ["glue/sst2"],
    "methods": {"lora": {"lrs": [1e-3]}},
    "seeds": [0, 1],
    "budget": {"max_steps": 2, "batch_size": 4, "max_length": 16, "train_rows": 16},
}

# YAML text substitutions: what yaml.safe_dump cannot write (duplicate keys, `1e-3` next to
# `0.001`, the YAML spellings of nan/inf).
_LORA = "methods:\n  lora:\n    lrs:\n    - 0.001\n"


def _snapshot(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _write(tmp_path: Path, raw: dict, replace: tuple[str, str] | None = None) -> Path:
    text = yaml.safe_dump(raw, sort_keys=False)
    if replace is not None:
        assert replace[0] in text, (replace[0], text)
        text = text.replace(replace[0], replace[1])
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    return config


def _refused(tmp_path: Path, capsys, raw: dict, message: str, replace=None) -> str:
    import ray

    out = Path(raw["output_dir"])
    before = _snapshot(out) if out.is_dir() else None
    config = _write(tmp_path, raw, replace)
    assert main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:"), err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert message in err, err
    assert not ray.is_initialized()
    if before is not None:
        assert _snapshot(out) == before  # byte-identical
    return err


@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.parquet").write_bytes(b"not really parquet, but must stay as it is")
    (out / "notes.txt").write_text("keep me\n")
    return out


def _cfg(out: Path, **changes) -> dict:
    raw = copy.deepcopy(BASE) | {"output_dir": str(out)}
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "replace", "message"),
    [
        ({}, (_LORA, _LORA.replace("0.001", ".nan")), "finite"),
        ({}, (_LORA, _LORA.replace("0.001", ".inf")), "finite"),
        ({"budget": {"epochs": 1.5, "batch_size": 4}}, ("epochs: 1.5", "epochs: .inf"), "finite"),
        ({"budget": {"epochs": 1.5, "batch_size": 4}}, ("epochs: 1.5", "epochs: .nan"), "finite"),
        ({"seeds": [-1]}, None, "seeds.0"),
        ({"seeds": [2**32]}, None, "seeds.0"),
        ({"seeds": [3, 3]}, None, "duplicate seeds [3]"),
        ({}, (_LORA, _LORA.replace("- 0.001\n", "- 1e-3\n    - 0.001\n")), "duplicate"),
        ({"tasks": ["glue/sst2", "glue/sst2"]}, None, "duplicate tasks ['glue/sst2']"),
        ({}, (_LORA, _LORA + "  lora:\n    lrs:\n    - 0.002\n"), "duplicate key 'lora'"),
        ({"name": ""}, None, "name"),
        ({"name": "../escape"}, None, "path separator"),
        ({"name": "a/b"}, None, "path separator"),
        ({"budget__batch_size": 32}, None, "batch_size (32) is larger than budget.train_rows"),
        ({"budget__max_length": 4096}, None, "max_length 4096 exceeds"),
        (
            {"methods": {"lora_sb": {"lrs": [1e-3], "overrides": {"rank": 400}}}},
            None,
            "rank 400 exceeds",
        ),
        (
            {"methods": {"pissa": {"lrs": [1e-3], "overrides": {"rank": 400}}}},
            None,
            "rank 400 exceeds",
        ),
        ({"model": {"id": MINILM, "revision": "no-such-rev"}}, None, "revision 'no-such-rev'"),
    ],
)
def test_bad_config_is_refused_and_the_output_dir_untouched(
    tmp_path, capsys, existing_out, changes, replace, message
):
    _refused(tmp_path, capsys, _cfg(existing_out, **changes), message, replace)


def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _refused(tmp_path, capsys, _cfg(a_file), "is not a directory")
    _refused(tmp_path, capsys, _cfg(a_file / "out"), "is under a file")
    assert a_file.read_text() == "x"


def test_read_only_output_dir(tmp_path, capsys):
    # /proc/sys refuses writes even to root (permissions alone would not stop root).
    _refused(tmp_path, capsys, _cfg(Path("/proc/sys/harness-out")), "not writable")


def test_rank_above_a_layer_is_fine_for_plain_lora(tmp_path):
    # Plain LoRA can use any rank (over-parameterised, but well defined): not refused.
    raw = _cfg(tmp_path / "out", methods={"lora": {"lrs": [1e-3], "overrides": {"rank": 400}}})
    assert validate_config(raw).methods["lora"].overrides == {"rank": 400}


def test_one_problem_list_for_many_problems(tmp_path):
    raw = _cfg(tmp_path / "out", seeds=[1, 1], name="x/y", tasks=["glue/sst2", "glue/sst2"])
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    text = str(info.value)
    assert "duplicate seeds" in text and "duplicate tasks" in text and "name" in text


def test_a_typo_is_reported_without_importing_ray_or_torch(tmp_path):
    raw = _cfg(tmp_path / "out")
    raw["budgt"] = raw.pop("budget")
    config = _write(tmp_path, raw)
    probe = (
        "import sys; from harness.cli import main; rc = main(['sweep', sys.argv[1]]); "
        "heavy = sorted(m for m in ('ray', 'torch', 'pandas', 'harness.sweeps.sweep') "
        "if m in sys.modules); print(rc, heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(config)], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert done.stderr.startswith("error:") and "budgt" in done.stderr
