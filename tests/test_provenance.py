"""Provenance: verify refuses to pair runs that other training code, hardware or torch
measured (a params-only change still pairs); the training-code hash follows dvc.yaml's
training deps and nothing else; commit and dirty flag come from git, and are None outside it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from neuromanifold_gpt import provenance
from neuromanifold_gpt.verify import compare
from tests.conftest import ROOT
from tests.test_verify import CUDA as CRITERIA
from tests.test_verify import run

CODE = {"code_hash": "a" * 64}


@pytest.mark.parametrize("key, other, what", [
    ("code_hash", "b" * 64, "different training code"),
    ("device_name", "cpu (AMD EPYC, x86_64, 2 threads)", "different hardware"),
    ("torch_version", "2.13.0+cpu", "different torch"),
])
def test_verify_refuses_runs_of_other_code_hardware_or_torch(key, other, what):
    baseline, optimized = run(12.0, False, **CODE), run(8.0, True, **(CODE | {key: other}))
    with pytest.raises(ValueError) as e:
        compare("gpt2", baseline, optimized, CRITERIA)
    assert str(e.value) == (f"the two runs of gpt2 were measured with {what} "
                            f"({key} {getattr(baseline, key)} vs "
                            f"{other}); re-measure both: dvc repro --force")


def test_a_params_only_change_still_compares():
    result = compare("gpt2", run(12.0, False, **CODE), run(8.0, True, policy="mlp", **CODE), CRITERIA)
    assert result.passed and result.reduction_pct == pytest.approx(100 / 3)


@pytest.fixture
def checkout(tmp_path):
    """A copy of the package in a fresh directory, beside a file that is not its code."""
    shutil.copytree(ROOT / "neuromanifold_gpt", tmp_path / "neuromanifold_gpt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "README.md").write_text("readme\n")
    return tmp_path


def test_the_code_hash_covers_the_package_only(checkout):
    package = checkout / "neuromanifold_gpt"
    names = {p.relative_to(package).as_posix() for p in provenance.code_files(package)}
    assert {"trainer.py", "model/block.py", "config/base.py", "plan_costs.json"} <= names
    assert not [n for n in names if "__pycache__" in n]
    before = provenance.code_hash(package)
    assert before == provenance.code_hash()  # the same files, wherever they sit
    (checkout / "README.md").write_text("other\n")  # not the package's
    (package / "model/__pycache__").mkdir()
    (package / "model/__pycache__/block.cpython-311.pyc").write_bytes(b"\0")
    assert provenance.code_hash(package) == before
    block = package / "model/block.py"
    block.write_text(block.read_text() + "\n")
    assert provenance.code_hash(package) != before


def test_commit_and_dirty_flag_come_from_git_and_are_none_outside_it(checkout):
    cpu = torch.device("cpu")
    package = checkout / "neuromanifold_gpt"
    outside = provenance.run_provenance(cpu, package)
    assert outside["git_commit"] is None and outside["git_dirty"] is None
    assert outside["code_hash"] == provenance.code_hash(package) and outside["cuda_version"] is None

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=checkout,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "code")
    clean = provenance.run_provenance(cpu, package)
    assert clean["git_commit"] == git("rev-parse", "HEAD") and clean["git_dirty"] is False
    (checkout / "README.md").write_text("edited\n")  # not the package: still clean
    assert provenance.run_provenance(cpu, package)["git_dirty"] is False
    trainer = package / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n")
    assert provenance.run_provenance(cpu, package)["git_dirty"] is True


def test_every_file_a_training_run_reads_is_a_dep_of_the_training_stages():
    """What stages/train.py and train.py import from this checkout, and the planner's cost
    table, are all training deps in dvc.yaml: a change to any of them re-measures."""
    probe = ("import json, runpy, sys; runpy.run_path('stages/train.py'); import train; "
             "from neuromanifold_gpt.planner import COSTS_FILE; "
             "print(json.dumps([str(COSTS_FILE)] + [m.__file__ for m in list(sys.modules.values()) "
             "if getattr(m, '__file__', None)]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    read = {Path(f).resolve() for f in json.loads(out)}
    ours = {f for f in read if ROOT in f.parents and f.is_file() and "site-packages" not in f.parts}
    assert Path(ROOT / "neuromanifold_gpt/trainer.py") in ours  # the probe saw the package
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = [ROOT / d for d in stages["train_baseline"]["do"]["deps"] if "${" not in d]
    listed = {f for d in deps for f in ([*d.rglob("*")] if d.is_dir() else [d])}
    assert sorted(f.relative_to(ROOT).as_posix() for f in ours - listed) == []
