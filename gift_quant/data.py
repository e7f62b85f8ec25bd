"""Text sources and token windows for calibration, training and perplexity.

A source is one of
- ``wiki`` / ``wiki-heldout``: the embedded Wikipedia articles 0-79 / 80-106 (assets.py);
- a ``.txt`` file (one document) or ``.jsonl`` file (one document per line, field ``text``);
- ``hf:<name>[:<config>[:<split>]]``: a ``datasets`` dataset, streamed (split ``train`` unless
  given). A record is a document through its ``text`` field, its chat ``messages`` (contents
  joined), or OpenOrca's ``system_prompt``/``question``/``response`` fields (joined).
Documents are joined with blank lines and tokenized without special tokens; the windows cut
from that stream start with BOS when the tokenizer adds one (``bos_token_id``), so a window of
L tokens is BOS + L-1 text tokens, as the model saw its training text.

:func:`check_sources` checks every source of a recipe cheaply, before any expensive stage.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gift_quant.config import RecipeError

__all__ = [
    "bos_token_id",
    "calibration_set",
    "calibration_windows",
    "check_sources",
    "eval_windows",
    "hf_records",
    "load_documents",
    "load_eval_windows",
    "record_text",
    "tokenize_documents",
]

HF_HINT = "hf:<name>[:<config>[:<split>]]"
# Record fields understood as a document (record_text) or a chat (train/data.py).
PROMPT_KEYS = ("prompt", "question", "instruction")  # Alpaca / OpenOrca spellings
RESPONSE_KEYS = ("response", "output", "answer")
SYSTEM_KEYS = ("system", "system_prompt")
CHARS_PER_TOKEN = 6  # text read from a streamed hf: set per token needed (generous for English)


class TextTooShortError(ValueError):
    """The text yields fewer tokens than one window needs."""


def bos_token_id(tokenizer, mode: str = "auto") -> int | None:
    """The BOS id every window starts with, or None (see ``config.BOS_MODES``).

    "auto" asks the tokenizer itself: BOS is used when tokenizing with special tokens puts the
    tokenizer's BOS token first (Llama, Gemma do; SmolLM2, GPT-NeoX, Qwen do not)."""
    bos = tokenizer.bos_token_id
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise RecipeError("bos=always, but the tokenizer has no BOS token; use bos=auto")
        return bos
    if mode != "auto":
        raise RecipeError(f"bos must be one of auto, always, never; got {mode!r}")
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def load_documents(source: str, max_chars: int = 0) -> list[str]:
    """Documents of a text source (see module docstring). ``max_chars`` > 0 stops reading an
    ``hf:`` source once that much text is in (a streamed set need not be read to its end)."""
    from gift_quant import assets

    if source == "wiki":
        return assets.wiki_split("train")
    if source == "wiki-heldout":
        return assets.wiki_split("heldout")
    if source.startswith("hf:"):
        docs, total = [], 0
        for n, rec in enumerate(hf_records(source), 1):
            text = record_text(rec, f"{source} record {n}")
            if text:
                docs.append(text)
                total += len(text)
            if max_chars and total >= max_chars:
                break
        return docs
    if source.startswith("generated:"):
        raise RecipeError(f"{source!r} is a training source only (train.data)")
    path = _local_file(source)
    if path.suffix == ".jsonl":
        return [record_text(rec, where) for where, rec in _jsonl(path) if record_text(rec, where)]
    return [path.read_text(encoding="utf-8")]


