"""Data preparation gives nanoGPT's published counts; the corpus comes from a URL or, offline,
from $NEUROMANIFOLD_CORPUS; bad sources fail with a clear error."""

import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import train
from neuromanifold_gpt import data
from neuromanifold_gpt.errors import BadInput
from tests.conftest import ROOT, one_line_error

OFFLINE_URL = "http://127.0.0.1:9/input.txt"  # nothing listens there: any download fails


def test_shakespeare_char_counts(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "cache"))
    assert data.main(["shakespeare_char", "--source", str(corpus), "--data_dir", str(tmp_path)]) == 0
    out = tmp_path / "shakespeare_char"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 65
    assert len(np.fromfile(out / "train.bin", dtype=np.uint16)) == 1_003_854
    assert len(np.fromfile(out / "val.bin", dtype=np.uint16)) == 111_540
    assert "".join(meta["vocab"][i] for i in np.fromfile(out / "val.bin", dtype=np.uint16)[:5]) == \
        corpus.read_text()[1_003_854:1_003_859]
    # the verified corpus is cached: a later prepare works offline from the canonical URL
    assert data.main(["shakespeare_char", "--data_dir", str(tmp_path / "again")]) == 0


def test_the_environment_variable_hands_a_url_source_a_local_corpus(tmp_path, monkeypatch, small_corpus):
    path, sha256 = small_corpus
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(data.CORPUS_ENV, str(path))
    args = ["shakespeare_char", "--source", OFFLINE_URL, "--sha256", sha256]
    assert data.main(args + ["--data_dir", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "shakespeare_char" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == len(path.read_text())
    # copied into the cache: without the variable, the same source still prepares offline
    monkeypatch.delenv(data.CORPUS_ENV)
    assert data.main(args + ["--data_dir", str(tmp_path / "again")]) == 0


def test_a_wrong_file_in_the_environment_variable_is_named(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "input.txt"
    bad.write_text("not shakespeare")
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(data.CORPUS_ENV, str(bad))
    assert data.main(["shakespeare_char", "--data_dir", str(tmp_path)]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: corpus {data.CORPUS_ENV}={bad} has the wrong sha256")
    assert not (tmp_path / "shakespeare_char").exists()


def test_wrong_checksum_is_refused_and_never_reaches_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "input.txt"
    bad.write_text("not shakespeare")
    assert data.main(["shakespeare_char", "--source", str(bad), "--data_dir", str(tmp_path)]) == 2
    assert "wrong sha256" in one_line_error(capsys)
    assert not (tmp_path / "shakespeare_char" / "train.bin").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_offline_download_names_the_environment_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(data.CORPUS_ENV, raising=False)
    code = data.main(["shakespeare_char", "--source", OFFLINE_URL, "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "could not download" in err
    assert f"set {data.CORPUS_ENV}=/path/to/input.txt" in err
    assert not (tmp_path / "empty-cache").exists()  # a failed write leaves no folder


def test_without_the_corpus_ci_fails_and_a_laptop_skips():
    env = {k: v for k, v in os.environ.items() if k not in (data.CORPUS_ENV, "CI")}
    test = "tests/test_data.py::test_shakespeare_char_counts"

    def pytest_run(**extra):
        return subprocess.run([sys.executable, "-m", "pytest", test, "-rs", "-p", "no:cacheprovider"],
                              cwd=ROOT, env=dict(env, **extra), capture_output=True, text=True)

    laptop, ci = pytest_run(), pytest_run(CI="true")
    assert laptop.returncode == 0 and "1 skipped" in laptop.stdout
    assert ci.returncode == 1 and "1 error" in ci.stdout
    assert f"set {data.CORPUS_ENV}=/path/to/input.txt" in ci.stdout


@pytest.mark.parametrize("dataset, fix", [
    ("{data_dir}/tiny", "pass --data_dir {data_dir} --dataset tiny"),
    ("{data_name}/tiny", "pass --data_dir {data_dir} --dataset tiny"),
    ("/", "give the folder that holds it as --data_dir and its name as --dataset"),
], ids=["absolute", "leads out of data_dir", "the root"])
def test_a_dataset_is_a_name_under_data_dir(dataset, fix, tiny_args, data_dir, tmp_path, capsys):
    here = tmp_path / "here"
    here.mkdir()
    values = dict(data_dir=data_dir, data_name=os.path.relpath(data_dir, here))
    argv = tiny_args + ["--max_iters", "1", "--data_dir", str(here), "--dataset"]
    assert train.main(argv + [dataset.format(**values)]) == 2
    err = one_line_error(capsys)
    assert "is a path, not the name of a folder under data_dir" in err and fix.format(**values) in err
    if "--dataset tiny" in fix:  # the fix it names runs
        assert train.main(tiny_args + ["--max_iters", "1"] + fix.format(**values).split()[1:]) == 0


def test_an_empty_dataset_name_suggests_a_command_that_prepares_one(tiny_args, capsys):
    assert train.main(tiny_args + ["--dataset", ""]) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: dataset is empty")
    command = err.split("prepared by: ")[1].rstrip(")\n").split()
    assert command[:3] == ["python3", "-m", "neuromanifold_gpt.data"]
    argv = command[3:]  # what data.main would parse: a dataset it prepares
    assert argv[0] in data.PREPARERS and argv[1] == "--data_dir"


def test_a_dataset_this_package_cannot_prepare_gets_no_command_that_fails(tiny_args, capsys):
    assert train.main(tiny_args + ["--dataset", "nope"]) == 2
    err = one_line_error(capsys)
    assert "dataset 'nope' is not prepared" in err
    assert "neuromanifold_gpt.data nope" not in err and "train.bin, val.bin and meta.json" in err


@pytest.mark.parametrize("vocab_size, message", [
    (2**40, "vocab_size 1,099,511,627,776, but token ids are uint16: at most 65,536"),
    (2**16 + 1, "vocab_size 65,537, but token ids are uint16"),
    (2**16, None),
])
def test_vocab_size_is_checked_against_the_token_type(vocab_size, message, dataset):
    meta_path = dataset / "tiny" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"vocab_size": vocab_size}))
    if message is None:
        assert data.open_dataset(str(dataset), "tiny", 32)[0]["vocab_size"] == vocab_size
    else:
        with pytest.raises(BadInput, match=re.escape(message)):
            data.open_dataset(str(dataset), "tiny", 32)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested more than 32 deep"),
    ('{"vocab_size": 65, "train_tokens": ' + "9" * 5000 + ', "val_tokens": 2000}',
     "an integer of 5,000 digits"),
], ids=["nested 100000 deep", "a 5000-digit integer"])
def test_a_meta_json_past_the_parsing_bounds_is_one_line(text, message, tiny_args, dataset, capsys):
    meta_path = dataset / "tiny" / "meta.json"
    meta_path.write_text(text)
    assert train.main(tiny_args + ["--data_dir", str(dataset), "--max_iters", "1"]) == 2
    err = one_line_error(capsys)
    assert f"{meta_path} is corrupt ({message})" in err


def test_a_failed_dataset_write_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data.os, "replace", full_disk)
    with pytest.raises(BadInput, match="No space left on device"):
        data.write_dataset(tmp_path / "data" / "shakespeare_char", np.zeros(1000, np.uint16),
                           {"vocab_size": 65})
    assert list(tmp_path.iterdir()) == []
