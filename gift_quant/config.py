"""Configuration of a run: frozen dataclasses, one per stage -- the one home of every default.

``gift_quant.recipe`` maps YAML files and ``--set`` overrides onto these classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from gift_quant.errors import RecipeError
from gift_quant.registry import NOISES, QUANTIZERS

__all__ = [
    "BUDGET_KEYS",
    "CalibConfig",
    "EvalConfig",
    "ExportConfig",
    "ModelConfig",
    "QuantConfig",
    "Recipe",
    "RecipeError",
    "SaliencyConfig",
    "TrainConfig",
    "check_windows",
]

SUPPORTED_BITS = (2, 3, 4, 8)
BUDGET_KEYS = ("count", "fraction", "avg_bits")
NORMS = (1.0, 2.0, math.inf)
# name -> (tau, rho, gamma); tau=None switches the weight-error term off (activation-only metric).
SALIENCY_PRESETS: dict[str, tuple[float | None, float, float]] = {
    "gift": (math.inf, math.inf, 1.0),  # GIFT-SW's winner: max|W-Q(W)| * max|X|
    "owq": (2.0, 2.0, 1.0),  # lambda_j * ||D_j||^2 ranks like ||D_j||_2 * ||X_j||_2
    "quik": (None, math.inf, 1.0),  # max|X| only (SmoothQuant act_scales)
    "wanda": (1.0, 2.0, 1.0),  # ||D_j||_1 * ||X_j||_2, Wanda's norms with D = quantization error
}

# Does every calibration, training and eval window of L tokens start with BOS (then BOS + L-1
# text tokens)? "auto": when the tokenizer adds one (tokenizer(text) with special tokens
# would); "always": yes (the tokenizer must define a BOS token); "never": L text tokens.
BOS_MODES = ("auto", "always", "never")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to load and which of its Linears to quantize.

    Args:
        name_or_path: local directory, GGUF file, or hub id; "" = the embedded default
            (SmolLM2-135M-Instruct, converted once to an fp16 safetensors cache).
        gguf_file: GGUF file name inside ``name_or_path`` (when it is a directory).
        dtype: dtype the weights are loaded and stored in (float16, bfloat16, float32).
        trust_remote_code: run code shipped with the model; off unless you ask.
        include: regexes (``re.search``) on full module names; a Linear inside a decoder block
            is a target when it matches one of them and none of ``exclude``.
        exclude: regexes that remove targets. Embeddings and lm_head are never targets.
        device: where blocks are computed: "auto" (cuda when present), "cpu", "cuda", "cuda:1".
    """

    name_or_path: str = ""
    gguf_file: str = ""
    dtype: str = "float16"
    trust_remote_code: bool = False
    include: tuple[str, ...] = (".*",)
    exclude: tuple[str, ...] = ()
    device: str = "auto"

    # where blocks run does not change what a run means: a run resumes on another device
    RUNTIME_KEYS: typing.ClassVar[tuple[str, ...]] = ("device",)

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype, ("float16", "bfloat16", "float32"))
        for key in ("include", "exclude"):
            for i, pattern in enumerate(getattr(self, key)):
                _check_regex(f"model.{key}[{i}]", pattern)


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """Calibration set: N seeded random windows of L tokens
    (docs/METHOD.md#1-calibration-statistics).

    Args:
        source: "wiki" (embedded Wikipedia, articles 0-79), a .txt/.jsonl path, or
            "hf:<name>[:<config>[:<split>]]" (needs the [data] extra and a network).
        num_samples: number of windows.
        seq_len: tokens per window.
        seed: seed of the window sampler.
        batch_size: windows per forward pass.
        dtype: compute dtype of the calibration forward ("auto" = bfloat16 on GPUs and on
            CPUs with AVX512-BF16/AMX, float32 on other CPUs, where bfloat16 is emulated;
            statistics are fp32 always).
        true_sequential: inside a block, quantize Linears group by group (q/k/v, then o, ...)
            so later groups see the already-quantized outputs of earlier ones.
        bos: BOS convention of the windows (see ``BOS_MODES``).
    """

    source: str = "wiki"
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 8
    dtype: str = "auto"
    true_sequential: bool = True
    bos: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("calib.bos", self.bos, BOS_MODES)
        _check_source("calib.source", self.source)
        _check_positive("calib.num_samples", self.num_samples)
        _check_positive("calib.seq_len", self.seq_len)
        _check_positive("calib.batch_size", self.batch_size)
        _check_choice("calib.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.source == "wiki-heldout":
            raise RecipeError(
                "calib.source='wiki-heldout' would calibrate on the evaluation articles; "
                "use calib.source=wiki (articles 0-79)"
            )


@dataclass(frozen=True, kw_only=True)
class SaliencyConfig:
    """How salient (FP16) columns are ranked and how many each matrix keeps.

    The score of input column j is ``s_j = ||D_j||_tau * ||X_j||_rho ** gamma``
    (docs/METHOD.md#2-saliency) where D = W - Q(W) uses the same MSE-clipped grid that will
    quantize the layer.

    Args:
        metric: a preset (gift, owq, quik, wanda) or "custom" (then tau/rho/gamma are used).
            The default is owq: on SmolLM2 at the paper's training budget it beat the paper's
            gift at w4, w3 and w2, before training and after it (three seeds; README,
            "Recovery at the paper's budget"). The paper found gift best on LLaMA.
        tau, rho: norms in {1, 2, inf}; gamma > 0. Only read when metric == "custom".
        count: salient columns per matrix.
        fraction: salient columns as a fraction of the matrix width (0 = none).
        avg_bits: target average bits per weight of each matrix, salient columns, scales
            and zeros included; the largest count that fits is used.
        layer_ratios: regex -> multiplier of the budget for matching Linears (OWQ-style,
            e.g. {"mlp\\.(gate|up)_proj": 0.375}).
    Give at most one of count / fraction / avg_bits; with none, ``DEFAULT_COUNT`` (the paper's
    128) is used. A ``--set`` of one of them replaces the budget the recipe file gives.
    """

    DEFAULT_COUNT: typing.ClassVar[int] = 128

    metric: str = "owq"
    tau: float = math.inf
    rho: float = math.inf
    gamma: float = 1.0
    count: int | None = None
    fraction: float | None = None
    avg_bits: float | None = None
    layer_ratios: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("saliency.metric", self.metric, (*SALIENCY_PRESETS, "custom"))
        for name in ("tau", "rho"):
            if float(getattr(self, name)) not in NORMS:
                raise RecipeError(f"saliency.{name} must be 1, 2 or inf, got {getattr(self, name)}")
        if not self.gamma > 0:
            raise RecipeError(f"saliency.gamma must be > 0, got {self.gamma}")
        given = [k for k in ("count", "fraction", "avg_bits") if getattr(self, k) is not None]
        if len(given) > 1:
            raise RecipeError(
                f"saliency: give one budget, not {given}; e.g. saliency.fraction=0.03 alone"
            )
        if self.count is not None and self.count < 0:
            raise RecipeError(f"saliency.count must be >= 0, got {self.count}")
        if self.fraction is not None and not 0 <= self.fraction < 1:
            raise RecipeError(f"saliency.fraction must be in [0, 1), got {self.fraction}")
        if self.avg_bits is not None and not 1 < self.avg_bits <= 16:
            raise RecipeError(f"saliency.avg_bits must be in (1, 16], got {self.avg_bits}")
        for pattern, ratio in self.layer_ratios.items():
            _check_regex(f"saliency.layer_ratios key {pattern!r}", pattern)
            if ratio < 0:
                raise RecipeError(f"saliency.layer_ratios[{pattern!r}] must be >= 0, got {ratio}")

    @property
    def norms(self) -> tuple[float | None, float, float]:
        """(tau, rho, gamma) of the chosen metric; tau None = no weight-error term."""
        if self.metric == "custom":
            return float(self.tau), float(self.rho), float(self.gamma)
        return SALIENCY_PRESETS[self.metric]


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How the non-salient columns of each target Linear are quantized.

    Args:
        method: a registered quantizer (gift_quant.quant.QUANTIZERS): "gptq" or "rtn".
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns sharing one scale/zero; -1 = the whole row.
        sym: symmetric grid (zero-point fixed at 2**(bits-1), the portable GPTQ v1 case).
        mse_clip: search a clipping range per group that minimises ||w - q(w)||_p (p=clip_norm).
        clip_grid, clip_max_shrink, clip_norm: the search grid: shrink factors 1, 1-1/grid, ...
            down to 1-max_shrink; GPTQ's reference values.
        damp_frac: GPTQ dampening, as a fraction of mean(diag(H)).
        block_size: GPTQ lazy-batch width; changes speed, not the result.
        order: GPTQ column order of the non-salient columns: "natural", "act" (descending
            diag(H), GPTQ's act-order), "gar" (group-aware reordering: groups by their max
            diag(H), columns inside a group by diag(H); keeps g_idx trivial), "auto" = gar when
            grouped, act when group_size == -1. Salient columns always go last.
        static_groups: with order=act, fix each group's scale/zero from the original weights
            before GPTQ runs, so g_idx stays k // group_size.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    mse_clip: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    damp_frac: float = 0.01
    block_size: int = 128
    order: str = "auto"
    static_groups: bool = False

    def __post_init__(self) -> None:
        _check_choice("quant.method", self.method, QUANTIZERS.names())
        if self.bits not in SUPPORTED_BITS:
            raise RecipeError(f"quant.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise RecipeError(
                f"quant.group_size must be -1 (whole row) or a positive divisor of the layer "
                f"width such as 32, 64, 128; got {self.group_size}"
            )
        _check_positive("quant.clip_grid", self.clip_grid)
        if not 0 <= self.clip_max_shrink < 1:
            raise RecipeError(
                f"quant.clip_max_shrink must be in [0, 1), got {self.clip_max_shrink}"
            )
        if not self.damp_frac > 0:
            raise RecipeError(f"quant.damp_frac must be > 0, got {self.damp_frac}")
        _check_positive("quant.block_size", self.block_size)
        _check_choice("quant.order", self.order, ("auto", "natural", "act", "gar"))
        if self.order == "gar" and self.group_size == -1:
            raise RecipeError(
                "quant.order=gar needs groups; use quant.order=act with group_size=-1"
            )

    @property
    def resolved_order(self) -> str:
        if self.order != "auto":
            return self.order
        return "act" if self.group_size == -1 else "gar"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Recovery fine-tuning (GIFT-SW and the baselines), docs/METHOD.md#5-gift-sw-training.

    Args:
        method: "gift" (salient columns train, Gaussian/uniform noise on the frozen rest),
            "lora" (a LoRA adapter on the same frozen quantized model, rank matched to the
            salient columns' trainable parameter count unless lora_rank is given), "dora" (the
            same with DoRA's magnitude vector, counted in the matched rank), "none".
        mode: "post" (quantize, then train: the paper's Table 2 setting) or "pre" (train the
            FP model with b_noise-bit noise, then quantize).
        noise: a registered noise kind (gift_quant.noise.NOISES): "normal"
            (N(0, (delta/2)^2) per row), "uniform" (U(-delta/2, delta/2)); or "none" (plain
            salient fine-tuning).
        b_noise: bits of the symmetric per-row grid whose step delta sets the noise; 0 = auto:
            6 in post mode, quant.bits in pre mode. The paper uses 4 in post mode; on SmolLM2
            4-bit noise lost to 6-bit noise and to no noise at w4, w3 and w2, at two budgets
            (README, "Recovery at the paper's budget"), so the default follows that.
        data: training text: "wiki" (embedded articles 0-79), a .txt / .jsonl file (chat
            records with "messages" or "prompt"/"response" train on assistant tokens only),
            "hf:<name>[:<config>[:<split>]]" (chat ``messages``, OpenOrca ``question``/
            ``response`` or plain ``text`` records), or "generated:N": N sequences of seq_len
            tokens sampled from the full-precision model itself (data-free, LLM-QAT style),
            cached on disk by model and sampling settings.
        gen_temperature, gen_top_p, gen_seed: sampling of "generated:N" (temperature, nucleus
            mass, seed); gen_batch_size: sequences generated per forward pass.
        bos: BOS convention of the training windows (see ``BOS_MODES``).
        steps: optimizer steps; batch_size x grad_accum windows of seq_len tokens per step.
        lr, weight_decay, warmup_ratio, max_grad_norm: AdamW + cosine schedule with warm-up.
        dtype: compute dtype ("auto" as calib.dtype; master weights are always float32).
        grad_checkpointing: recompute block activations in backward (less memory).
        norms: also train every normalization layer's weight (and bias), in fp32, beside the
            salient columns (train.method=gift): the paper's full fine-tuning comparison.
        kd_weight: weight of the KL term toward the FP model's next-token distribution
            (0 = plain cross-entropy; loss = (1 - w) CE + w T^2 KL); kd_temperature: T.
        lora_rank, lora_alpha: (lora and dora) 0 = matched rank, alpha = rank (scaling 1).
        eval_every: held-out perplexity every N steps (0 = only at the end), on eval_tokens.
        save_every: checkpoint every N steps (0 = only after the last step).
        seed: data order and noise.
        log_every: metrics JSON line every N steps.
        parallel: how several processes (torchrun / accelerate launch) share the work: "ddp"
            (replicated model, all-reduced gradients) or "fsdp" (trainable parameters and
            their optimizer state sharded). Ignored in a single process.
        dist_timeout_s: bound (seconds) on every collective and on the wait of the other
            ranks while rank 0 quantizes or exports; past it the run stops with an error naming
            the rank and stage instead of hanging. Raise it for very large models.
    """

    method: str = "gift"
    mode: str = "post"
    noise: str = "normal"
    b_noise: int = 0
    data: str = "wiki"
    gen_temperature: float = 1.0
    gen_top_p: float = 0.95
    gen_seed: int = 0
    gen_batch_size: int = 8
    bos: str = "auto"
    steps: int = 500
    batch_size: int = 4
    grad_accum: int = 32
    seq_len: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    dtype: str = "auto"
    grad_checkpointing: bool = False
    norms: bool = False
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 0.0
    eval_every: int = 0
    eval_tokens: int = 16384
    save_every: int = 50
    seed: int = 0
    log_every: int = 1
    parallel: str = "ddp"
    dist_timeout_s: float = 3600.0

    # keys a rerun may change without changing the result (not part of the run's identity)
    RUNTIME_KEYS: typing.ClassVar[tuple[str, ...]] = ("dist_timeout_s", "log_every", "save_every")

    def __post_init__(self) -> None:
        _check_choice("train.method", self.method, ("gift", "lora", "dora", "none"))
        _check_choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        _check_choice("train.mode", self.mode, ("post", "pre"))
        _check_choice("train.noise", self.noise, (*NOISES.names(), "none"))
        _check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _check_choice("train.bos", self.bos, BOS_MODES)
        _check_source("train.data", self.data, generated=True)
        if not self.gen_temperature > 0:
            raise RecipeError(f"train.gen_temperature must be > 0, got {self.gen_temperature}")
        if not 0 < self.gen_top_p <= 1:
            raise RecipeError(f"train.gen_top_p must be in (0, 1], got {self.gen_top_p}")
        _check_positive("train.gen_batch_size", self.gen_batch_size)
        if self.b_noise not in (0, *range(2, 9)):
            raise RecipeError(f"train.b_noise must be 0 (auto) or 2..8, got {self.b_noise}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.seq_len < 2:  # a window of one token predicts nothing
            raise RecipeError(f"train.seq_len must be >= 2, got {self.seq_len}")
        if self.steps < 0:
            raise RecipeError(f"train.steps must be >= 0, got {self.steps}")
        if not self.dist_timeout_s > 0:
            raise RecipeError(f"train.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if not self.lr > 0:
            raise RecipeError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecipeError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.kd_weight <= 1:
            raise RecipeError(f"train.kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.norms and self.method != "gift":
            raise RecipeError(
                f"train.norms=true trains the norms beside GIFT-SW's salient columns; "
                f"use train.method=gift, not {self.method!r}"
            )
        if self.data == "wiki-heldout":
            raise RecipeError("train.data='wiki-heldout' would train on the evaluation articles")
        if self.mode == "pre" and self.method != "gift":
            raise RecipeError("train.mode=pre is GIFT-SW on the FP model; use train.method=gift")

    def noise_bits(self, quant_bits: int) -> int:
        if self.b_noise:
            return self.b_noise
        return 6 if self.mode == "post" else quant_bits


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Export format options (filled in by the export stage)."""

    checkpoint_format: str = "auto"

    def __post_init__(self) -> None:
        _check_choice(
            "export.checkpoint_format", self.checkpoint_format, ("auto", "gptq", "gptq_v2")
        )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Perplexity evaluation: non-overlapping windows of ``seq_len`` tokens.

    Args:
        text: text sources ("wiki-heldout" = embedded articles 80-106, or .txt/.jsonl paths).
        seq_len: window length; each window predicts seq_len - 1 tokens.
        max_tokens: stop after this many windowed tokens (0 = all of the text).
        batch_size: windows per forward pass.
        dtype: compute dtype (float32 on CPU keeps figures comparable across runs).
        bos: BOS convention of the windows (see ``BOS_MODES``).
    """

    text: tuple[str, ...] = ("wiki-heldout",)
    seq_len: int = 512
    max_tokens: int = 0
    batch_size: int = 4
    dtype: str = "float32"
    bos: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("eval.bos", self.bos, BOS_MODES)
        if not self.text:
            raise RecipeError('eval.text is empty; name a text, e.g. eval.text=["wiki-heldout"]')
        for i, text in enumerate(self.text):
            _check_source(f"eval.text[{i}]", text)
        check_windows("eval.seq_len", self.seq_len, "eval.max_tokens", self.max_tokens)
        _check_positive("eval.batch_size", self.batch_size)
        _check_choice("eval.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The whole job. ``Recipe()`` is the default; YAML files and ``--set`` override it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-ready dict (tuples become lists, inf becomes "inf")."""
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> Recipe:
        return dataclasses.replace(self, **sections)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"  # JSON has no infinity; _coerce reads it back
    return obj


def _check_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{name} must be one of {list(choices)}, got {value!r}{hint}")


def _check_source(name: str, source: str, generated: bool = False) -> None:
    """Syntax of a text source (whether it exists is ``gift_quant.data.check_sources``'s job)."""
    if source.startswith("hf:") and not source[3:].split(":")[0]:
        raise RecipeError(f"{name}={source!r} names no dataset; use hf:<name>[:<config>[:<split>]]")
    if source.startswith("generated:"):
        n = source.removeprefix("generated:")
        if not generated:
            raise RecipeError(f"{name}={source!r}: generated text is a training source only")
        if not (n.isdigit() and int(n) > 0):
            raise RecipeError(
                f"{name}={source!r}: use generated:N with N > 0 sequences, e.g. generated:512"
            )
    if source.startswith("hf:") and source.count(":") > 3:
        raise RecipeError(
            f"{name}={source!r} has too many parts; use hf:<name>[:<config>[:<split>]]"
        )


def check_windows(seq_name: str, seq_len: int, max_name: str, max_tokens: int) -> None:
    """Evaluation windows: at least 2 tokens each (a window predicts seq_len - 1), and a token
    cap of 0 (the whole text) or at least one window."""
    if seq_len < 2:
        raise RecipeError(
            f"{seq_name} must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}"
        )
    if max_tokens < 0 or 0 < max_tokens < seq_len:
        raise RecipeError(
            f"{max_name} must be 0 (the whole text) or at least one window of {seq_len} tokens "
            f"({seq_name}), got {max_tokens}"
        )


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{name} is not a valid regular expression {pattern!r} ({exc})") from None


def _check_positive(name: str, value: int) -> None:
    if not value > 0:
        raise RecipeError(f"{name} must be > 0, got {value}")
