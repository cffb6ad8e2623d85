"""Datasets: the tiny shakespeare corpus, prepared as nanoGPT prepares it (train.bin and
val.bin of uint16 token ids, the text split 90/10, plus meta.json), and a memmap batch loader.
Metadata is JSON (ints and the vocabulary): a dataset folder never runs code when read.

    python3 -m neuromanifold_gpt.data shakespeare_char
    NEUROMANIFOLD_CORPUS=/path/to/input.txt python3 -m neuromanifold_gpt.data shakespeare  # offline

`shakespeare_char` has one token per character (vocab 65); `shakespeare` the GPT-2 BPE
(tiktoken `gpt2`, vocab 50,257), loaded offline from verified files (see tokenizer.py).

The raw corpus comes from a URL, or offline from the local file that the environment
variable NEUROMANIFOLD_CORPUS names (so it reaches `dvc repro` too). It is verified by sha256
and kept in a cache (NEUROMANIFOLD_CACHE, default ~/.cache/neuromanifold_gpt), so a later
prepare finds it offline."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput, entry_point
from .files import atomic_path, cache_dir, check_output, new_folder, parse_json, sha256_of

CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_ENV = "NEUROMANIFOLD_CORPUS"  # a local input.txt, used instead of a URL source
META = "meta.json"
TOKEN = np.uint16  # train.bin and val.bin hold token ids of this type
MAX_VOCAB = int(np.iinfo(TOKEN).max) + 1


def cached_corpus(sha256: str = CORPUS_SHA256) -> Path:
    """Where fetch_corpus keeps the verified corpus."""
    return cache_dir() / f"tinyshakespeare-{sha256[:12]}.txt"


def fetch_corpus(source: str = CORPUS_URL, sha256: str = CORPUS_SHA256) -> str:
    """The corpus text from a local path, or for a URL from $NEUROMANIFOLD_CORPUS when set,
    else the cache, else a download; checked against sha256."""
    cached = cached_corpus(sha256)
    is_url = source.startswith(("http://", "https://"))
    local, named = (os.environ.get(CORPUS_ENV), f"{CORPUS_ENV}=") if is_url else (source, "")
    if local:
        path = Path(local)
        if not path.is_file():
            raise BadInput(f"corpus {named}{local} not found; give the path of tiny "
                             f"shakespeare's input.txt")
        if sha256_of(path) != sha256:
            raise BadInput(f"corpus {named}{local} has the wrong sha256 (expected {sha256}); it "
                             f"is not tiny shakespeare's input.txt or it is damaged")
        with atomic_path(cached) as tmp:
            shutil.copyfile(path, tmp)
    elif not (cached.is_file() and sha256_of(cached) == sha256):
        with atomic_path(cached) as tmp:  # the cache gets the file only once it is verified
            try:
                with urllib.request.urlopen(source, timeout=30) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise BadInput(f"could not download {source} ({e}); offline, set "
                                 f"{CORPUS_ENV}=/path/to/input.txt (a local copy; sha256 "
                                 f"{sha256[:12]}...) and run again") from None
            if sha256_of(tmp) != sha256:
                raise BadInput(f"download of {source} has the wrong sha256 (expected {sha256})")
    return cached.read_text(encoding="utf-8")


def split_text(text: str) -> tuple[str, str]:
    """The first 90% of the characters for training, the rest for validation."""
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def write_dataset(out_dir: Path, ids: np.ndarray, meta: dict) -> dict:
    """Split ids 90/10 into train.bin/val.bin (uint16) and write meta.json; all-or-nothing."""
    n = int(len(ids) * 0.9)
    return write_splits(out_dir, ids[:n], ids[n:], meta)


def write_splits(out_dir: Path, train: np.ndarray, val: np.ndarray, meta: dict) -> dict:
    """Write train.bin/val.bin (uint16) and meta.json; all-or-nothing. A meta.pkl of an older
    prepare is removed: it is never read."""
    meta = dict(meta, train_tokens=len(train), val_tokens=len(val))
    for name in ("train.bin", "val.bin", META):
        check_output(out_dir / name, "dataset file")
    with new_folder(out_dir):
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
        try:
            train.astype(TOKEN).tofile(tmp / "train.bin")
            val.astype(TOKEN).tofile(tmp / "val.bin")
            (tmp / META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            for name in ("train.bin", "val.bin", META):
                os.replace(tmp / name, out_dir / name)
        except OSError as e:
            raise BadInput(f"could not write the dataset to {out_dir} ({e.strerror or e}); free "
                             f"some space or choose another --data_dir") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (out_dir / "meta.pkl").unlink(missing_ok=True)
    return meta


def prepare_shakespeare_char(out_dir: Path, source: str = CORPUS_URL,
                             sha256: str = CORPUS_SHA256) -> dict:
    text = fetch_corpus(source, sha256)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=TOKEN)
    return write_dataset(out_dir, ids, dict(vocab_size=len(chars), vocab="".join(chars)))


def prepare_shakespeare(out_dir: Path, source: str = CORPUS_URL, sha256: str = CORPUS_SHA256) -> dict:
    """GPT-2 BPE, each split encoded on its own as nanoGPT does (train 301,966, val 36,059)."""
    from .tokenizer import gpt2_encoding  # tiktoken only for the BPE dataset

    enc = gpt2_encoding()
    train, val = (np.array(enc.encode_ordinary(part), dtype=TOKEN)
                  for part in split_text(fetch_corpus(source, sha256)))
    return write_splits(out_dir, train, val, dict(vocab_size=enc.n_vocab, encoding=enc.name))


PREPARERS = {"shakespeare_char": prepare_shakespeare_char, "shakespeare": prepare_shakespeare}


def _how_to_prepare(data_dir: str, dataset: str) -> str:
    """What makes a dataset (again): the command, where this package prepares it."""
    if dataset in PREPARERS:
        return (f"run: python3 -m neuromanifold_gpt.data {dataset} --data_dir "
                f"{shlex.quote(data_dir)} (or dvc repro)")
    return (f"write train.bin, val.bin and {META} into {Path(data_dir) / dataset} as they were "
            f"made (python3 -m neuromanifold_gpt.data prepares {' and '.join(sorted(PREPARERS))})")


def dataset_folder(data_dir: str, dataset: str) -> Path:
    """data_dir/dataset. A dataset is the name of a folder under data_dir: a path (absolute, or
    one that leads elsewhere) is refused, so that a run reads only what data_dir holds."""
    if dataset and dataset not in (".", "..") and Path(dataset).name == dataset:
        return Path(data_dir) / dataset
    if not dataset:
        raise BadInput(f"dataset is empty; name a dataset folder under --data_dir "
                         f"{shlex.quote(data_dir)}, e.g. --dataset shakespeare_char (prepared "
                         f"by: python3 -m neuromanifold_gpt.data shakespeare_char --data_dir "
                         f"{shlex.quote(data_dir)})")
    parent, name = os.path.split(os.path.normpath(os.path.join(data_dir, dataset)))
    fix = ("give the folder that holds it as --data_dir and its name as --dataset"
           if name in ("", ".", "..") else
           f"pass --data_dir {shlex.quote(parent or '.')} --dataset {shlex.quote(name)}")
    raise BadInput(f"dataset {dataset!r} is a path, not the name of a folder under data_dir "
                     f"({data_dir}); {fix}")


def open_dataset(data_dir: str, dataset: str, block_size: int) -> tuple[dict, dict[str, int]]:
    """The dataset's metadata and tokens per split, checked: a name under data_dir, meta.json
    readable, vocab_size within the token type, each .bin the size it records, every token id
    below vocab_size, every split longer than a block."""
    folder = dataset_folder(data_dir, dataset)
    meta_path = folder / META
    again = f"prepare the dataset again: {_how_to_prepare(data_dir, dataset)}"
    if not meta_path.is_file():
        if (folder / "meta.pkl").is_file():  # never unpickled: a pickle can run code
            raise BadInput(f"{folder} holds meta.pkl, an old metadata format that is not read "
                             f"(a pickle can run code); {again}")
        raise BadInput(f"dataset {dataset!r} is not prepared ({meta_path} is missing); "
                         f"{_how_to_prepare(data_dir, dataset)}")
    meta = parse_json(meta_path, "dataset metadata", again)
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        value = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"dataset metadata {meta_path} is corrupt ({key} is {value!r}, not a "
                             f"positive integer); {again}")
    vocab_size = meta["vocab_size"]
    counts = {split: meta[f"{split}_tokens"] for split in ("train", "val")}
    if vocab_size > MAX_VOCAB:
        raise BadInput(f"dataset metadata {meta_path} is corrupt (vocab_size {vocab_size:,}, but "
                         f"token ids are {np.dtype(TOKEN).name}: at most {MAX_VOCAB:,}); {again}")
    for split, expected in counts.items():
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else -1
        if size != TOKEN().itemsize * expected:
            state = "missing" if size < 0 else f"{size} bytes, expected {TOKEN().itemsize * expected}"
            raise BadInput(f"{path} is {state}; {again}")
        if expected <= block_size:
            raise BadInput(f"block_size={block_size} is too large for {path} "
                             f"({expected} tokens); use --block_size {expected - 1} or less")
        # one pass over the memmap, cheap beside training: an id past the vocabulary would
        # otherwise fail deep inside the embedding
        top = int(np.memmap(path, dtype=TOKEN, mode="r").max())
        if top >= vocab_size:
            raise BadInput(f"{path} holds token id {top}, but {meta_path} says vocab_size "
                             f"{vocab_size}; {again}")
    return meta, counts


class BatchLoader:
    """Random (B, T) windows from train.bin/val.bin, drawn from its own seeded generator
    (so the data order is reproducible and can be saved in a snapshot)."""

    def __init__(self, data_dir: str, dataset: str, batch_size: int, block_size: int,
                 device: torch.device, seed: int):
        self.batch_size, self.block_size, self.device = batch_size, block_size, device
        self.meta, self.tokens = open_dataset(data_dir, dataset, block_size)
        self.dir = dataset_folder(data_dir, dataset)
        self.vocab_size = self.meta["vocab_size"]
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self, split: str):
        # a fresh memmap per batch, as nanoGPT does: a long-lived one keeps growing in memory
        data = np.memmap(self.dir / f"{split}.bin", dtype=TOKEN, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=self.generator)
        x = torch.stack([torch.from_numpy(data[i: i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1: i + 1 + self.block_size].astype(np.int64))
                         for i in ix])
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x, y


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(PREPARERS))
    parser.add_argument("--source", default=CORPUS_URL, help="URL or local path of input.txt")
    parser.add_argument("--sha256", default=CORPUS_SHA256)
    parser.add_argument("--data_dir", default="data")
    args = parser.parse_args(argv)
    out = Path(args.data_dir) / args.dataset
    check_output(out / META, "dataset file")  # before the corpus is fetched and encoded
    meta = PREPARERS[args.dataset](out, args.source, args.sha256)
    print(f"{out}: vocab size {meta['vocab_size']:,}, train has {meta['train_tokens']:,} tokens, "
          f"val has {meta['val_tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
