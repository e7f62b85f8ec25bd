import json

import pytest
import torch

from gift_quant.assets import wiki_articles, wiki_split
from gift_quant.data import (
    TextTooShortError,
    calibration_windows,
    eval_windows,
    load_documents,
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
    with pytest.raises(ValueError, match=r"c.jsonl:2: expected an object with a \"text\""):
        load_documents(str(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
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
