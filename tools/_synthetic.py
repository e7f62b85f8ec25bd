"""Models and text for GPU-scale benchmarks on machines with no network: random-weight Llamas of
real shapes, a synthetic corpus, and a byte-level BPE trained on it. Throughput and memory
benchmarks only: nothing here measures quality."""

from __future__ import annotations

import random
from pathlib import Path

SHAPES = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "1.1b": dict(  # TinyLlama-1.1B
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    "7b": dict(  # LLaMA-2-7B
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
}


def synthetic_text(path: Path, n_words: int = 200_000) -> None:
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ren", "to", "sa", "vu", "ne", "di", "por", "el", "an", "ru", "qi"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(words))
        if len(line) > rng.randint(8, 20):
            lines.append(" ".join(line) + ".")
            line = []
    path.write_text("\n".join(lines))


def build_model(work: Path, shape: str, device: str, n_words: int = 200_000) -> Path:
    """``work/model`` (fp16 random Llama of ``shape`` + tokenizer) and ``work/text.txt``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = work / "text.txt"
    synthetic_text(text, n_words)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(4096, SHAPES[shape]["vocab_size"]),
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(text)], trainer)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(torch.float16)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>"
    ).save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e9:.2f}B parameters ({shape} shape, random weights)", flush=True)
    del model
    return model_dir


def run_recover(prefix: list[str], recipe: Path, out: Path, sets: list[str], code: Path) -> dict:
    """``prefix -m gift_quant recover`` with the package found in ``code`` (this checkout or an
    older one); its JSON result plus ``wall_seconds``. A failure prints its output and exits."""
    import json
    import subprocess
    import sys
    import time

    cmd = [*prefix, "-m", "gift_quant", "recover", "--recipe", str(recipe)]
    cmd += ["--out", str(out), "--json", "-q"]
    for s in sets:
        cmd += ["--set", s]
    from provenance import child_env

    env = child_env(code)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - t0
    return result
