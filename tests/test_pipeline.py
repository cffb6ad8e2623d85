"""The DVC pipeline end to end on a throw-away copy of the project, with a tiny model: flipping
the checkpointing policy re-runs only what reads it, `dvc metrics diff` shows the peak-memory
change, `dvc params diff` the flag, and DVC's run-cache holds no training run it could restore
in place of a new measurement."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import CORPUS, ROOT

pytestmark = pytest.mark.skipif(not CORPUS.is_file(), reason=f"tiny shakespeare not at {CORPUS}")
GENERATED = ("dvc.lock", "metrics/", "plots/", "logs/")
SIZE = "shakespeare_char"


def project_copy(dest):
    """The project's files as git sees them (committed or not), without generated outputs."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if not name.startswith(GENERATED) and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.fixture
def repo(tmp_path):
    project_copy(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["local"] = str(CORPUS)
    params["train"]["device"] = "cpu"
    params["sizes"] = {SIZE: {"config": "config/train_shakespeare_char.py", "n_layer": 2,
                              "n_head": 2, "n_embd": 128, "batch_size": 16, "block_size": 128,
                              "max_iters": 3, "eval_iters": 1, "log_interval": 1}}
    params["verify"]["threshold_pct"] = {"cpu": -100}  # the mechanics here, not the memory claim
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(tmp_path),
               NEUROMANIFOLD_CACHE=str(tmp_path / ".cache"),
               TIKTOKEN_CACHE_DIR=str(tmp_path / ".cache" / "tiktoken"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")

    def sh(*cmd):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    sh("git", "init", "-q")
    return tmp_path, sh


def set_policy(path, policy):
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["checkpointing"]["checkpoint_policy"] = policy
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(sh) -> str:
    return sh(sys.executable, "-m", "dvc", "repro")


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_flipping_the_policy_remeasures_only_the_checkpointed_run(repo):
    path, sh = repo
    first = repro(sh)
    assert ran(first) == {"prepare", f"train_baseline@{SIZE}", f"train_checkpointed@{SIZE}",
                          "verify", "report"}
    assert "VERIFICATION PASSED ✓" in first
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "block")

    set_policy(path, "attention")
    assert ran(repro(sh)) == {f"train_checkpointed@{SIZE}", "verify", "report"}
    metrics = json.loads(sh(sys.executable, "-m", "dvc", "metrics", "diff", "--json"))
    checkpointed = metrics[f"metrics/train/{SIZE}/checkpointed.json"]
    assert checkpointed["policy"]["old"] == "block" and checkpointed["policy"]["new"] == "attention"
    peak = checkpointed["peak_memory_gb"]
    assert peak["new"] != peak["old"] and peak["diff"] == pytest.approx(peak["new"] - peak["old"])
    assert f"metrics/train/{SIZE}/baseline.json" not in metrics  # not re-run, not changed
    assert f"sizes.{SIZE}.reduction_pct" in metrics["metrics/verify.json"]
    params = json.loads(sh(sys.executable, "-m", "dvc", "params", "diff", "--json"))
    assert params == {"params.yaml": {"checkpointing.checkpoint_policy":
                                      {"old": "block", "new": "attention"}}}

    # DVC's run-cache can only restore a run it saved: the training stages must not be there,
    # so that going back to `block` measures again instead of restoring the old figures.
    saved = [yaml.safe_load(f.read_text())["cmd"] for f in (path / ".dvc/cache/runs").rglob("*")
             if f.is_file()]
    assert "python3 stages/prepare.py" in saved
    assert not [cmd for cmd in saved if "stages/train.py" in cmd]


def test_a_memory_lever_for_the_checkpointed_run_only_is_refused():
    from neuromanifold_gpt.params import load_params, run_files, training_args

    params = load_params(path=ROOT / "params.yaml")
    params["checkpointing"] = dict(params["checkpointing"], lean_loss=True)
    with pytest.raises(ValueError, match="move lean_loss to train:"):
        training_args(params, "gpt2", "checkpointed", "cpu", run_files("gpt2", "checkpointed"))
