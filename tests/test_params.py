"""params.yaml is checked whole before any stage runs: each mistake below fails validate()
with one line naming the key, and the hardware stage exits 2 without touching its output."""

import copy
import subprocess
import sys

import pytest
import yaml

from neuromanifold_gpt.config.base import POLICIES
from neuromanifold_gpt.params import DEVICES, load_params, validate, verify_criteria
from tests.conftest import ROOT

PARAMS = load_params(path=ROOT / "params.yaml")


def test_the_shipped_params_are_valid():
    validate(copy.deepcopy(PARAMS))


@pytest.mark.parametrize("device_type", DEVICES)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_shipped_threshold_sits_below_its_expected_range(device_type, policy):
    # a reduction the RESULTS wording calls expected must pass, and one well short of it fail
    for size in PARAMS["sizes"]:
        c = verify_criteria(PARAMS, device_type, size, policy)
        low, high = c["expected_range_pct"]
        assert 0 < c["threshold_pct"] < low < high, (size, c)


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
    "threshold beyond a float": ("verify.threshold_pct", 10**400, "is not a finite number"),
    "threshold infinite": ("verify.threshold_pct", float("inf"), "inf is not a finite number"),
    # below 0, a checkpointed run that used more memory than its baseline would pass
    "negative threshold": ("verify.threshold_pct", {"cpu": 10, "cuda": -50},
                           "verify.threshold_pct for shakespeare_char, policy block, on cuda is "
                           "-50; it must be in [0, 100): a pass needs memory saved"),
    "negative threshold for one policy": (
        "verify.threshold_pct", {"cpu": 10, "cuda": {"block": 20, "attention": 5, "mlp": -1,
                                                     "selective": 5}},
        "threshold_pct for shakespeare_char, policy mlp, on cuda is -1"),
    "threshold no run can pass": ("verify.threshold_pct", 100, "is 100; it must be in [0, 100)"),
    "threshold misses a policy": ("verify.threshold_pct", {"cpu": 10, "cuda": {"block": 20}},
                                  "has no `attention:` entry"),
    "range upside down": ("verify.expected_range_pct", [40, 20],
                          "expected_range_pct for shakespeare_char, policy block, on cpu is "
                          "[40, 20]; write [low, high] with 0 <= low <= high <= 100"),
    "range below 0": ("verify.expected_range_pct", [-10, 20], "is [-10, 20]; write [low, high]"),
    "range not a pair": ("verify.expected_range_pct", [10, 20, 30], "expected_range_pct: [low, high]"),
    "negative tolerance": ("verify.loss_tolerance", -1, "loss_tolerance for shakespeare_char, "
                           "policy block, on cpu is -1; it must be >= 0"),
    "tolerance not finite": ("verify.loss_tolerance", {"cpu": float("nan"), "cuda": 0.1},
                             "nan is not a finite number"),
    "verify names no size": ("verify.threshold_pct",
                             {"cpu": {"shakespeare_char": 1, "gpt2": 1, "gpt2-medium": 1, "gpt3": 1},
                              "cuda": 20}, "verify.threshold_pct names 'gpt3', which is neither"),
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


@pytest.mark.parametrize("text, message", [
    ("- data\n- train\n", "is not a mapping of sections (data:, train:, ...); restore it from git"),
    ("verify:\n  threshold_pct: " + "1" * 5000 + "\n", "holds a number with too many digits"),
    ("verify: " + "[" * 100_000 + "\n", "is nested too deep to be a params file"),
    ("verify: [1\n", "is not valid YAML"),
])
def test_a_params_file_that_is_not_sections_is_one_line(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_params("verify", path=path)
    assert str(e.value).startswith(f"{path} {message}")
    assert "\n" not in str(e.value)


def test_a_list_params_file_is_exit_2_from_the_stage_and_the_verify_script(tmp_path):
    (tmp_path / "params.yaml").write_text("- verify\n- sizes\n")
    line = "error: params.yaml is not a mapping of sections (data:, train:, ...); restore it from git\n"
    stage = subprocess.run([sys.executable, str(ROOT / "stages/hardware.py")], cwd=tmp_path,
                           capture_output=True, text=True)
    assert (stage.returncode, stage.stderr) == (2, line)
    script = subprocess.run([sys.executable, str(ROOT / "verify_gradient_checkpointing.py"),
                             "--params", "params.yaml", "--out", str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True)
    assert (script.returncode, script.stderr) == (2, line)
    assert not (tmp_path / "out").exists()


def test_the_verify_script_refuses_a_negative_threshold_before_training(tmp_path):
    params = copy.deepcopy(PARAMS)
    params["verify"]["threshold_pct"] = -50
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, str(ROOT / "verify_gradient_checkpointing.py"),
                           "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("error: params.yaml verify.threshold_pct for shakespeare_char, policy "
                           "block, on cpu is -50; it must be in [0, 100): a pass needs memory saved\n")
