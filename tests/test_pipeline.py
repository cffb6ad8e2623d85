"""The DVC pipeline end to end on a throw-away copy of the project, with a tiny model and a
corpus of its own: the first `dvc repro` measures everything, a second one re-runs only the
hardware stage, figures from other hardware are re-measured, a bad params.yaml stops in the
hardware stage with the outputs intact, and flipping the checkpointing policy re-runs only
what reads it (`dvc metrics diff` shows the peak-memory change, `dvc params diff` the flag),
with no training run in DVC's run-cache to restore in place of a new measurement."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

GENERATED = ("dvc.lock", "metrics/", "plots/", "logs/")
SIZE = "shakespeare_char"
TRAINING = {f"train_baseline@{SIZE}", f"train_checkpointed@{SIZE}"}
RUN_METRICS = [f"metrics/train/{SIZE}/{run}.json" for run in ("baseline", "checkpointed")]


def project_copy(dest):
    """The project's files as git sees them (committed or not), without generated outputs."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if not name.startswith(GENERATED) and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


class Repo:
    """A project copy in git, its corpus handed over the documented offline way."""

    def __init__(self, path, corpus):
        self.path = path
        # the stages' `python3` is this interpreter, whatever comes first on the caller's PATH
        path_var = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(path), PATH=path_var,
                        NEUROMANIFOLD_CACHE=str(path / ".cache"), NEUROMANIFOLD_CORPUS=str(corpus),
                        TIKTOKEN_CACHE_DIR=str(path / ".cache" / "tiktoken"),
                        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                        GIT_COMMITTER_EMAIL="t@t")

    def run(self, *cmd):
        return subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True)

    def sh(self, *cmd) -> str:
        done = self.run(*cmd)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def dvc(self, *args) -> str:
        return self.sh(sys.executable, "-m", "dvc", *args)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, params: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def read(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, small_corpus):
    """The copy after its first `dvc repro`, committed; `first` holds that run's output."""
    corpus, sha256 = small_corpus
    repo = Repo(tmp_path_factory.mktemp("project"), corpus)
    project_copy(repo.path)
    params = repo.params()
    params["data"]["sha256"] = sha256
    params["train"]["device"] = "cpu"
    params["sizes"] = {SIZE: {"config": "config/train_shakespeare_char.py", "n_layer": 2,
                              "n_head": 2, "n_embd": 128, "batch_size": 16, "block_size": 128,
                              "max_iters": 3, "eval_iters": 1, "log_interval": 1}}
    # the mechanics here, not the size of the saving: any saving passes
    params["verify"]["threshold_pct"] = 0
    params["verify"]["expected_range_pct"] = [0, 100]
    repo.set_params(params)
    repo.sh("git", "init", "-q")
    repo.first = repo.dvc("repro")
    repo.sh("git", "add", "-A")
    repo.sh("git", "commit", "-qm", "measured")
    return repo


def test_the_first_repro_measures_every_stage(repo):
    assert ran(repo.first) == {"hardware", "prepare", *TRAINING, "verify", "report"}
    assert "metrics/ holds no figures yet: every size is measured" in repo.first
    assert "VERIFICATION PASSED ✓" in repo.first
    hardware = repo.read("metrics/hardware.json")
    assert hardware["device"] == "cpu" and hardware["dtype"] == "float32"
    for name in RUN_METRICS:  # every run records where and from what it was measured
        run = repo.read(name)
        assert run["device_name"] == hardware["device_name"]
        assert run["torch_version"] == hardware["torch_version"]
        assert len(run["code_hash"]) == 64 and run["git_commit"] is None  # no commit yet
    timeline = (repo.path / f"plots/step/{SIZE}/baseline.tsv").read_text().splitlines()
    assert timeline[0] == "time_ms\tallocated_gb\tphase" and len(timeline) > 10
    assert {line.split("\t")[2] for line in timeline[1:]} == {"forward", "backward", "optimizer"}
    assert (repo.path / "plots/memory_in_step.png").stat().st_size > 10_000


def test_a_second_repro_on_the_same_machine_reruns_only_the_hardware_stage(repo):
    before = [repo.read(name) for name in RUN_METRICS]
    out = repo.dvc("repro")
    assert ran(out) == {"hardware"}
    assert "the same as the figures in metrics/" in out and "dvc repro --force" in out
    assert [repo.read(name) for name in RUN_METRICS] == before


def test_a_bad_params_value_stops_in_the_hardware_stage_with_the_outputs_intact(repo):
    good = repo.params()
    outputs = {p: p.read_bytes() for p in repo.path.glob("metrics/**/*.json")}
    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["sizes"][SIZE]["batch_size"] = "sixteen"
    repo.set_params(bad)
    try:
        done = repo.run(sys.executable, "-m", "dvc", "repro")
    finally:
        repo.set_params(good)
    assert done.returncode != 0
    assert ran(done.stdout) == {"hardware"}
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: batch_size='sixteen' in params.yaml sizes.{SIZE} is not valid: "
                      f"expected an integer or auto"]
    assert "Traceback" not in done.stderr
    assert {p: p.read_bytes() for p in repo.path.glob("metrics/**/*.json")} == outputs