def _local_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise RecipeError(
            f"text source {source!r} is not a file; use wiki, wiki-heldout, a .txt/.jsonl file "
            f"or {HF_HINT}"
        )
    return path


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-empty line of a JSON-lines file."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise RecipeError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{n}", record


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (one-line errors that name the line)."""
    return [rec for _, rec in _jsonl(Path(path))]


def field_of(rec: dict, keys: tuple[str, ...]):
    """The first of ``keys`` that the record has (not None)."""
    return next((rec[k] for k in keys if rec.get(k) is not None), None)


def record_text(rec: dict, where: str) -> str:
    """A record as one document: ``text``, chat ``messages``, or prompt/response fields."""
    if isinstance(rec.get("text"), str):
        return rec["text"]
    msgs = rec.get("messages")
    if isinstance(msgs, list) and all(isinstance(m, dict) for m in msgs):
        return "\n\n".join(str(m.get("content") or "") for m in msgs)
    prompt, response = field_of(rec, PROMPT_KEYS), field_of(rec, RESPONSE_KEYS)
    if prompt is not None and response is not None:
        parts = (field_of(rec, SYSTEM_KEYS), prompt, response)
        return "\n\n".join(str(p) for p in parts if p)
    raise RecipeError(
        f'{where}: expected a "text" string, "messages", or question/response fields; '
        f"the record has {sorted(rec)}"
    )


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise RecipeError(f"text source {source!r}: use {HF_HINT}")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def hf_records(source: str, limit: int = 0) -> Iterator[dict]:
    """Records of ``hf:<name>[:<config>[:<split>]]``, streamed (large sets are not downloaded
    whole), the first ``limit`` of them (0 = all). Offline, unknown dataset/config/split:
    one-line RecipeError naming the fix."""
    name, config, split = _parse_hf(source)
    try:
        import datasets
        from datasets.exceptions import DatasetNotFoundError
    except ImportError as exc:
        raise RecipeError(
            f"{source}: hf: text sources need the datasets package: pip install 'gift_quant[data]'"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        yield from itertools.islice(ds, limit or None)
    except ConnectionError as exc:
        raise RecipeError(
            f"{source}: cannot reach the Hugging Face hub ({_first_line(exc)}); go online, "
            f"or use wiki or a local .txt/.jsonl file"
        ) from exc
    except DatasetNotFoundError as exc:
        raise RecipeError(
            f"{source}: no dataset {name!r} on the hub (or it is gated); check the name, "
            f"e.g. hf:wikitext:wikitext-2-raw-v1:test"
        ) from exc
    except ValueError as exc:  # unknown config or split: datasets lists the valid ones
        if isinstance(exc, RecipeError):
            raise
        raise RecipeError(f"{source}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def tokenize_documents(tokenizer, docs: list[str]) -> Tensor:
    """One long int64 token stream of the documents joined with blank lines (no BOS/EOS)."""
    text = "\n\n".join(d for d in docs if d)
    max_len = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # silence "sequence longer than" warnings
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        tokenizer.model_max_length = max_len
    return torch.tensor(ids, dtype=torch.int64)


def _with_bos(rows: Tensor, bos: int | None) -> Tensor:
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def calibration_windows(
    tokens: Tensor, num_samples: int, seq_len: int, seed: int, bos: int | None = None
) -> Tensor:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets: [n, L] int64.

    With ``bos``, each window is BOS + ``seq_len - 1`` text tokens."""
    text_len = seq_len - (bos is not None)
    if text_len < 1 or tokens.numel() < text_len + 1:
        raise TextTooShortError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one window of "
            f"{seq_len}; give more text or a smaller calib.seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - text_len, (num_samples,), generator=gen)
    return _with_bos(torch.stack([tokens[s : s + text_len] for s in starts.tolist()]), bos)


def calibration_set(tokenizer, calib) -> Tensor:
    """The calibration windows a ``CalibConfig`` asks for: [num_samples, seq_len] int64."""
    c = calib
    docs = load_documents(c.source, max_chars=c.num_samples * c.seq_len * CHARS_PER_TOKEN)
    tokens = tokenize_documents(tokenizer, docs)
    return calibration_windows(
        tokens, c.num_samples, c.seq_len, c.seed, bos_token_id(tokenizer, c.bos)
    )


def eval_windows(
    tokens: Tensor, seq_len: int, max_tokens: int = 0, bos: int | None = None
) -> Tensor:
    """Non-overlapping windows of ``seq_len`` tokens: [n, L] int64 (a ragged tail is dropped).

    With ``bos``, each window is BOS + the next ``seq_len - 1`` text tokens (every text token
    is predicted once). ``max_tokens`` > 0 caps the windowed tokens (BOS included) at that."""
    text_len = seq_len - (bos is not None)
    n = tokens.numel() // text_len if text_len > 0 else 0
    if max_tokens:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise TextTooShortError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one window of "
            f"{seq_len}; give more text or a smaller window (eval --seq-len, eval.seq_len)"
        )
    return _with_bos(tokens[: n * text_len].reshape(n, text_len), bos)


def load_eval_windows(
    tokenizer, source: str, seq_len: int, max_tokens: int = 0, bos: str = "auto"
) -> Tensor:
    """Perplexity windows of a text source under a BOS convention (``config.BOS_MODES``)."""
    docs = load_documents(source, max_chars=max_tokens * CHARS_PER_TOKEN)
    tokens = tokenize_documents(tokenizer, docs)
    return eval_windows(tokens, seq_len, max_tokens, bos_token_id(tokenizer, bos))


