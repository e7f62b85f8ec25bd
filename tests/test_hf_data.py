"""The hf: data path, offline: ``datasets.load_dataset`` is replaced by a fake hub that serves
records of the shapes the real sets have (c4/wikitext ``text``, tulu ``messages``, OpenOrca
``system_prompt``/``question``/``response``), built from the embedded Wikipedia articles.
Also: check_sources, the up-front validation of every text source of a recipe."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from gift_quant.assets import wiki_split
from gift_quant.config import RecipeError
from gift_quant.data import (
    calibration_set,
    check_sources,
    hf_records,
    load_documents,
    load_eval_windows,
)
from gift_quant.recipe import load_recipe
from gift_quant.train.data import IGNORE, build_train_data

datasets = pytest.importorskip("datasets")
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _sentences(split: str):
    for article in wiki_split(split):
        yield from (s.strip() + "." for s in article.split(". ") if len(s) > 40)


def _fake_sets() -> dict:
    """(name, config, split) -> a function giving the records, as the hub would stream them."""

    def chats():
        s = _sentences("train")
        for i in range(24):
            q, a = next(s), next(s)
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            yield {"dataset": "flan_v2", "id": f"t{i}", "messages": msgs}

    def orca():
        s = _sentences("train")
        for i in range(24):
            yield {
                "id": f"o{i}",
                "system_prompt": "You are a helpful assistant." if i % 2 else "",
                "question": next(s),
                "response": next(s),
            }

    def wikitext():  # a line per record, blank lines included, as in wikitext-2-raw
        for article in wiki_split("heldout"):
            for line in article.splitlines():
                yield {"text": ""}
                yield {"text": f" {line}\n"}

    return {
        ("allenai/c4", "en", "validation"): lambda: (
            {"text": a, "url": "u", "timestamp": "t"} for a in wiki_split("train")
        ),
        ("allenai/tulu-v2-sft-mixture", None, "train"): chats,
        ("Open-Orca/OpenOrca", None, "train"): orca,
        ("wikitext", "wikitext-2-raw-v1", "test"): wikitext,
        ("fake/no-text", None, "train"): lambda: iter([{"body": "x", "title": "y"}] * 5),
    }


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from _fake_sets; records how many rows were read."""
    sets, read = _fake_sets(), {"rows": 0}

    def load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        assert streaming, "hf: sources must stream"
        configs = sorted({c for n, c, _ in sets if n == name})
        if not configs:
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist")
        if config not in configs:
            raise ValueError(f"BuilderConfig '{config}' not found. Available: {configs}")
        splits = sorted(s for n, c, s in sets if (n, c) == (name, config))
        if split not in splits:
            raise ValueError(f"Bad split: {split}. Available splits: {splits}")

        def rows():
            for rec in sets[(name, config, split)]():
                read["rows"] += 1
                yield rec

        return rows()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return read


def test_text_chat_and_openorca_records_become_documents(fake_hub):
    wikitext = load_documents("hf:wikitext:wikitext-2-raw-v1:test")
    assert wikitext[0].startswith(" ") and "" not in wikitext  # blank records dropped
    chat = load_documents("hf:allenai/tulu-v2-sft-mixture")  # split defaults to train
    assert len(chat) == 24 and chat[0].count("\n\n") == 1  # user + assistant contents
    orca = load_documents("hf:Open-Orca/OpenOrca")
    assert orca[1].startswith("You are a helpful assistant.\n\n") and orca[0].count("\n\n") == 1


def test_streamed_sets_are_read_only_as_far_as_needed(fake_hub, bos_tokenizer):
    docs = load_documents("hf:wikitext:wikitext-2-raw-v1:test", max_chars=2000)
    assert 2000 <= sum(map(len, docs)) < 2000 + max(map(len, docs))
    assert fake_hub["rows"] < 2 * len(docs) + 2  # stopped there, not at the end of the set
    assert len(list(hf_records("hf:Open-Orca/OpenOrca", limit=5))) == 5
    fake_hub["rows"] = 0  # a text set for training: a peek at one record, then the text needed
    data = build_train_data("hf:allenai/c4:en:validation", bos_tokenizer, 64, 0, max_examples=4)
    assert len(data) >= 4 and fake_hub["rows"] <= 1 + 2


