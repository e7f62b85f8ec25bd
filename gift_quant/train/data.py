"""Training batches for recovery fine-tuning: plain-text windows, chat examples, and text
sampled from the full-precision model.

Every dataset is indexable by a global batch counter, so a run resumed at step s reads exactly
the batches the uninterrupted run would have read (no iterator state to save). Epochs are
shuffled with ``seed + epoch``.

- Plain text: non-overlapping windows of ``seq_len`` tokens (BOS + seq_len-1 text tokens when
  the tokenizer adds BOS, see ``gift_quant.data.bos_token_id``); the loss covers every token.
- Chat records (a .jsonl file or an ``hf:`` dataset; ``messages`` [{role, content}, ...] or
  ``prompt``/``question`` and ``response`` with an optional ``system``/``system_prompt``):
  rendered with the tokenizer's chat template; the loss covers assistant tokens only; examples
  are truncated/padded to ``seq_len`` with matching attention masks.
- ``generated:N`` (data-free, as in LLM-QAT): N sequences sampled from the full-precision model
  before it is quantized (:func:`resolve_generated`), cached on disk under a key of the model's
  weights and the sampling settings, so a rerun (or another run on the same model) reuses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from gift_quant.config import RecipeError
from gift_quant.data import (
    CHARS_PER_TOKEN,
    PROMPT_KEYS,
    RESPONSE_KEYS,
    SYSTEM_KEYS,
    TextTooShortError,
    bos_token_id,
    field_of,
    hf_records,
    load_documents,
    read_jsonl,
    tokenize_documents,
)
from gift_quant.files import follow_umask

log = logging.getLogger(__name__)

__all__ = [
    "ChatExamples",
    "TextWindows",
    "TrainBatch",
    "build_train_data",
    "check_train_file",
    "generate_sequences",
    "resolve_generated",
]

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
    """Fixed [n, L] rows of token ids, the loss on every token after the first ``no_loss``."""

    def __init__(self, windows: Tensor, seed: int, no_loss: int = 0) -> None:
        self.windows, self.no_loss = windows, no_loss
        self.order = _Shuffled(windows.shape[0], seed)

    @classmethod
    def from_tokens(cls, tokens: Tensor, seq_len: int, seed: int, bos: int | None = None):
        """Non-overlapping windows of a token stream (BOS + seq_len-1 text tokens with bos)."""
        text_len = seq_len - (bos is not None)
        n = tokens.numel() // text_len if text_len > 0 else 0
        if n == 0:
            raise TextTooShortError(
                f"the training text has {tokens.numel()} tokens, fewer than one window of "
                f"{seq_len}; give more text or a smaller train.seq_len"
            )
        windows = tokens[: n * text_len].reshape(n, text_len)
        if bos is not None:
            windows = torch.cat([torch.full((n, 1), bos, dtype=windows.dtype), windows], dim=1)
        return cls(windows, seed)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def batch(self, index: int, batch_size: int) -> TrainBatch:
        rows = [self.order.row(index * batch_size + b) for b in range(batch_size)]
        ids = self.windows[rows]
        labels = ids.clone()
        labels[:, : self.no_loss] = IGNORE
        return TrainBatch(ids, labels, torch.ones_like(ids))


class ChatExamples:
    """Chat records rendered with the tokenizer's template; loss on assistant tokens only.

    ``bos``: the template's own BOS is kept ("auto"), ensured ("always") or removed ("never").
    """

    def __init__(
        self, records: list[dict], tokenizer, seq_len: int, seed: int, bos: str = "auto"
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise RecipeError(
                "chat data needs a tokenizer with a chat template; use plain-text data"
            )
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        rows_ids, rows_labels, rows_mask = [], [], []
        for n, rec in enumerate(records, 1):
            ids, labels = _bos_convention(*_render(tokenizer, _messages(rec, n)), tokenizer, bos)
            ids, labels = ids[:seq_len], labels[:seq_len]
            if not any(lab != IGNORE for lab in labels[1:]):
                continue  # nothing to learn after truncation
            fill = seq_len - len(ids)
            rows_ids.append(ids + [pad] * fill)
            rows_labels.append(labels + [IGNORE] * fill)
            rows_mask.append([1] * len(ids) + [0] * fill)
        if not rows_ids:
            raise RecipeError(
                "no chat example has assistant tokens within train.seq_len; raise train.seq_len"
            )
        self.ids = torch.tensor(rows_ids)
        self.labels = torch.tensor(rows_labels)
        self.mask = torch.tensor(rows_mask)
        self.order = _Shuffled(len(rows_ids), seed)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, index: int, batch_size: int) -> TrainBatch:
        rows = [self.order.row(index * batch_size + b) for b in range(batch_size)]
        return TrainBatch(self.ids[rows], self.labels[rows], self.mask[rows])


def _bos_convention(ids: list[int], labels: list[int], tokenizer, mode: str):
    """A rendered chat with BOS first ("always"), without it ("never"), or as rendered."""
    if mode == "always":
        bos = bos_token_id(tokenizer, mode)  # raises when the tokenizer has none
        if not ids or ids[0] != bos:
            return [bos, *ids], [IGNORE, *labels]
    if mode == "never" and ids and tokenizer.bos_token_id is not None:
        if ids[0] == tokenizer.bos_token_id:
            return ids[1:], labels[1:]
    return ids, labels


def is_chat_record(rec: dict) -> bool:
    return "messages" in rec or (
        field_of(rec, PROMPT_KEYS) is not None and field_of(rec, RESPONSE_KEYS) is not None
    )


def _messages(rec: dict, n: int) -> list[dict]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise RecipeError(f"record {n}: 'messages' must be a list of {{role, content}} objects")
        return [{"role": m["role"], "content": m.get("content", "")} for m in msgs]
    prompt, response = field_of(rec, PROMPT_KEYS), field_of(rec, RESPONSE_KEYS)
    if prompt is not None and response is not None:
        system = field_of(rec, SYSTEM_KEYS)
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
    raise RecipeError(f"record {n}: expected 'messages', or a prompt and a response field")


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


def _chat_records(source: str, limit: int) -> list[dict] | None:
    """The records of a .jsonl file or an hf: dataset (the first ``limit`` of a streamed one)
    when they are chats, else None (plain text: the caller reads documents)."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        records = read_jsonl(path)
        return records if records and is_chat_record(records[0]) else None
    if source.startswith("hf:"):
        first = next(hf_records(source, 1), None)  # peek: a text set is read as documents
        if first is not None and is_chat_record(first):
            return list(hf_records(source, limit))
    return None


