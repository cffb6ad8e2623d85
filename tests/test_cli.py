"""The nanoGPT-style CLI: overrides, types, and one clear line (exit 2) for every bad input."""

import json
import os
import subprocess
import sys

import pytest

import train
from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.errors import BadInput
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


@pytest.mark.parametrize("text,value", [("auto", None), ("Auto", None), ("none", None), ("true", True),
                                        ("false", False)])
def test_a_switch_left_to_the_machine_is_auto_or_none(text, value, tmp_path):
    assert parse_args(["--cuda_graphs", text]).compile.cuda_graphs is value
    assert parse_args(["--lean_loss", text]).memory_levers.lean_loss is value
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text(f"cuda_graphs = {text!r}\n")
    assert parse_args(["--config", str(cfg_file)]).compile.cuda_graphs is value
    # a count's None is no machine's choice: auto is not one of its words
    with pytest.raises(BadInput, match="checkpoint_layers='auto' on the command line is not valid"):
        parse_args(["--checkpoint_layers", "auto"])


def test_shipped_config_files_parse():
    for name in ("train_shakespeare_char.py", "train_gpt2.py", "train_gpt2_medium.py"):
        parse_args(["--config", str(ROOT / "config" / name)])


BAD = {
    "unknown key": (["--max_iter", "10"], "unknown config key 'max_iter'"),
    "wrong type": (["--gradient_checkpointing", "maybe"], "gradient_checkpointing='maybe' on the command "
                   "line is not valid: expected true/false (also 1/0, yes/no)\n"),  # a plain bool: no auto
    "switch neither set nor auto": (["--cuda_graphs", "sometimes"], "cuda_graphs='sometimes' on the command "
                                    "line is not valid: expected true/false (also 1/0, yes/no) or auto"),
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


def test_a_fifo_given_as_config_is_named_as_such(tmp_path, capsys):
    fifo = tmp_path / "c.py"
    os.mkfifo(fifo)
    assert train.main(["--config", str(fifo)]) == 2
    assert f"config file {fifo} is a FIFO, not a regular file" in one_line_error(capsys)


def test_a_config_file_with_a_byte_order_mark_is_read_as_python_reads_it(tmp_path):
    config = tmp_path / "bom.py"
    config.write_bytes(b"\xef\xbb\xbfmax_iters = 7\n")
    exec(compile(config.read_bytes(), str(config), "exec"), namespace := {})  # Python accepts it
    assert parse_args(["--config", str(config)]).optimizer.max_iters == namespace["max_iters"] == 7


@pytest.mark.parametrize("text, message", [
    ("max_iters = " + "-" * 5000 + "1\n", "nested too deeply to parse"),
    ("max_iters = " + "(" * 5000 + "1" + ")" * 5000 + "\n", "too many nested parentheses"),
    ("# padding\n" * (2**20 // 10 + 1), "more than the 1,048,576"),
], ids=["5000 unary minuses", "5000 parentheses", "over the size limit"])
def test_a_config_file_past_the_parsing_bounds_is_one_line(text, message, tmp_path, capsys):
    config = tmp_path / "c.py"
    config.write_text(text)
    assert train.main(["--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"config file {config}" in err and message in err
