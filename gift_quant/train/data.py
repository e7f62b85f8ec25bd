"""Training batches for recovery fine-tuning: plain-text windows and chat examples.

Both datasets are indexable by a global batch counter, so a run resumed at step s reads exactly
the batches the uninterrupted run would have read (no iterator state to save). Epochs are
shuffled with ``seed + epoch``.

- Plain text: non-overlapping windows of ``seq_len`` tokens; the loss covers every token.
- Chat JSONL (records with ``messages`` [{role, content}, ...] or ``prompt``/``response`` and an
  optional ``system``): rendered with the tokenizer's chat template; the loss covers assistant
  tokens only; examples are truncated/padded to ``seq_len`` with matching attention masks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.data import TextTooShortError, load_documents, tokenize_documents

__all__ = ["ChatExamples", "TextWindows", "TrainBatch", "build_train_data"]

IGNORE = -100


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, L] int64
    labels: Tensor  # [B, L] int64, IGNORE where no loss
    attention_mask: Tensor  # [B, L] int64

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


class _Shuffled:
    """Rows of a fixed [n, L] table in a seeded order, epoch after epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._orders = n, seed, {}

    def row(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch not in self._orders:  # keep only the current epoch's order
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(self.n, generator=gen)}
        return int(self._orders[epoch][j])


class TextWindows:
    def __init__(self, tokens: Tensor, seq_len: int, seed: int) -> None:
        n = tokens.numel() // seq_len
        if n == 0:
            raise TextTooShortError(
                f"the training text has {tokens.numel()} tokens, fewer than one window of "
                f"{seq_len}; give more text or a smaller train.seq_len"
            )
        self.windows = tokens[: n * seq_len].reshape(n, seq_len)
        self.order = _Shuffled(n, seed)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def batch(self, index: int, batch_size: int) -> TrainBatch:
        rows = [self.order.row(index * batch_size + b) for b in range(batch_size)]
        ids = self.windows[rows]
        return TrainBatch(ids, ids.clone(), torch.ones_like(ids))


class ChatExamples:
    def __init__(self, records: list[dict], tokenizer, seq_len: int, seed: int) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat data needs a tokenizer with a chat template")
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        rows_ids, rows_labels, rows_mask = [], [], []
        for n, rec in enumerate(records, 1):
            ids, labels = _render(tokenizer, _messages(rec, n))
            ids, labels = ids[:seq_len], labels[:seq_len]
            if not any(lab != IGNORE for lab in labels[1:]):
                continue  # nothing to learn after truncation
            fill = seq_len - len(ids)
            rows_ids.append(ids + [pad] * fill)
            rows_labels.append(labels + [IGNORE] * fill)
            rows_mask.append([1] * len(ids) + [0] * fill)
        if not rows_ids:
            raise ValueError("no chat example has assistant tokens within train.seq_len")
        self.ids = torch.tensor(rows_ids)
        self.labels = torch.tensor(rows_labels)
        self.mask = torch.tensor(rows_mask)
        self.order = _Shuffled(len(rows_ids), seed)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, index: int, batch_size: int) -> TrainBatch:
        rows = [self.order.row(index * batch_size + b) for b in range(batch_size)]
        return TrainBatch(self.ids[rows], self.labels[rows], self.mask[rows])


PROMPT_KEYS = ("prompt", "question", "instruction")  # Alpaca / OpenOrca spellings
RESPONSE_KEYS = ("response", "output", "answer")
SYSTEM_KEYS = ("system", "system_prompt")


def _field(rec: dict, keys: tuple[str, ...]):
    return next((rec[k] for k in keys if rec.get(k) is not None), None)


def is_chat_record(rec: dict) -> bool:
    return "messages" in rec or (
        _field(rec, PROMPT_KEYS) is not None and _field(rec, RESPONSE_KEYS) is not None
    )


def _messages(rec: dict, n: int) -> list[dict]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ValueError(f"record {n}: 'messages' must be a list of {{role, content}} objects")
        return [{"role": m["role"], "content": m.get("content", "")} for m in msgs]
    prompt, response = _field(rec, PROMPT_KEYS), _field(rec, RESPONSE_KEYS)
    if prompt is not None and response is not None:
        system = _field(rec, SYSTEM_KEYS)
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
    raise ValueError(f"record {n}: expected 'messages', or a prompt and a response field")


def _render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and labels that keep only assistant turns.

    An assistant turn's tokens are those between the rendering of the conversation up to
    it with a generation prompt and the rendering that includes it (chat templates render
    prefixes stably)."""

    def ids_of(msgs, gen_prompt):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt)
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict); 4.x a plain list
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    ids = ids_of(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(ids_of(messages[:i], True)) if i else 0
        end = len(ids_of(messages[: i + 1], False))
        labels[start:end] = ids[start:end]
    return ids, labels


def _records(source: str) -> list[dict] | None:
    """Records of a .jsonl file or an hf: dataset, or None for plain-text sources."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if source.startswith("hf:"):
        from gift_quant.data import hf_dataset

        return list(hf_dataset(source))
    return None


def build_train_data(source: str, tokenizer, seq_len: int, seed: int):
    """Chat examples when the source's records are chats (messages, prompt/response,
    question/response...), else plain-text windows."""
    records = _records(source)
    if records and is_chat_record(records[0]):
        return ChatExamples(records, tokenizer, seq_len, seed)
    return TextWindows(tokenize_documents(tokenizer, load_documents(source)), seq_len, seed)