def build_train_data(
    source: str, tokenizer, seq_len: int, seed: int, *, bos: str = "auto", max_examples: int = 0
):
    """Chat examples when the source's records are chats (messages, prompt/response,
    question/response...), else plain-text windows; or the rows of a generated-text cache
    directory (what :func:`resolve_generated` puts in ``train.data``).

    ``max_examples`` > 0 bounds what is read from a streamed ``hf:`` set (the examples the
    run can use: steps x batch_size x grad_accum)."""
    if source.startswith("generated:"):
        raise RecipeError(
            f"train.data={source!r} is sampled from the FP model before quantization; "
            f"call gift_quant.train.data.resolve_generated first (recover does)"
        )
    if (Path(source) / GENERATED_SETTINGS).is_file():
        return _load_generated(Path(source), seed)
    limit = max_examples if source.startswith("hf:") else 0
    records = _chat_records(source, limit)
    if records:
        return ChatExamples(records, tokenizer, seq_len, seed, bos)
    max_chars = limit * seq_len * CHARS_PER_TOKEN
    docs = load_documents(source, max_chars=max_chars)
    return TextWindows.from_tokens(
        tokenize_documents(tokenizer, docs), seq_len, seed, bos_token_id(tokenizer, bos)
    )


def check_train_file(cfg, tokenizer) -> None:
    """A local training file (``train.data``) that holds at least one window or chat example,
    checked before the quantization stage, which would otherwise run first; the training
    stage reads the file again."""
    if cfg.method == "none" or cfg.steps == 0 or not Path(cfg.data).expanduser().is_file():
        return
    build_train_data(cfg.data, tokenizer, cfg.seq_len, cfg.seed, bos=cfg.bos)


# -- data-free training text sampled from the FP model ------------------------------------------

GENERATED_SETTINGS = "generated.json"
GENERATED_TOKENS = "tokens.safetensors"
PROMPT_TOKENS = "prompt_tokens"  # settings key: leading tokens not sampled (no loss on them)