def test_flipping_the_policy_remeasures_only_the_checkpointed_run(repo):
    params = repo.params()
    assert params["checkpointing"]["checkpoint_policy"] == "block"
    params["checkpointing"]["checkpoint_policy"] = "attention"
    repo.set_params(params)
    out = repo.dvc("repro")
    assert ran(out) == {"hardware", f"train_checkpointed@{SIZE}", "verify", "report"}
    assert "VERIFICATION PASSED ✓" in out  # a params-only change still compares
    metrics = json.loads(repo.dvc("metrics", "diff", "--json"))
    checkpointed = metrics[f"metrics/train/{SIZE}/checkpointed.json"]
    assert checkpointed["policy"]["old"] == "block" and checkpointed["policy"]["new"] == "attention"
    peak = checkpointed["peak_memory_gb"]
    assert peak["new"] != peak["old"] and peak["diff"] == pytest.approx(peak["new"] - peak["old"])
    assert f"metrics/train/{SIZE}/baseline.json" not in metrics  # not re-run, not changed
    assert f"sizes.{SIZE}.reduction_pct" in metrics["metrics/verify.json"]
    assert json.loads(repo.dvc("params", "diff", "--json")) == {
        "params.yaml": {"checkpointing.checkpoint_policy": {"old": "block", "new": "attention"}}}

    # DVC's run-cache can only restore a run it saved: the training stages must not be there,
    # so that going back to `block` measures again instead of restoring the old figures.
    saved = [yaml.safe_load(f.read_text())["cmd"] for f in (repo.path / ".dvc/cache/runs").rglob("*")
             if f.is_file()]
    assert "python3 stages/prepare.py" in saved
    assert not [cmd for cmd in saved if "stages/train.py" in cmd]


def test_verify_json_holds_the_headline_figures_and_the_details_are_no_metric(repo):
    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    metrics = next(iter(shown.values()))["data"]
    assert "metrics/verify_details.json" not in metrics  # descriptions stay out of diffs
    assert metrics["metrics/verify.json"]["data"]["sizes"][SIZE] == repo.read(
        "metrics/verify.json")["sizes"][SIZE]
    details = repo.read("metrics/verify_details.json")["sizes"][SIZE]
    assert details["verdict"].startswith("✓ SUCCESS") and details["device"] == "cpu"


def test_an_experiment_per_policy_is_judged_by_that_policy_s_own_threshold(repo):
    good = repo.params()
    params = yaml.safe_load(yaml.safe_dump(good))
    params["verify"]["threshold_pct"] = {"cpu": {"block": 0, "attention": 0, "mlp": 0,
                                                 "selective": 99}, "cuda": 0}
    repo.set_params(params)
    try:
        mlp = repo.run(sys.executable, "-m", "dvc", "exp", "run", "-S",
                       "checkpointing.checkpoint_policy=mlp")
        assert mlp.returncode == 0, mlp.stdout + mlp.stderr
        assert "policy mlp" in mlp.stdout and "VERIFICATION PASSED ✓" in mlp.stdout
        selective = repo.run(sys.executable, "-m", "dvc", "exp", "run", "-S",
                             "checkpointing.checkpoint_policy=selective")
        assert selective.returncode != 0
        assert "is not above the threshold (99%)" in selective.stdout
    finally:
        repo.set_params(good)


def test_figures_from_other_hardware_are_remeasured(repo):
    # as in a clone whose committed figures an H200 measured
    gpu = {"device_name": "NVIDIA H200", "torch_version": "2.11.0+cu130"}
    for name in ("metrics/hardware.json", *RUN_METRICS):
        (repo.path / name).write_text(json.dumps(dict(repo.read(name), **gpu)))
    repo.dvc("commit", "-f", "-q")  # (which saves run-cache entries: this test comes last)
    out = repo.dvc("repro")
    assert "the figures in metrics/ were measured on NVIDIA H200, torch 2.11.0+cu130" in out
    assert ran(out) == {"hardware", *TRAINING, "verify", "report"}
    here = repo.read("metrics/hardware.json")
    assert here["device_name"] != "NVIDIA H200"
    assert all(repo.read(name)["device_name"] == here["device_name"] for name in RUN_METRICS)


def test_a_memory_lever_for_the_checkpointed_run_only_is_refused():
    from neuromanifold_gpt.params import load_params, run_files, training_args

    params = load_params(path=ROOT / "params.yaml")
    params["checkpointing"] = dict(params["checkpointing"], lean_loss=True)
    with pytest.raises(ValueError, match="move lean_loss to train:"):
        training_args(params, "gpt2", "checkpointed", "cpu", run_files("gpt2", "checkpointed"))
