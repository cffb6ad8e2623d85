"""Data preparation gives nanoGPT's published counts; the corpus comes from a URL or, offline,
from $NEUROMANIFOLD_CORPUS; bad sources fail with a clear error."""

import json
import os
import subprocess
import sys

import numpy as np

from neuromanifold_gpt import data
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
