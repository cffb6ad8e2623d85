"""params.yaml is checked whole before any stage runs: each mistake below fails validate()
with one line naming the key, and the hardware stage exits 2 without touching its output."""

import copy
import subprocess
import sys

import pytest
import yaml

from neuromanifold_gpt.params import load_params, validate
from tests.conftest import ROOT

PARAMS = load_params(path=ROOT / "params.yaml")


def test_the_shipped_params_are_valid():
    validate(copy.deepcopy(PARAMS))


BAD = {  # name: (key path, new value or KeyError to delete it, what the error must say)
    "unknown section": ("extra", {}, "(top level) has unknown key 'extra'"),
    "missing section": ("verify", KeyError, "has no `verify:` section"),
    "local corpus key": ("data.local", "input.txt", "set NEUROMANIFOLD_CORPUS="),
    "bad sha256": ("data.sha256", "abc", "data.sha256='abc' must be 64 hex digits"),
    "unknown train key": ("train.bach_size", 4,
                          "unknown config key 'bach_size' in params.yaml train; did you mean batch_size?"),
    "wrong type": ("sizes.gpt2.max_iters", "three", "max_iters='three' in params.yaml sizes.gpt2"),
    "device form without cuda": ("sizes.gpt2.max_iters", {"cpu": 3},
                                 "sizes.gpt2.max_iters is {'cpu': 3}; write a plain value or "
                                 "{cpu: A, cuda: B}"),
    "wrong type on cuda only": ("sizes.gpt2.eval_iters", {"cpu": 1, "cuda": "x"},
                                "eval_iters='x' in params.yaml sizes.gpt2"),
    "missing config file": ("sizes.gpt2.config", "config/nope.py", "config file 'config/nope.py' not found"),
    "TrainConfig refuses": ("sizes.gpt2.n_head", 7,
                            "sizes.gpt2, baseline run on cpu: n_embd=768 is not divisible by n_head=7"),
    "per-run flag": ("train.metrics_file", "m.json", "train.metrics_file is set by the pipeline"),
    "unknown policy": ("checkpointing.checkpoint_policy", "most", "checkpoint_policy='most' is not one of"),
    "checkpointing off": ("checkpointing.gradient_checkpointing", False, "must be true"),
    "bad nproc": ("train.nproc", 0, "train.nproc=0 must be a whole number >= 1"),
    "unknown verify key": ("verify.threshold", 5, "verify has unknown key 'threshold'"),
    "threshold not a number": ("verify.threshold_pct", {"cpu": "ten", "cuda": 20},
                               "'ten' is not a finite number"),
    "range upside down": ("verify.expected_range_pct", [40, 20], "must be [low, high]"),
    "negative tolerance": ("verify.loss_tolerance", -1, "loss_tolerance -1 >= 0"),
    "verify names no size": ("verify.threshold_pct",
                             {"cpu": {"shakespeare_char": 1, "gpt2": 1, "gpt2-medium": 1, "gpt3": 1},
                              "cuda": 20}, "verify.threshold_pct names size 'gpt3'"),
    "verify misses a size": ("verify.threshold_pct", {"cpu": {"gpt2": 1}, "cuda": 20},
                             "no entry for size 'shakespeare_char'"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_mistake_is_named(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the project
    key, value, message = BAD[name]
    params = copy.deepcopy(PARAMS)
    *parents, last = key.split(".")
    section = params
    for parent in parents:
        section = section[parent]
    if value is KeyError:
        del section[last]
    else:
        section[last] = value
    with pytest.raises(ValueError) as e:
        validate(params)
    assert message in str(e.value) and "\n" not in str(e.value)


def _stage_copy(tmp_path, params: dict):
    for name in ("dvc.yaml", "config/train_shakespeare_char.py", "config/train_gpt2.py",
                 "config/train_gpt2_medium.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages/hardware.py")], cwd=tmp_path,
                          capture_output=True, text=True)


def test_the_hardware_stage_describes_this_machine(tmp_path):
    done = _stage_copy(tmp_path, PARAMS)
    assert done.returncode == 0, done.stderr
    hardware = yaml.safe_load((tmp_path / "metrics/hardware.json").read_text())
    assert set(hardware) == {"device", "device_name", "device_count", "torch_version", "cuda_version",
                             "dtype"}
    assert done.stdout.startswith(f"measuring on: {hardware['device_name']}")
    assert "metrics/ holds no figures yet" in done.stdout


def test_the_hardware_stage_refuses_bad_params_with_one_line_and_exit_2(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/hardware.json").write_text("{}\n")
    params = copy.deepcopy(PARAMS)
    params["sizes"]["gpt2"]["batch_size"] = -4
    done = _stage_copy(tmp_path, params)
    assert done.returncode == 2
    assert done.stderr == ("error: params.yaml sizes.gpt2, baseline run on cpu: batch_size=-4 must be > 0\n")
    assert (tmp_path / "metrics/hardware.json").read_text() == "{}\n"
