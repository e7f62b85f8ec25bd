"""Text sources, windows and their BOS convention, and data-free generated training text."""

import json
import math

import pytest
import torch
from conftest import tiny_recipe

from gift_quant.assets import wiki_articles, wiki_split
from gift_quant.config import RecipeError
from gift_quant.data import (
    TextTooShortError,
    bos_token_id,
    calibration_windows,
    eval_windows,
    load_documents,
    tokenize_documents,
)


def test_wiki_splits_are_disjoint_and_fixed():
    articles = wiki_articles()
    assert len(articles) == 107
    train, held = wiki_split("train"), wiki_split("heldout")
    assert not set(train) & set(held)
    assert sum(len(a) for a in train) > 1_500_000 and sum(len(a) for a in held) > 500_000


def test_local_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    assert load_documents(str(tmp_path / "a.txt")) == ["one document"]
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"})
    )
    assert load_documents(str(tmp_path / "b.jsonl")) == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(RecipeError, match=r"c.jsonl:2: expected a \"text\" string"):
        load_documents(str(tmp_path / "c.jsonl"))
    with pytest.raises(RecipeError, match="is not a file"):
        load_documents(str(tmp_path / "missing.txt"))


def test_windows_are_seeded_and_bounded():
    tokens = torch.arange(10_000)
    a = calibration_windows(tokens, 16, 128, seed=3)
    assert torch.equal(a, calibration_windows(tokens, 16, 128, seed=3))
    assert not torch.equal(a, calibration_windows(tokens, 16, 128, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 127, dtype=torch.int64))
    w = eval_windows(tokens, 512, max_tokens=5000)
    assert w.shape == (9, 512) and torch.equal(w.flatten(), tokens[: 9 * 512])
    with pytest.raises(TextTooShortError, match="fewer than one window of 20000"):
        calibration_windows(tokens, 1, 20_000, seed=0)


# -- BOS convention -------------------------------------------------------------------------------


def test_bos_follows_the_tokenizer_unless_forced(tiny_tokenizer, bos_tokenizer):
    assert bos_token_id(bos_tokenizer) == bos_tokenizer.bos_token_id == 1
    assert bos_token_id(tiny_tokenizer) is None  # adds no BOS, like SmolLM2's
    assert bos_token_id(bos_tokenizer, "never") is None
    with pytest.raises(RecipeError, match="bos=always, but the tokenizer has no BOS token"):
        bos_token_id(tiny_tokenizer, "always")


def test_windows_are_bos_plus_text():
    tokens = torch.arange(10, 10_010)
    cal = calibration_windows(tokens, 8, 64, seed=0, bos=1)
    assert cal.shape == (8, 64) and (cal[:, 0] == 1).all()
    assert (cal[:, 2:] - cal[:, 1:-1] == 1).all()  # 63 consecutive text tokens
    ev = eval_windows(tokens, 64, max_tokens=640, bos=1)
    assert ev.shape == (10, 64) and (ev[:, 0] == 1).all()
    assert torch.equal(ev[:, 1:].flatten(), tokens[: 10 * 63])  # every text token once


@pytest.fixture
def texts(tmp_path):
    """Short slices of the embedded articles (training, held-out) as .txt files, so tests
    tokenize 40 kB rather than 2 MB."""
    paths = {}
    for split in ("train", "heldout"):
        paths[split] = tmp_path / f"{split}.txt"
        paths[split].write_text("\n\n".join(wiki_split(split))[:40_000])
    return {k: str(v) for k, v in paths.items()}


def _plain_perplexity(model_dir, text: str, seq_len: int, max_windows: int) -> float:
    """The oracle: a plain transformers loop. The text's tokens without special tokens are cut
    into chunks of seq_len - 1, each given the prefix the tokenizer itself adds to a text
    (tok("") with special tokens: [BOS] here), and scored by transformers' own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix = tok("")["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunk = seq_len - len(prefix)
    losses = []
    with torch.no_grad():
        for i in range(max_windows):
            window = torch.tensor([prefix + ids[i * chunk : (i + 1) * chunk]])
            labels = window.clone()
            labels[:, : len(prefix)] = -100  # BOS is never a target
            losses.append(float(model(input_ids=window, labels=labels).loss))
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_eval_perplexity_matches_a_plain_loop_with_bos(bos_model_dirs, family, texts, capsys):
    from gift_quant.cli import main

    model_dir = bos_model_dirs(family)
    args = ["eval", "--model", model_dir, "--text", texts["heldout"], "--seq-len", "64"]
    assert main([*args, "--max-tokens", "1024", "--json", "-q"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(texts["heldout"]) as f:
        oracle = _plain_perplexity(model_dir, f.read(), 64, 16)
    print(f"{family}: FP perplexity {ours['perplexity']:.4f}, plain loop {oracle:.4f}")
    assert ours["tokens"] == 16 * 63
    assert ours["perplexity"] == pytest.approx(oracle, rel=1e-4)


def test_every_window_of_a_recover_run_starts_with_bos(
    bos_model_dirs, tmp_path, texts, monkeypatch
):
    """Calibration, training and eval windows all start with BOS on a BOS tokenizer (gemma3),
    and the recorded FP perplexity is the plain loop's."""
    import gift_quant.quantize
    import gift_quant.train.loop
    from gift_quant.pipeline import recover

    seen = {}
    capture = gift_quant.quantize.capture_block_inputs
    build = gift_quant.train.loop.build_train_data

    def spy_capture(model, blocks, batches, *args):
        seen["calib"] = torch.cat(batches)
        return capture(model, blocks, batches, *args)

    def spy_build(*args, **kwargs):
        data = build(*args, **kwargs)
        seen["train"] = data.batch(0, 4).input_ids
        return data

    monkeypatch.setattr(gift_quant.quantize, "capture_block_inputs", spy_capture)
    monkeypatch.setattr(gift_quant.train.loop, "build_train_data", spy_build)
    model_dir = bos_model_dirs("gemma3")
    recipe = tiny_recipe(
        model_dir,
        f"calib.source={texts['train']}",
        f"train.data={texts['train']}",
        f"eval.text=[{texts['heldout']}]",
        "train.steps=2",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.seq_len=32",
    )
    report = recover(recipe, tmp_path / "run", progress=False)
    assert seen["calib"].shape == (8, 64) and (seen["calib"][:, 0] == 1).all()
    assert (seen["calib"][:, 1:] != 1).all()
    assert seen["train"].shape == (4, 32) and (seen["train"][:, 0] == 1).all()
    with open(texts["heldout"]) as f:
        oracle = _plain_perplexity(model_dir, f.read(), 64, 16)
    assert report["perplexity_fp"] == pytest.approx(oracle, rel=1e-4)


