"""Text sources and token windows for calibration and perplexity.

A source is one of
- ``wiki`` / ``wiki-heldout``: the embedded Wikipedia articles 0-79 / 80-106 (assets.py);
- a ``.txt`` file (one document) or ``.jsonl`` file (one document per line, field ``text``);
- ``hf:<name>[:<config>[:<split>]]``: a ``datasets`` dataset with a ``text`` column (network).
Documents are joined with blank lines and tokenized without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["calibration_windows", "eval_windows", "load_documents", "tokenize_documents"]


class TextTooShortError(ValueError):
    """The text yields fewer tokens than one window needs."""


def load_documents(source: str) -> list[str]:
    """Documents of a text source (see module docstring)."""
    from gift_quant import assets

    if source == "wiki":
        return assets.wiki_split("train")
    if source == "wiki-heldout":
        return assets.wiki_split("heldout")
    if source.startswith("hf:"):
        return _hf_documents(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {source!r} is not a file; use wiki, wiki-heldout, a .txt/.jsonl file "
            f"or hf:<dataset>"
        )
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{n}: expected an object with a "text" string field')
            docs.append(record["text"])
        return docs
    return [path.read_text(encoding="utf-8")]


def _hf_documents(source: str) -> list[str]:
    parts = source[3:].split(":")
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 and parts[1] else None),
        (parts[2] if len(parts) > 2 else "train"),
    )
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("hf: text sources need the [data] extra: pip install datasets") from exc
    ds = datasets.load_dataset(name, config, split=split)
    if "text" not in ds.column_names:
        raise ValueError(f"{source}: dataset has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t]


def tokenize_documents(tokenizer, docs: list[str]) -> Tensor:
    """One long int64 token stream of the documents joined with blank lines."""
    text = "\n\n".join(d for d in docs if d)
    max_len = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # silence "sequence longer than" warnings
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        tokenizer.model_max_length = max_len
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(tokens: Tensor, num_samples: int, seq_len: int, seed: int) -> Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets: [n, L] int64."""
    if tokens.numel() < seq_len + 1:
        raise TextTooShortError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one window of "
            f"{seq_len}; give more text or a smaller calib.seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: Tensor, seq_len: int, max_tokens: int = 0) -> Tensor:
    """Non-overlapping windows of ``seq_len`` tokens: [n, L] int64 (a ragged tail is dropped)."""
    if max_tokens:
        tokens = tokens[:max_tokens]
    n = tokens.numel() // seq_len
    if n == 0:
        raise TextTooShortError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one window of "
            f"{seq_len}; give more text or a smaller --seq-len"
        )
    return tokens[: n * seq_len].reshape(n, seq_len)