# -- checking sources up front ------------------------------------------------------------------

HF_PROBE_RECORDS = 3  # records read from an hf: source to check its fields


def check_sources(recipe, stages: tuple[str, ...] = ("calib", "train", "eval")) -> None:
    """Check the text sources of ``recipe``'s ``stages`` without any expensive work; RecipeError
    if one is wrong.

    Files exist and parse, ``hf:`` datasets answer and their first records have a known field,
    the embedded Wikipedia is installed, each seq_len fits the model's context and a forced
    BOS (``bos: always``) exists when the model directory is at hand. Run it before loading
    the model, so nothing fails later for a reason that could have been seen now
    (``quantize`` checks only ``("calib",)``)."""
    checks = []
    if "calib" in stages:
        checks.append(("calib.source", recipe.calib.source, recipe.calib.seq_len))
    tr = recipe.train
    if "train" in stages and tr.method != "none" and tr.steps > 0:
        checks.append(("train.data", tr.data, tr.seq_len))
    if "eval" in stages:
        ev = recipe.eval
        checks += [(f"eval.text[{i}]", t, ev.seq_len) for i, t in enumerate(ev.text)]
    for key, source, _ in checks:
        _check_one(key, source, train=key == "train.data")
    model_dir = _local_model_dir(recipe.model)
    context = _model_context(model_dir) if model_dir else 0
    sections = {key.split(".")[0]: seq_len for key, _, seq_len in checks}
    for section, seq_len in sections.items():
        if context and seq_len > context:
            raise RecipeError(
                f"{section}.seq_len={seq_len} exceeds the model's context of {context} tokens "
                f"(max_position_embeddings); use {section}.seq_len={context} or less"
            )
    forced = [s for s in sections if getattr(recipe, s).bos == "always"]
    if forced and model_dir and (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        if AutoTokenizer.from_pretrained(model_dir).bos_token_id is None:
            raise RecipeError(
                f"{forced[0]}.bos=always, but the tokenizer in {model_dir} has no BOS token; "
                f"use {forced[0]}.bos=auto"
            )


def _check_one(key: str, source: str, train: bool) -> None:
    try:
        if source in ("wiki", "wiki-heldout"):
            _wiki_installed()
        elif source.startswith("generated:"):
            if not train:
                raise RecipeError("generated text is a training source only (train.data)")
        elif source.startswith("hf:"):
            records = list(hf_records(source, HF_PROBE_RECORDS))
            if not records:
                raise RecipeError(f"{source} has no records")
            for n, rec in enumerate(records, 1):
                _check_record(rec, f"{source} record {n}", train)
        else:
            path = _local_file(source)
            if path.suffix == ".jsonl":
                records = read_jsonl(path)
                if not records:
                    raise RecipeError(f"{path} has no records")
                for n, rec in enumerate(records, 1):
                    _check_record(rec, f"{path}:{n}", train)
            else:
                path.read_text(encoding="utf-8")
    except RecipeError as exc:
        raise RecipeError(f"{key}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:  # unreadable file, missing asset
        raise RecipeError(f"{key}={source!r}: {_first_line(exc)}") from None


def _wiki_installed() -> None:
    """The embedded Wikipedia is parsed once into the cache; before that, gensim must hold it."""
    from gift_quant import assets

    if not (assets.cache_dir() / "enwiki-gensim-4.4.0.json").is_file():
        assets._locate("gensim", assets.WIKI_FILE, assets.WIKI_INSTALL)


def _check_record(rec: dict, where: str, train: bool) -> None:
    """Training reads chats (messages, prompt/response) or text; the others read text (a chat
    becomes its joined contents). Either way the record must have one of those fields."""
    record_text(rec, where)
    msgs = rec.get("messages")
    if train and msgs is not None and not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise RecipeError(f"{where}: 'messages' must be a list of {{role, content}} objects")


def _local_model_dir(model_cfg) -> Path | None:
    """The model's directory when it is on disk already (None for a hub id or a GGUF file)."""
    if model_cfg.name_or_path:
        path = Path(model_cfg.name_or_path).expanduser()
    else:
        from gift_quant import assets

        path = assets.cache_dir() / "SmolLM2-135M-Instruct-fp16"  # once converted
    return path if (path / "config.json").is_file() else None


def _model_context(path: Path) -> int:
    """max_position_embeddings from the model directory's config.json (0 when unknown)."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    data = data.get("text_config", data)  # multimodal wrappers keep the LM's config inside
    return int(data.get("max_position_embeddings") or 0)
