"""Write gift_quant/tasks/wiki_cloze.jsonl: the local zero-shot multiple-choice task.

Each item is a sentence from one of the embedded held-out Wikipedia articles (the articles
perplexity is measured on; never used for calibration or fine-tuning) as context, and four
candidate next sentences: the true one and three next sentences drawn from other held-out
articles. A model scores the choices by log-likelihood (lm-eval ``multiple_choice``); chance is
25%. Deterministic (seed 0), so the file can be regenerated and compared.

    python tools/make_wiki_cloze.py [--items 40]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from gift_quant.assets import wiki_split

OUT = Path(__file__).resolve().parent.parent / "gift_quant" / "tasks" / "wiki_cloze.jsonl"


def sentence_pairs(article: str) -> list[tuple[str, str]]:
    """Consecutive (sentence, next sentence) pairs of one paragraph, 40-200 characters each."""
    pairs = []
    for para in article.split("\n"):
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para) if s.strip()]
        for a, b in zip(sents, sents[1:], strict=False):
            if 40 <= len(a) <= 200 and 40 <= len(b) <= 200:
                pairs.append((a, b))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=40)
    args = p.parse_args()
    rng = random.Random(0)
    per_article = [sentence_pairs(a) for a in wiki_split("heldout")]
    pool = [(i, pair) for i, pairs in enumerate(per_article) for pair in pairs]
    rng.shuffle(pool)
    items, used = [], set()
    for article, (context, answer) in pool:
        if len(items) == args.items:
            break
        if article in used and len(used) < len(per_article):
            continue  # spread the items over the articles first
        others = [b for j, (_, b) in pool if j != article]
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
        used.add(article)
    OUT.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {len(items)} items from {len(used)} held-out articles to {OUT}")


if __name__ == "__main__":
    main()
