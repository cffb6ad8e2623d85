"""Data preparation gives nanoGPT's published counts; bad sources fail with a clear error."""

import json

import numpy as np
import pytest

from neuromanifold_gpt import data
from tests.conftest import CORPUS

needs_corpus = pytest.mark.skipif(not CORPUS.is_file(), reason=f"tiny shakespeare not at {CORPUS}")


@needs_corpus
def test_shakespeare_char_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "cache"))
    assert data.main(["shakespeare_char", "--source", str(CORPUS), "--data_dir", str(tmp_path)]) == 0
    out = tmp_path / "shakespeare_char"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 65
    assert len(np.fromfile(out / "train.bin", dtype=np.uint16)) == 1_003_854
    assert len(np.fromfile(out / "val.bin", dtype=np.uint16)) == 111_540
    assert "".join(meta["vocab"][i] for i in np.fromfile(out / "val.bin", dtype=np.uint16)[:5]) == \
        CORPUS.read_text()[1_003_854:1_003_859]
    # the verified corpus is cached: a later prepare works offline from the canonical URL
    assert data.main(["shakespeare_char", "--data_dir", str(tmp_path / "again")]) == 0


def test_wrong_checksum_is_refused(tmp_path, capsys):
    bad = tmp_path / "input.txt"
    bad.write_text("not shakespeare")
    assert data.main(["shakespeare_char", "--source", str(bad), "--data_dir", str(tmp_path)]) == 2
    assert "wrong sha256" in capsys.readouterr().err
    assert not (tmp_path / "shakespeare_char" / "train.bin").exists()


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "empty-cache"))
    code = data.main(["shakespeare_char", "--source", "http://127.0.0.1:9/input.txt",
                      "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "could not download" in err and "--source" in err
    assert str(tmp_path / "empty-cache") in err