def _model_digest(model) -> str:
    """A cheap digest of a model: its config and 4096 evenly spaced values of every tensor
    (enough to tell checkpoints apart without hashing gigabytes)."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _generation_settings(model, tokenizer, cfg) -> dict:
    n = int(cfg.data.removeprefix("generated:"))
    return {
        "model": _model_digest(model),
        "vocab": len(tokenizer),
        "num_sequences": n,
        "seq_len": cfg.seq_len,
        "temperature": cfg.gen_temperature,
        "top_p": cfg.gen_top_p,
        "seed": cfg.gen_seed,
        "batch_size": cfg.gen_batch_size,
        "bos": bos_token_id(tokenizer, cfg.bos),
    }


def generated_cache_dir(settings: dict) -> Path:
    from gift_quant.assets import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "generated" / key


@torch.no_grad()
def generate_sequences(
    model, tokenizer, cfg, progress: bool = True, device: torch.device | str = "cpu"
) -> Path:
    """Sample ``cfg.data = generated:N`` sequences of ``cfg.seq_len`` tokens from ``model``
    (use the full-precision model), or find them in the cache; returns the cache directory.

    Each sequence is [BOS] + one uniformly drawn non-special token, then tokens sampled with
    ``gen_temperature`` and nucleus ``gen_top_p`` (EOS suppressed, so every row is full);
    batch b is seeded with ``gen_seed + b``, so on one device the result is a function of the
    settings (a GPU's samples differ from the CPU's in rounding; the cache keeps the first)."""
    settings = _generation_settings(model, tokenizer, cfg)
    target = generated_cache_dir(settings)
    if (target / GENERATED_SETTINGS).is_file():
        log.info("generated training text: reusing %s", target)
        return target
    n, seq_len, bos = settings["num_sequences"], settings["seq_len"], settings["bos"]
    prefix = [] if bos is None else [bos]
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if seq_len <= len(prefix) + 1:
        raise RecipeError(f"train.seq_len={seq_len} is too short to generate text; use >= 16")
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    # half-precision matmuls on the CPU are ~100x slower than float32: sample in float32 there
    halves = [p for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)]
    saved = [(p, p.data) for p in halves] if torch.device(device).type == "cpu" else []
    for p, data in saved:
        p.data = data.float()
    rows = []
    try:
        batches = range(0, n, cfg.gen_batch_size)
        for b, start in enumerate(tqdm(batches, desc="generate", disable=not progress)):
            count = min(cfg.gen_batch_size, n - start)
            gen = torch.Generator().manual_seed(cfg.gen_seed + b)
            first = allowed[torch.randint(len(allowed), (count, 1), generator=gen)]
            prompt = torch.cat([torch.tensor([prefix] * count, dtype=torch.int64), first], 1)
            torch.manual_seed(cfg.gen_seed + b)
            new = seq_len - prompt.shape[1]
            out = model.generate(
                input_ids=prompt.to(device),
                attention_mask=torch.ones_like(prompt).to(device),
                do_sample=True,
                temperature=cfg.gen_temperature,
                top_p=cfg.gen_top_p,
                top_k=0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            rows.append(out.cpu())
    finally:
        for p, data in saved:
            p.data = data
        model.to(home).train(was_training)
    tokens = torch.cat(rows).to(torch.int64)
    settings[PROMPT_TOKENS] = len(prefix) + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        save_file({"input_ids": tokens}, str(tmp / GENERATED_TOKENS))
        (tmp / GENERATED_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        follow_umask(tmp)  # mkdtemp makes it 0700, safetensors its file 0600
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated training text: %d x %d tokens in %s", n, seq_len, target)
    return target


def _load_generated(path: Path, seed: int) -> TextWindows:
    settings = json.loads((path / GENERATED_SETTINGS).read_text())
    tokens = load_file(str(path / GENERATED_TOKENS))["input_ids"]
    return TextWindows(tokens, seed, no_loss=settings[PROMPT_TOKENS])


def resolve_generated(cfg, model, tokenizer, progress: bool = True, dist=None, device="cpu"):
    """``cfg`` itself, or, for ``train.data=generated:N``, ``cfg`` whose data is the cache
    directory of N sequences sampled from ``model`` (call it while ``model`` is still the
    full-precision one). Under several processes rank 0 samples; the others wait and read."""
    if not cfg.data.startswith("generated:") or cfg.method == "none" or cfg.steps == 0:
        return cfg
    main = dist is None or dist.main
    if main:
        path = generate_sequences(model, tokenizer, cfg, progress, device)
    if dist is not None:
        dist.barrier()
    if not main:
        path = generated_cache_dir(_generation_settings(model, tokenizer, cfg))
    return dataclasses.replace(cfg, data=str(path))
