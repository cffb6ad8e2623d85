"""The nanoGPT-style CLI: overrides, types, and one clear line (exit 2) for every bad input."""

import json
import subprocess
import sys

import pytest

import train
from neuromanifold_gpt.config.cli import parse_args
from tests.conftest import ROOT, one_line_error


def test_overrides_config_file_then_command_line(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text('"""doc"""\nmax_iters = 7\nlearning_rate = 3e-4\ncompile = False\n')
    cfg = parse_args(["--config", str(cfg_file), "--max_iters=9", "--gradient_checkpointing", "yes",
                      "--checkpoint_policy", "mlp", "--checkpoint_layers", "None"])
    assert (cfg.optimizer.max_iters, cfg.optimizer.learning_rate, cfg.compile.enable) == (9, 3e-4, False)
    ac = cfg.activation_checkpoint
    assert cfg.gradient_checkpointing is True and ac.checkpoint_policy == "mlp"
    assert ac.checkpoint_layers is None
    mc = cfg.model_config(vocab_size=65)
    assert mc.gradient_checkpointing  # passed to the model


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("no", False), ("0", False)])
def test_boolean_spellings(text, value):
    assert parse_args(["--gradient_checkpointing", text]).gradient_checkpointing is value


def test_shipped_config_files_parse():
    for name in ("train_shakespeare_char.py", "train_gpt2.py", "train_gpt2_medium.py"):
        parse_args(["--config", str(ROOT / "config" / name)])


BAD = {
    "unknown key": (["--max_iter", "10"], "unknown config key 'max_iter'"),
    "wrong type": (["--gradient_checkpointing", "maybe"], "gradient_checkpointing='maybe'"),
    "unknown policy": (["--checkpoint_policy", "everything"], "checkpoint_policy='everything'"),
    "indivisible width": (["--n_embd", "100", "--n_head", "6"], "not divisible by n_head"),
    "missing config file": (["--config", "config/nope.py"], "config file 'config/nope.py' not found"),
    "missing value": (["--max_iters"], "--max_iters needs a value"),
    "huge block": (["--block_size", "100000"], "too large"),
    "bad device": (["--device", "cuda:x"], "device='cuda:x'"),
    "float16 without loss scaling": (["--dtype", "float16"], "dtype='float16'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_one_line_exit_2(case, tiny_args, tmp_path, capsys):
    argv, message = BAD[case]
    metrics = tmp_path / "m.json"
    code = train.main(tiny_args + ["--metrics_file", str(metrics)] + argv)
    err = one_line_error(capsys)
    assert code == 2
    assert message in err
    assert not metrics.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "meta without counts"])
def test_missing_or_truncated_dataset(damage, tiny_args, dataset, tmp_path, capsys):
    train_bin = dataset / "tiny" / "train.bin"
    if damage == "missing":
        train_bin.unlink()
    elif damage == "meta without counts":
        (dataset / "tiny" / "meta.json").write_text(json.dumps({"vocab_size": 65}))
    else:
        train_bin.write_bytes(train_bin.read_bytes()[:1000])
    code = train.main(tiny_args + ["--data_dir", str(dataset), "--metrics_file", str(tmp_path / "m.json")])
    err = one_line_error(capsys)
    assert code == 2 and "prepare the dataset again" in err
    assert not (tmp_path / "m.json").exists()


def test_real_process_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, "train.py", "--gradient_checkpointing", "maybe"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