@pytest.mark.parametrize(
    "source, message",
    [
        ("hf:nope/missing", r"hf:nope/missing: no dataset 'nope/missing' on the hub"),
        ("hf:wikitext:wikitext-9:test", r"BuilderConfig 'wikitext-9' not found. Available"),
        ("hf:wikitext:wikitext-2-raw-v1:tset", r"Bad split: tset. Available splits: \['test'\]"),
        ("hf:fake/no-text", r"expected a \"text\" string.*the record has \['body', 'title'\]"),
    ],
    ids=["unknown-dataset", "unknown-config", "unknown-split", "missing-field"],
)
def test_bad_hf_sources_are_one_line_errors(fake_hub, source, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_documents(source)
    assert "\n" not in str(err.value)


def test_offline_is_a_one_line_error():
    """The real datasets.load_dataset, offline (conftest sets HF_DATASETS_OFFLINE=1)."""
    with pytest.raises(RecipeError, match="cannot reach the Hugging Face hub") as err:
        load_documents("hf:wikitext:wikitext-2-raw-v1:test")
    assert "\n" not in str(err.value) and "go online, or use wiki" in str(err.value)


_TOKENIZED: dict = {}


@pytest.fixture
def tokenize_once(monkeypatch):
    """Recipes share texts (the wiki split, the c4 stand-in made of it): tokenize each once."""
    import gift_quant.data
    import gift_quant.train.data

    real = gift_quant.data.tokenize_documents

    def memo(tokenizer, docs):
        key = (id(tokenizer), hash("\n\n".join(d for d in docs if d)))
        if key not in _TOKENIZED:
            _TOKENIZED[key] = real(tokenizer, docs)
        return _TOKENIZED[key]

    monkeypatch.setattr(gift_quant.data, "tokenize_documents", memo)
    monkeypatch.setattr(gift_quant.train.data, "tokenize_documents", memo)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_shipped_recipe_gets_through_its_data_stage(
    fake_hub, tokenize_once, bos_tokenizer, path
):
    """The recipe's own sources, sizes and seeds; a tiny BOS tokenizer (Llama-like, with a chat
    template) stands in for the model's."""
    recipe = load_recipe(path)
    tok, c, tr, ev = bos_tokenizer, recipe.calib, recipe.train, recipe.eval
    check_sources(recipe)

    calib = calibration_set(tok, c)
    assert calib.shape == (c.num_samples, c.seq_len) and (calib[:, 0] == 1).all()

    examples = tr.steps * tr.batch_size * tr.grad_accum
    data = build_train_data(tr.data, tok, tr.seq_len, tr.seed, bos=tr.bos, max_examples=examples)
    batch = data.batch(0, tr.batch_size)
    assert batch.input_ids.shape == (tr.batch_size, tr.seq_len)
    assert (batch.input_ids[:, 0] == 1).all() and batch.num_label_tokens > 0
    if tr.data.startswith("hf:"):  # chats: the loss is on the assistant's tokens only
        kept = tok.decode(batch.input_ids[0][batch.labels[0] != IGNORE])
        assert kept.endswith("<eos>") and "<user>" not in kept

    for text in ev.text:
        windows = load_eval_windows(tok, text, ev.seq_len, ev.max_tokens, ev.bos)
        assert windows.shape[1] == ev.seq_len and (windows[:, 0] == 1).all()


def test_check_sources_names_what_is_wrong(tiny_model_dirs, tmp_path, fake_hub):
    path = tiny_model_dirs("llama")  # max_position_embeddings 256
    model = [f"model.name_or_path={path}", "calib.seq_len=64", "train.seq_len=64"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    cases = [
        ("calib.source=missing.txt", r"calib.source: text source 'missing.txt' is not a file"),
        (f"train.data={bad}", r"train.data: .*bad.jsonl:2: not a JSON line"),
        ("eval.text=[hf:fake/no-text]", r"eval.text\[0\]: hf:fake/no-text record 1: expected"),
        ("eval.seq_len=512", r"eval.seq_len=512 exceeds the model's context of 256 tokens"),
        ("train.data=hf:nope/x", r"train.data: hf:nope/x: no dataset 'nope/x'"),
        ("train.bos=always", r"train.bos=always, but the tokenizer in .* has no BOS token"),
    ]
    for override, message in cases:
        with pytest.raises(RecipeError, match=message):
            check_sources(load_recipe(None, [*model, "eval.seq_len=64", override]))
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"question": "q?", "response": "r."}) + "\n")
    check_sources(load_recipe(None, [*model, f"train.data={ok}", "eval.seq_len=256"]))
    check_sources(load_recipe(None, [*model, "train.data=generated:64", "eval.seq_len=64"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.data=generated:0", r"use generated:N with N > 0 sequences"),
        ("calib.source=generated:8", r"generated text is a training source only"),
        ("train.data=hf::train", r"names no dataset; use hf:<name>"),
        ("train.bos=sometimes", r"train.bos must be one of \['auto', 'always', 'never'\]"),
        ("train.gen_top_p=0", r"train.gen_top_p must be in \(0, 1\]"),
    ],
)
def test_data_keys_are_checked_when_the_recipe_is_read(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_a_bad_source_fails_before_anything_is_loaded_or_written(tiny_model_dirs, tmp_path):
    from gift_quant.cli import main
    from gift_quant.pipeline import recover

    model = tiny_model_dirs("llama")
    # everything else about the recipe fits the tiny model, so the source is what is refused
    fits = ["quant.group_size=32", "saliency.count=4", "calib.seq_len=64", "eval.seq_len=64"]
    fits += ["train.seq_len=64"]
    recipe = load_recipe(None, [f"model.name_or_path={model}", *fits, "train.data=missing.jsonl"])
    with pytest.raises(RecipeError, match="train.data: text source 'missing.jsonl'"):
        recover(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    args = ["quantize", "--model", model, "--out", str(tmp_path / "q"), "-q"]
    args += [x for f in fits for x in ("--set", f)]
    assert main([*args, "--set", "calib.source=hf:wikitext:wikitext-2-raw-v1:test"]) == 2
    assert not (tmp_path / "q").exists()


def test_chat_records_stream_into_training_examples(fake_hub, bos_tokenizer):
    data = build_train_data("hf:Open-Orca/OpenOrca", bos_tokenizer, 256, 0, max_examples=10)
    assert len(data) == 10 and fake_hub["rows"] == 1 + 10  # a peek, then what the run needs
    ids = data.batch(0, 10).input_ids
    assert (ids[:, 0] == 1).all() and torch.equal(ids, data.batch(0, 10).input_ids)
    orca = list(itertools.islice(_fake_sets()[("Open-Orca/OpenOrca", None, "train")](), 10))
    texts = [bos_tokenizer.decode(row) for row in data.ids]
    assert all(any(r["response"][:30] in t for t in texts) for r in orca)  # (rows truncate)