def test_bos_never_and_always_in_training_windows(bos_tokenizer, tiny_tokenizer, texts):
    from gift_quant.train.data import build_train_data

    auto = build_train_data(texts["train"], bos_tokenizer, 32, 0).windows
    never = build_train_data(texts["train"], bos_tokenizer, 32, 0, bos="never").windows
    assert (auto[:, 0] == 1).all() and not (never == 1).any()
    plain = tokenize_documents(bos_tokenizer, load_documents(texts["train"]))
    assert torch.equal(never.flatten(), plain[: never.numel()])
    assert torch.equal(auto[:, 1:].flatten(), plain[: auto.shape[0] * 31])
    with pytest.raises(RecipeError, match="no BOS token"):
        build_train_data(texts["train"], tiny_tokenizer, 32, 0, bos="always")


def test_chat_examples_follow_the_bos_setting(bos_tokenizer, tmp_path):
    from gift_quant.train.data import build_train_data

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"question": "What is water?", "response": "A liquid."}))
    auto = build_train_data(str(path), bos_tokenizer, 32, 0)  # the template renders BOS
    never = build_train_data(str(path), bos_tokenizer, 32, 0, bos="never")
    assert auto.ids[0, 0] == 1 and never.ids[0, 0] != 1
    assert torch.equal(auto.ids[0, 1:32], never.ids[0, :31])


# -- generated:N --------------------------------------------------------------------------------


def _gen_cfg(**kw):
    from gift_quant.config import TrainConfig

    base = dict(data="generated:6", seq_len=24, gen_batch_size=4, gen_seed=0)
    return TrainConfig(**{**base, **kw})


def test_generated_text_is_seeded_cached_and_keyed_by_settings(
    bos_model_dirs, bos_tokenizer, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from gift_quant.modeling import load_model
    from gift_quant.recipe import ModelConfig
    from gift_quant.train.data import build_train_data, generate_sequences

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(ModelConfig(name_or_path=bos_model_dirs("llama")))
    first = generate_sequences(model, tok, _gen_cfg(), progress=False)
    tokens = load_file(str(first / "tokens.safetensors"))["input_ids"]
    assert tokens.shape == (6, 24) and (tokens[:, 0] == 1).all()  # BOS + 23 tokens, full length
    assert (tokens[:, 1:] != tok.eos_token_id).all()
    settings = json.loads((first / "generated.json").read_text())
    assert settings["temperature"] == 1.0 and settings["top_p"] == 0.95 and settings["seed"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(model, "generate", refuse)
    assert generate_sequences(model, tok, _gen_cfg(), progress=False) == first
    monkeypatch.undo()
    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))

    other = generate_sequences(model, tok, _gen_cfg(gen_seed=1), progress=False)
    assert other != first
    assert not torch.equal(load_file(str(other / "tokens.safetensors"))["input_ids"], tokens)
    hotter = generate_sequences(model, tok, _gen_cfg(gen_temperature=2.0), progress=False)
    assert hotter not in (first, other)

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "fresh"))  # same seed, new cache
    again = generate_sequences(model, tok, _gen_cfg(), progress=False)
    assert again != first
    assert torch.equal(load_file(str(again / "tokens.safetensors"))["input_ids"], tokens)

    data = build_train_data(str(first), tok, 24, seed=0)
    batch = data.batch(0, 6)
    assert (batch.labels[:, :2] == -100).all()  # BOS and the random first token: no loss
    assert torch.equal(batch.labels[:, 2:], batch.input_ids[:, 2:])


def test_recover_trains_on_generated_text(tiny_model_dirs, tmp_path, texts, monkeypatch):
    from gift_quant.pipeline import recover

    monkeypatch.setenv("GIFT_QUANT_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(
        tiny_model_dirs("llama"),
        f"calib.source={texts['train']}",
        f"eval.text=[{texts['heldout']}]",
        "train.data=generated:4",
        "train.steps=2",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.seq_len=32",
    )
    report = recover(recipe, tmp_path / "run", progress=False)
    assert report["train"]["steps"] == 2 and report["train"]["tokens"] == 2 * 2 * 31
    assert len(list((tmp_path / "cache" / "generated").iterdir())) == 1
