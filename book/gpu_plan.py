"""GPU time plan of the `full` profile: counted FLOPs per chapter and minutes on one H200.

Run `python book/gpu_plan.py` (no GPU and no download needed). For every chapter the plan reads
the chapter's `full` configuration from `ftbook` (so it follows the configs when they change),
lists the passes the chapter makes (training steps, forward-only scoring passes, sampled
replies), counts their model FLOPs with the book's own counter `transformer_flops` (eqs.
A.1-A.3 of Appendix A) on the full profile's architectures, and converts them into minutes:

    seconds of a phase = max(FLOPs / (PEAK_FLOPS * MFU of its kind),  calls * latency of one call)
    minutes of a chapter = OVERHEAD_MIN + sum of its phases / 60

The first term is the compute-bound time at a stated model-FLOPs utilisation; the second is a
floor for the small-batch, launch-bound regime (a 24-layer model in eager PyTorch cannot run a
decoding step or an optimizer step faster than its kernel launches allow, whatever its FLOPs).
Two phases are counted by an assumed wall time instead (13-08's toy runs on a 1-layer model,
13-10's llama.cpp decoding on the CPU). The table shows both the compute-bound minutes and the
planned minutes (with the floor). `BEFORE_CUTS` records the values of the cuts already applied
to the chapters' `full` configurations (`plan(BEFORE_CUTS)` is the uncut build);
`PROPOSED_CUTS` lists new values not yet applied that bring the plan within `BUDGET_MIN`, and
`main()` prints the plan as configured, the applied cuts, and the plan with the proposed ones.

Counting conventions (the book's):
- a training step whose every weight trains costs 3 forward passes (`transformer_flops(...,
  training=True)`); one where only adapters train but gradients still flow through the frozen
  network costs 2 (13-08's `policy_flops`: "2 forwards' worth when every weight trains, 1 when
  only activations need gradients" on top of the forward); a frozen backbone under a trained
  head (feature extraction) costs 1 (13-01 measures about 1/3 of full fine-tuning); gradient
  checkpointing adds one recomputed forward;
- generating replies costs one forward pass over prompt + reply per sequence (13-09's
  `grpo_train` and `expert_iteration` count generation this way);
- sequence lengths are the configured caps (`max_len`, `seq_len`), or, where the data decides,
  the stated estimates below (batch-padded, rounded up): an upper bound on FLOPs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

# --- Assumptions -------------------------------------------------------------------------------
PEAK_FLOPS = 989e12  # H200 SXM, dense bf16 tensor-core peak (no sparsity), FLOP/s
# Model-FLOPs utilisation: a conservative share of the peak that HF transformers + PyTorch eager
# reach at these sizes (0.1-0.5B parameters, a few thousand tokens per step, bf16 autocast).
MFU = {
    "train": 0.25,  # forward + backward + AdamW, batches of 2k-16k tokens
    "forward": 0.25,  # batched scoring / evaluation passes (no backward)
    "generate": 0.05,  # autoregressive sampling with a KV cache, batches of 1-128 replies
}
# Latency floor of one sequential call in the launch-bound regime, per transformer layer plus a
# fixed part (Python, sampling, loss, optimizer launch). Assumed, not measured: HF eager decoding
# of Qwen2.5-0.5B runs at roughly 20-30 ms per step whatever the batch; a small-batch training
# step of it (forward, backward, AdamW over 494M parameters) at roughly 50 ms.
FORWARD_S_PER_LAYER = 0.7e-3  # one forward call (a decoding step, a scoring batch)
TRAIN_S_PER_LAYER = 2.0e-3  # one forward + backward (+ optimizer) call
CALL_S = 3e-3  # per call, on top of the layers
OVERHEAD_MIN = 1.0  # per chapter: kernel start, imports, loading models/data, tokenizing, saving
RENDER_MIN = 2.0  # once per build: Jupyter Book renders the executed notebooks, Chromium checks
BUDGET_MIN = 60.0  # the whole full build

# Estimated token lengths where the data, not a configuration field, decides (batch-padded,
# rounded up; Qwen2.5's chat template adds its default system prompt, about 20 tokens).
SST2_DEV_ROWS = 872  # `n_dev=None`: all of SST-2 validation
REVIEW_PROMPT_TOKENS = 48  # rendered "Continue this movie review: <3-6 words>" (13-07..13-09)
SYNTHETIC_PROMPT_TOKENS = 96  # a rendered 13-06 synthetic instruction (generation prompts)
SYNTHETIC_CONVERSATION_TOKENS = 160  # a 13-06 synthetic conversation, teacher-forced
ALPACA_CONVERSATION_TOKENS = 512  # an Alpaca conversation, teacher-forced (cap 1024)
GSM8K_PROMPT_TOKENS = 192  # a rendered GSM8K question, left-padded in batches of 128
ARITHMETIC_PROMPT_TOKENS = 48  # a rendered "What is a + b?" (13-09 with rlvr_task "arithmetic")
LLAMA_CPP_DECODE_TOKENS_PER_S = 40.0  # 13-10: llama.cpp (CPU wheel), 0.5B F16/Q8_0, 1 sequence
LLAMA_CPP_PROMPT_TOKENS_PER_S = 400.0  # ... and its prompt evaluation

# Chapter literals the plan needs but no configuration holds (chapter file, what it is).
TEMPLATES_13_05 = 6  # 13-05 `TEMPLATES`: discrete prompts scored on the selection and dev rows
ENCODER_RUNS_13_05 = 6  # 13-05: prompt tuning x 3 inits, prefix tuning x 2, LoRA
LM_RUNS_13_05 = 2  # 13-05: prompt tuning and prefix tuning on the causal LM
PROBE_STEPS_13_06 = 20  # 13-06 `probe_steps["full"]`: packed vs padded, each
N_PROBE_13_06 = 64  # 13-06 `n_probe["full"]`: review and continue prompts, each
ABLATION_EVAL_13_06 = (100, 100, 64, 32)  # 13-06 `ABLATION_EVAL["full"]`
ABLATIONS_13_06 = 6  # 13-06 `ablations` (one of them, T = 2, is a snapshot of the main run)
CHECKABLE_13_06 = 4  # 13-06 `CHECKABLE` (also 13-10's `EXACT_TASKS`)
AGREEMENT_13_06 = 48  # 13-06 `agreement_set`: 12 prompts per checkable task
TOY_ARMS_13_08 = (3, 4)  # 13-08: recipe arms and fault arms, each over `toy_seeds` seeds
TOY_STEP_S = 0.05  # 13-08: one toy PPO step (1-layer model, launch-bound)
GRPO_VARIANTS_13_09 = 4  # 13-09 `rlvr_variants` besides GRPO (one seed each)
EI_EXAMPLES_PER_STEP = 16  # `expert_iteration`'s default `examples_per_step`


# --- The configurations, with proposed cuts applied on request --------------------------------
CONFIG_TABLES = {
    "FT_CONFIGS": "ftbook.full_finetuning", "LORA_CONFIGS": "ftbook.lora",
    "QLORA_CONFIGS": "ftbook.qlora", "ADAPTER_CONFIGS": "ftbook.adapters",
    "PT_CONFIGS": "ftbook.prompt_tuning", "SFT_RECIPES": "ftbook.instruction_tuning",
    "RM_CONFIGS": "ftbook.reward_modeling", "PPO_CONFIGS": "ftbook.rlhf_ppo",
    "DPO_CONFIGS": "ftbook.dpo_grpo", "EFFICIENT_CONFIGS": "ftbook.efficient_finetuning",
}
_active_cuts: dict[str, dict[str, Any]] = {}


def with_changes(config: Any, changes: dict[str, Any]) -> Any:
    """`config` (a frozen dataclass) with `changes` applied in one `dataclasses.replace` (so that
    `__post_init__` checks the result); a dict value changes a nested dataclass field."""
    values = {name: with_changes(getattr(config, name), value) if isinstance(value, dict)
              else value for name, value in changes.items()}
    return dataclasses.replace(config, **values)


def full_config(table: str) -> Any:
    """The `full` entry of the configuration dict `table` of ftbook (e.g. "FT_CONFIGS"), with
    the cuts of the plan being computed applied."""
    configs = getattr(importlib.import_module(CONFIG_TABLES[table]), table)
    return with_changes(configs["full"], _active_cuts.get(table, {}))


# --- The architectures of the full profile, on the meta device (no weights, no download) -------
@cache
def model(name: str) -> Any:
    """A meta-device model of the full profile's architecture: "encoder" (`roberta-base` with a
    two-class head), "lm" (Qwen2.5-0.5B, `Qwen/Qwen2.5-0.5B` config values), "lm-cls" (the same
    trunk with a two-class `score` head, as 13-01 and the reward model use). Enough for
    `transformer_flops`, which reads shapes and the config."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        Qwen2Config,
        RobertaConfig,
    )

    qwen = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                max_position_embeddings=32768)
    with torch.device("meta"):
        if name == "encoder":
            return AutoModelForSequenceClassification.from_config(RobertaConfig(
                vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                num_labels=2))
        if name == "lm":
            return AutoModelForCausalLM.from_config(Qwen2Config(**qwen))
        if name == "lm-cls":
            return AutoModelForSequenceClassification.from_config(Qwen2Config(**qwen,
                                                                              num_labels=2))
    raise ValueError(f"unknown model {name!r}")


def forward_flops(name: str, sequences: int, seq_len: int) -> float:
    """Forward FLOPs of `sequences` sequences of `seq_len` tokens (the book's counter)."""
    from ftbook.workbench import transformer_flops

    return transformer_flops(model(name), sequences, seq_len, training=False)


def layers(name: str) -> int:
    return model(name).config.num_hidden_layers


# --- Phases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One kind of work of a chapter: `kind` "train", "forward" or "generate" (or "fixed", whose
    `fixed_seconds` are given), its FLOPs, tokens (trained, scored or generated) and `calls`, the
    sequential launch-bound calls (optimizer micro-steps, forward batches, decoding steps)."""

    what: str
    kind: str
    model: str
    flops: float
    tokens: int
    calls: int
    fixed_seconds: float = 0.0


def train(name: str, what: str, steps: int, batch: int, seq_len: int, passes: int = 3,
          runs: int = 1) -> Phase:
    """`runs` x `steps` training steps of `batch` x `seq_len` tokens, each `passes` forward
    passes' worth of FLOPs (3: every weight trains; 2: adapters, gradients through the frozen
    network; 1: frozen backbone, head only)."""
    return Phase(what, "train", name, runs * steps * passes * forward_flops(name, batch, seq_len),
                 runs * steps * batch * seq_len, runs * steps)


def forward(name: str, what: str, sequences: int, seq_len: int, batch_size: int,
            repeats: int = 1) -> Phase:
    """`repeats` forward-only passes over `sequences` sequences of `seq_len` tokens, in batches
    of `batch_size`."""
    return Phase(what, "forward", name, repeats * forward_flops(name, sequences, seq_len),
                 repeats * sequences * seq_len, repeats * math.ceil(sequences / batch_size))


def generate(name: str, what: str, replies: int, prompt_len: int, new_tokens: int,
             batch_size: int, repeats: int = 1) -> Phase:
    """`repeats` x `replies` sampled replies of `new_tokens` tokens (the cap: a batch runs until
    its longest reply ends) to prompts of `prompt_len`, in batches of `batch_size`: one forward
    over prompt + reply per reply (the book's convention), and per batch one prefill call and
    `new_tokens` decoding calls."""
    return Phase(what, "generate", name,
                 repeats * forward_flops(name, replies, prompt_len + new_tokens),
                 repeats * replies * new_tokens,
                 repeats * math.ceil(replies / batch_size) * (new_tokens + 1))


def fixed(what: str, seconds: float) -> Phase:
    """Work counted by an assumed wall time, without model FLOPs of note."""
    return Phase(what, "fixed", "-", 0.0, 0, 0, seconds)


def call_seconds(name: str, kind: str) -> float:
    """The latency floor of one call of `kind` on model `name`."""
    per_layer = TRAIN_S_PER_LAYER if kind == "train" else FORWARD_S_PER_LAYER
    return layers(name) * per_layer + CALL_S


def compute_seconds(phase: Phase) -> float:
    """FLOPs at the stated utilisation of the phase's kind."""
    return 0.0 if phase.kind == "fixed" else phase.flops / (PEAK_FLOPS * MFU[phase.kind])


def phase_seconds(phase: Phase) -> float:
    """max(compute-bound time, calls x latency floor); fixed phases count their given seconds."""
    if phase.kind == "fixed":
        return phase.fixed_seconds
    return max(compute_seconds(phase), phase.calls * call_seconds(phase.model, phase.kind))


@dataclass
class ChapterPlan:
    chapter: str
    what: str
    phases: list[Phase] = field(default_factory=list)

    def tokens(self, kind: str) -> int:
        return sum(p.tokens for p in self.phases if p.kind == kind)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def compute_minutes(self) -> float:
        """Overhead + FLOPs at the stated utilisation (+ fixed phases)."""
        return OVERHEAD_MIN + sum(compute_seconds(p) + p.fixed_seconds for p in self.phases) / 60

    @property
    def minutes(self) -> float:
        """Overhead + every phase at max(compute-bound, latency floor): the plan."""
        return OVERHEAD_MIN + sum(phase_seconds(p) for p in self.phases) / 60


# --- One function per chapter ------------------------------------------------------------------
def plan_00_01() -> ChapterPlan:
    """Appendix A: the matmul peak, float32 and bfloat16, a warm-up and 5 timed 8192^3 matmuls
    each (`matmul_n["full"]`); everything else is CPU-side bookkeeping."""
    n, repeats = 8192, 6
    flops = 2 * repeats * 2 * n**3
    return ChapterPlan("00-01", "matmul peak, 2 dtypes x 6 matmuls of 8192^3",
                       [Phase("matmul peak", "forward", "lm", flops, 0, 2 * repeats)])


def plan_00_02() -> ChapterPlan:
    """Appendix B: loads and inspects the data; no model runs."""
    return ChapterPlan("00-02", "data only (no model)")


def plan_00_03() -> ChapterPlan:
    """Appendix C: in full nothing is pretrained; the hub models are loaded and their chat
    template checked (no forward pass of note)."""
    return ChapterPlan("00-03", "loads the hub models; no pretraining in full")


def plan_13_01() -> ChapterPlan:
    """13-01, `FT_CONFIGS["full"]`. Encoder (`roberta-base`), `steps` steps of `batch_size` x
    `max_len` each: feature extraction (forward only) and full fine-tuning, both evaluated on the
    dev set at steps 0, steps/2 and steps, plus one counted step each. Causal LM as classifier
    (Qwen2.5-0.5B + score head), `lm_steps` steps each: feature extraction, one full run per
    `lm_lrs` and two strategy runs (constant rate, layer-wise rates); every `lm_eval_every` steps
    dev accuracy on `lm_n_dev` rows and the backbone's perplexity on the held-out English texts
    (at most `lm_eval_texts`, 256 tokens, batches of 16), and at the end each text alone."""
    from ftbook.base_models import BASE_LM_CONFIGS, perplexity

    cfg = full_config("FT_CONFIGS")
    n_dev = cfg.n_dev or SST2_DEV_ROWS
    lm_dev = cfg.lm_n_dev or n_dev
    held = BASE_LM_CONFIGS.get("full", BASE_LM_CONFIGS["tiny"])
    texts = min(cfg.lm_eval_texts, held.heldout_wiki_articles + held.heldout_c4_docs)
    text_len = inspect.signature(perplexity).parameters["max_len"].default
    lm_full_runs = len(cfg.lm_lrs) + 2
    lm_runs = 1 + lm_full_runs
    lm_evals = lm_runs * (cfg.lm_steps // cfg.lm_eval_every) + 1  # step 0 once
    b, seq = cfg.batch_size, cfg.max_len
    phases = [
        train("encoder", "feature extraction", cfg.steps + 1, b, seq, passes=1),
        train("encoder", "full fine-tuning", cfg.steps + 1, b, seq),
        forward("encoder", "dev evaluations", n_dev, seq, 128, repeats=2 * 3),
        train("lm-cls", "LM feature extraction", cfg.lm_steps, b, seq, passes=1),
        train("lm-cls", "LM full fine-tuning", cfg.lm_steps, b, seq, runs=lm_full_runs),
        forward("lm-cls", "LM dev evaluations", lm_dev, seq, 128, repeats=lm_evals),
        forward("lm", "held-out perplexity", texts, text_len, 16, repeats=lm_evals),
        forward("lm", "per-text perplexity", texts, text_len, 1, repeats=lm_runs),
    ]
    return ChapterPlan("13-01", f"encoder FE + FT {cfg.steps} steps; Qwen FE + {lm_full_runs} FT "
                       f"runs x {cfg.lm_steps} steps (b {cfg.batch_size} x {cfg.max_len})",
                       phases)


def plan_13_02() -> ChapterPlan:
    """13-02, `LORA_CONFIGS["full"]` with 13-01's data and batch: LoRA on the encoder for every
    placement x seed, every other rank x seed and every other alpha x seed, at `sweep_steps`;
    the headline run at 13-01's `steps`; dev accuracy after each run; the speed comparison
    (ours vs PEFT, `speed_steps` x 2 steps each). LoRA steps count 2 forward passes."""
    cfg, ft = full_config("LORA_CONFIGS"), full_config("FT_CONFIGS")
    seeds = len(cfg.seeds)
    sweep = seeds * (len(cfg.placements) + len([r for r in cfg.ranks if r != cfg.rank])
                     + len([a for a in cfg.alphas if a != cfg.alpha]))
    b, seq = ft.batch_size, ft.max_len
    phases = [
        train("encoder", "sweep runs", cfg.sweep_steps, b, seq, passes=2, runs=sweep),
        train("encoder", "headline run", ft.steps, b, seq, passes=2),
        train("encoder", "speed vs PEFT", 2 * 2 * cfg.speed_steps, b, seq, passes=2),
        forward("encoder", "dev evaluations", ft.n_dev or SST2_DEV_ROWS, seq, 128,
                repeats=sweep + 1),
    ]
    return ChapterPlan("13-02", f"{sweep} LoRA sweep runs x {cfg.sweep_steps} + 1 x {ft.steps} "
                       f"steps (encoder)", phases)


def plan_13_03() -> ChapterPlan:
    """13-03, `QLORA_CONFIGS["full"]` with 13-01's data and batch: LoRA and QLoRA (all linear
    layers) on the encoder for `steps` steps each (2 forward passes a step; NF4 dequantisation is
    memory traffic, not FLOPs), dev accuracy of each, one measured step per method (full, LoRA,
    QLoRA) and `timing_repeats` + 1 forwards of each model. Quantising the causal LM's weights
    is not matmul work (overhead)."""
    cfg, ft = full_config("QLORA_CONFIGS"), full_config("FT_CONFIGS")
    b, seq = ft.batch_size, ft.max_len
    phases = [
        train("encoder", "LoRA and QLoRA runs", cfg.steps, b, seq, passes=2, runs=2),
        train("encoder", "memory breakdown", 1, b, seq, runs=3),
        forward("encoder", "dev evaluations", ft.n_dev or SST2_DEV_ROWS, seq, 128, repeats=2),
        forward("encoder", "forward timing", b, seq, b, repeats=2 * (cfg.timing_repeats + 1)),
    ]
    return ChapterPlan("13-03", f"LoRA + QLoRA x {cfg.steps} steps (encoder)", phases)


def plan_13_04() -> ChapterPlan:
    """13-04, `ADAPTER_CONFIGS["full"]`: every method of `METHODS` x every seed for `steps` steps
    of `batch_size` x 13-01's `max_len` (+ `num_virtual_tokens` for prompt and prefix tuning,
    counted as longer sequences); feature extraction 1 forward pass a step, full fine-tuning 3,
    the adapters 2; dev accuracy after each run; the adapter bank: tasks A, B and A over B,
    `bank_steps` LoRA steps each, about 10 evaluations; `latency_repeats` forwards of 8 models."""
    from ftbook.adapters import METHODS

    cfg, ft = full_config("ADAPTER_CONFIGS"), full_config("FT_CONFIGS")
    seeds, b = len(cfg.seeds), cfg.batch_size
    passes = {"feature extraction": 1, "full fine-tuning": 3}
    phases = []
    for method in METHODS:
        seq = ft.max_len + (cfg.num_virtual_tokens if method in ("prompt tuning",
                                                                 "prefix tuning") else 0)
        phases.append(train("encoder", method, cfg.steps, b, seq, passes=passes.get(method, 2),
                            runs=seeds))
    phases += [
        forward("encoder", "dev evaluations", cfg.n_dev or SST2_DEV_ROWS,
                ft.max_len + cfg.num_virtual_tokens, 128, repeats=len(METHODS) * seeds),
        train("encoder", "adapter bank", cfg.bank_steps, b, ft.max_len, passes=2, runs=3),
        forward("encoder", "bank evaluations", cfg.n_dev or SST2_DEV_ROWS, ft.max_len, 128,
                repeats=10),
        forward("encoder", "latency", 32, ft.max_len + cfg.num_virtual_tokens, 32,
                repeats=8 * cfg.latency_repeats),
    ]
    return ChapterPlan("13-04", f"{len(METHODS)} methods x {seeds} seeds x {cfg.steps} steps; "
                       f"bank 3 x {cfg.bank_steps} (encoder)", phases)


def plan_13_05() -> ChapterPlan:
    """13-05, `PT_CONFIGS["full"]`: the discrete templates (`TEMPLATES_13_05`), each scored on
    `n_select` + dev rows by Qwen2.5-0.5B-Instruct (`encode_prompted`'s `max_len` tokens);
    prompt and prefix tuning of the causal LM, `lm_steps` steps of `batch_size` x (prompt +
    `num_virtual_tokens`), 2 forward passes a step, evaluated at steps 0 and `lm_steps`; the
    encoder runs (3 prompt inits, 2 prefix variants, LoRA), `encoder_steps` steps each."""
    from ftbook.prompt_tuning import encode_prompted

    cfg, ft = full_config("PT_CONFIGS"), full_config("FT_CONFIGS")
    n_dev = cfg.n_dev or SST2_DEV_ROWS
    prompted = inspect.signature(encode_prompted).parameters["max_len"].default
    lm_seq = prompted + cfg.num_virtual_tokens
    phases = [
        forward("lm", "discrete templates", cfg.n_select + n_dev, prompted, 64,
                repeats=TEMPLATES_13_05),
        train("lm", "LM prompt + prefix tuning", cfg.lm_steps, cfg.batch_size, lm_seq, passes=2,
              runs=LM_RUNS_13_05),
        forward("lm", "LM dev evaluations", n_dev, lm_seq, 64, repeats=2 * LM_RUNS_13_05),
        train("encoder", "encoder runs", cfg.encoder_steps, cfg.batch_size,
              ft.max_len + cfg.num_virtual_tokens, passes=2, runs=ENCODER_RUNS_13_05),
        forward("encoder", "encoder dev evaluations", n_dev, ft.max_len + cfg.num_virtual_tokens,
                128, repeats=ENCODER_RUNS_13_05),
    ]
    return ChapterPlan("13-05", f"Qwen-Instruct {LM_RUNS_13_05} x {cfg.lm_steps} steps; encoder "
                       f"{ENCODER_RUNS_13_05} x {cfg.encoder_steps} steps", phases)


def plan_13_06() -> ChapterPlan:
    """13-06, `SFT_RECIPES["full"]` (full fine-tuning when `lora_rank` is None): the packing
    probe (`PROBE_STEPS_13_06` steps packed, as many padded with 4 x `rows_per_step` examples
    of up to `seq_len`), the SFT run (`steps` x `rows_per_step` x `seq_len`, packed), the
    ablations (all but the T = 2 snapshot retrained for `ablation_steps`), the full evaluation
    of the chat LM and of the SFT model (teacher-forced held-out examples, Alpaca held-out,
    greedy replies to the probe prompts), the ablation evaluations (`ABLATION_EVAL_13_06`),
    the scorer-agreement and sample replies."""
    from ftbook.instruction_tuning import SYNTHETIC_TASKS

    r = full_config("SFT_RECIPES")
    passes = 3 if r.lora_rank is None else 2
    per_task, n_alpaca, n_gen, gen_tokens = ABLATION_EVAL_13_06

    def evaluation(tag: str, per_task: int, n_alpaca: int, n_gen: int, new: int, times: int
                   ) -> list[Phase]:
        return [forward("lm", f"{tag}: teacher-forced", CHECKABLE_13_06 * per_task,
                        SYNTHETIC_CONVERSATION_TOKENS, 32, repeats=times),
                forward("lm", f"{tag}: Alpaca held-out", n_alpaca,
                        min(r.seq_len, ALPACA_CONVERSATION_TOKENS), 32, repeats=times),
                generate("lm", f"{tag}: greedy replies", n_gen, SYNTHETIC_PROMPT_TOKENS, new, 32,
                         repeats=times)]

    phases = [
        train("lm", "packing probe (packed)", PROBE_STEPS_13_06, r.rows_per_step, r.seq_len,
              passes),
        train("lm", "packing probe (padded)", PROBE_STEPS_13_06, 4 * r.rows_per_step, r.seq_len,
              passes),
        train("lm", "SFT run", r.steps, r.rows_per_step, r.seq_len, passes),
        train("lm", "ablations", r.ablation_steps, r.rows_per_step, r.seq_len, passes,
              runs=ABLATIONS_13_06 - 1),
        forward("lm", "prefix-sharing check", 24, SYNTHETIC_CONVERSATION_TOKENS, 32, repeats=2),
        *evaluation("full evaluation", r.n_heldout_per_task, r.n_alpaca_heldout,
                    2 * N_PROBE_13_06, r.max_new_tokens, 2),
        *evaluation("ablation evaluation", per_task, n_alpaca, n_gen, gen_tokens,
                    ABLATIONS_13_06),
        generate("lm", "agreement + samples", AGREEMENT_13_06 + 2 * len(SYNTHETIC_TASKS),
                 SYNTHETIC_PROMPT_TOKENS, r.max_new_tokens, 32),
    ]
    return ChapterPlan("13-06", f"SFT {r.steps} steps x {r.rows_per_step} x {r.seq_len} + "
                       f"{ABLATIONS_13_06 - 1} ablations x {r.ablation_steps} (Qwen)", phases)


def plan_13_07() -> ChapterPlan:
    """13-07, `RM_CONFIGS["full"]`: the gold classifier (13-01's full fine-tuning recipe on the
    encoder, retrained here); `samples_per_prompt` replies to `n_train_prompts` prompts and
    `bon_max_n` to `bon_prompts` held-out prompts, sampled by the SFT model; the gold reward of
    every reply; the reward model (Qwen trunk + scalar head, every weight when
    `train_backbone`) trained `steps` steps on `batch_size` pairs (2 sequences each), evaluated
    on the held-out pairs at step 0 and every `eval_every` steps and once more after training;
    best-of-n scoring of every held-out sample."""
    cfg, ft = full_config("RM_CONFIGS"), full_config("FT_CONFIGS")
    k = cfg.samples_per_prompt
    train_pairs = cfg.n_train_prompts * k * (k - 1) // 2
    samples = cfg.n_train_prompts * k + cfg.bon_prompts * cfg.bon_max_n
    heldout_pairs = cfg.bon_prompts * cfg.bon_max_n // 2
    seq = min(cfg.max_len, REVIEW_PROMPT_TOKENS + cfg.max_new_tokens)
    evals = (cfg.steps // cfg.eval_every + 1) if cfg.eval_every else 0
    passes = 3 if cfg.train_backbone else 1
    phases = [
        train("encoder", "gold classifier", ft.steps, ft.batch_size, ft.max_len),
        forward("encoder", "gold dev accuracy", ft.n_dev or SST2_DEV_ROWS, ft.max_len, 128),
        generate("lm", "SFT samples", samples, REVIEW_PROMPT_TOKENS, cfg.max_new_tokens,
                 cfg.generate_batch_size),
        forward("encoder", "gold labels", samples, ft.max_len, 64, repeats=2),
        train("lm-cls", f"reward model ({train_pairs} pairs)", cfg.steps, 2 * cfg.batch_size,
              seq, passes),
        forward("lm-cls", "held-out pair evaluations", 2 * heldout_pairs, seq,
                2 * cfg.batch_size, repeats=evals),
        forward("lm-cls", "held-out scores + best-of-n", 2 * heldout_pairs
                + cfg.bon_prompts * cfg.bon_max_n, seq, cfg.score_batch_size),
    ]
    return ChapterPlan("13-07", f"gold {ft.steps} steps (encoder); {samples} samples; RM "
                       f"{cfg.steps} steps x {cfg.batch_size} pairs (Qwen)", phases)


def ppo_eval_phases(tag: str, cfg: Any, runs: int) -> list[Phase]:
    """13-08's `evaluate_task`, `runs` times: a reply to each of `n_eval_prompts` held-out
    prompts, the reference's log-probabilities, the reward model's scores, the gold reward."""
    seq = REVIEW_PROMPT_TOKENS + cfg.ppo.max_new_tokens
    n = cfg.n_eval_prompts
    return [generate("lm", f"{tag}: replies", n, REVIEW_PROMPT_TOKENS, cfg.ppo.max_new_tokens,
                     cfg.eval_batch_size, repeats=runs),
            forward("lm", f"{tag}: reference", n, seq, cfg.eval_batch_size, repeats=runs),
            forward("lm-cls", f"{tag}: reward model", n, seq, 32, repeats=runs),
            forward("encoder", f"{tag}: gold", n, 64, 64, repeats=2 * runs)]


def ppo_runs(cfg: Any) -> int:
    """The language-model PPO runs of `rlhf_runs`: `main_seeds` at the main beta,
    `frontier_seeds` at every other beta, one without reward normalisation."""
    return cfg.main_seeds + (len(cfg.frontier_betas) - 1) * cfg.frontier_seeds + 1


def plan_13_08() -> ChapterPlan:
    """13-08, `PPO_CONFIGS["full"]`: per PPO step of every run (`ppo_runs`) a rollout of
    `batch_size` replies (`max_new_tokens`, one decoding call per token), the reference's and
    the reward model's forward passes, the gold monitor (2 encoder passes), and `ppo_epochs` x
    `num_minibatches` optimizer steps over the batch (3 forward passes a row when every weight
    trains, 2 with LoRA); the reward normalisation (`norm_batches` rollouts), the held-out
    evaluation of the SFT policy and of every run; the toy runs (tiny model: latency only,
    `TOY_STEP_S` a step)."""
    cfg = full_config("PPO_CONFIGS")
    p = cfg.ppo
    runs = ppo_runs(cfg)
    seq = REVIEW_PROMPT_TOKENS + p.max_new_tokens
    steps = runs * cfg.steps
    passes = 3 if cfg.lora_rank is None else 2
    toy_steps = cfg.toy_steps * (2 + 2 * 1.5) + cfg.toy_seeds * cfg.toy_steps * sum(TOY_ARMS_13_08)
    phases = [
        generate("lm", "rollouts", p.batch_size, REVIEW_PROMPT_TOKENS, p.max_new_tokens,
                 p.batch_size, repeats=steps + p.norm_batches),
        forward("lm", "reference", p.batch_size, seq, p.batch_size, repeats=steps),
        forward("lm-cls", "reward model", p.batch_size, seq, 32, repeats=steps + p.norm_batches),
        forward("encoder", "gold monitor", p.batch_size, 64, 64, repeats=2 * steps),
        train("lm", "PPO updates", steps * p.ppo_epochs * p.num_minibatches,
              p.batch_size // p.num_minibatches, seq, passes),
        *ppo_eval_phases("evaluation", cfg, runs + 1),
        fixed("toy runs", toy_steps * TOY_STEP_S),
    ]
    return ChapterPlan("13-08", f"{runs} PPO runs x {cfg.steps} steps x {p.batch_size} replies "
                       f"of {p.max_new_tokens} tokens (Qwen)", phases)


def plan_13_09() -> ChapterPlan:
    """13-09, `DPO_CONFIGS["full"]`. RLVR on `rlvr_task` (GSM8K in full: prompts of
    `GSM8K_PROMPT_TOKENS`; arithmetic: `ARITHMETIC_PROMPT_TOKENS`): the start
    model's evaluation; GRPO over every seed plus `GRPO_VARIANTS_13_09` variants (one seed),
    each `rlvr_steps` steps of `rlvr_prompts_per_step` x `rlvr_group_size` sampled replies of up
    to `rlvr_max_new_tokens`, the old-policy pass (counted for every variant), training in
    microbatches (the epochs variant `rlvr_epochs` times), greedy evaluation of `rlvr_eval`
    problems every `rlvr_eval_every` steps; expert iteration per seed, `ei_rounds` rounds that
    sample as many replies as GRPO and train `ei_sft_steps` SFT steps, evaluated after each
    round where the sample count matches GRPO's checkpoints. DPO on 13-07's pairs: the
    reference log-probabilities once, the timing runs, `dpo_betas` x `seeds` runs of
    `dpo_steps` steps, each followed by 13-08's held-out evaluation and the held-out pairs."""
    cfg = full_config("DPO_CONFIGS")
    rm, ppo = full_config("RM_CONFIGS"), full_config("PPO_CONFIGS")
    passes = 3 if cfg.lora_rank is None else 2
    prompt = GSM8K_PROMPT_TOKENS if cfg.rlvr_task == "gsm8k" else ARITHMETIC_PROMPT_TOKENS
    new = cfg.rlvr_max_new_tokens
    seq = prompt + new
    rows = cfg.rlvr_prompts_per_step * cfg.rlvr_group_size
    grpo_runs = len(cfg.seeds) + GRPO_VARIANTS_13_09
    grpo_steps = grpo_runs * cfg.rlvr_steps
    micro = rows // cfg.microbatch_size
    ei_prompts = cfg.rlvr_steps * cfg.rlvr_prompts_per_step // cfg.ei_rounds
    ei_replies = ei_prompts * cfg.rlvr_group_size
    every = cfg.rlvr_eval_every * rows
    ei_evals = sum((r * ei_replies) % every == 0 for r in range(1, cfg.ei_rounds + 1))
    evals = 1 + grpo_runs * (cfg.rlvr_steps // cfg.rlvr_eval_every) + len(cfg.seeds) * ei_evals
    k = rm.samples_per_prompt
    train_pairs = rm.n_train_prompts * k * (k - 1) // 2
    heldout_pairs = rm.bon_prompts * rm.bon_max_n // 2
    dpo_seq = min(rm.max_len, REVIEW_PROMPT_TOKENS + rm.max_new_tokens)
    dpo_runs = len(cfg.dpo_betas) * len(cfg.seeds)
    b = 2 * cfg.dpo_batch_size
    phases = [
        generate("lm", "GRPO rollouts", rows, prompt, new, cfg.generate_batch_size,
                 repeats=grpo_steps),
        forward("lm", "GRPO old-policy pass", rows, seq, cfg.microbatch_size, repeats=grpo_steps),
        train("lm", "GRPO updates", (grpo_steps + cfg.rlvr_steps * (cfg.rlvr_epochs - 1))
              * micro, cfg.microbatch_size, seq, passes),
        generate("lm", "expert-iteration samples", ei_replies, prompt, new,
                 cfg.generate_batch_size, repeats=len(cfg.seeds) * cfg.ei_rounds),
        train("lm", "expert-iteration SFT", cfg.ei_sft_steps, EI_EXAMPLES_PER_STEP, seq, passes,
              runs=len(cfg.seeds) * cfg.ei_rounds),
        generate("lm", "GSM8K evaluations", cfg.rlvr_eval, prompt, new, cfg.generate_batch_size,
                 repeats=evals),
        forward("lm", "DPO reference log-probs", 2 * (train_pairs + heldout_pairs), dpo_seq, b),
        train("lm", "DPO timing runs", cfg.timing_steps, b, dpo_seq, passes, runs=2),
        forward("lm", "DPO timing reference", b, dpo_seq, b, repeats=cfg.timing_steps),
        train("lm", "DPO runs", cfg.dpo_steps, b, dpo_seq, passes, runs=dpo_runs),
        forward("lm", "DPO held-out pairs", 2 * heldout_pairs, dpo_seq, b, repeats=dpo_runs),
        *ppo_eval_phases("DPO evaluation", ppo, dpo_runs),
    ]
    return ChapterPlan("13-09", f"{grpo_runs} GRPO runs x {cfg.rlvr_steps} steps x {rows} "
                       f"replies of {new}; EI {len(cfg.seeds)} x {cfg.ei_rounds} rounds; "
                       f"{dpo_runs} DPO runs x {cfg.dpo_steps} steps (Qwen)", phases)


def plan_13_10() -> ChapterPlan:
    """13-10, `EFFICIENT_CONFIGS["full"]`: two QLoRA runs (PEFT + TRL, Unsloth) of `steps`
    steps of `batch_size` x `max_len` (the cap; examples are padded to the longest in the
    batch), 2 forward passes a step + 1 recomputed forward with `gradient_checkpointing`;
    greedy decoding of `n_eval` prompts one at a time by the merged model and its two GGUF
    exports in transformers; the exact-match evaluation of the chat LM and of the fine-tuned
    model on `n_accuracy` prompts per task (batches of 32); llama.cpp (CPU wheel) decoding the
    `n_eval` prompts for both exports."""
    cfg = full_config("EFFICIENT_CONFIGS")
    passes = 2 + (1 if cfg.gradient_checkpointing else 0)
    n_accuracy = CHECKABLE_13_06 * cfg.n_accuracy
    phases = [
        train("lm", "QLoRA runs (PEFT, Unsloth)", cfg.steps, cfg.batch_size, cfg.max_len,
              passes, runs=2),
        generate("lm", "greedy, 3 transformers runtimes", cfg.n_eval, SYNTHETIC_PROMPT_TOKENS,
                 cfg.max_new_tokens, 1, repeats=3),
        generate("lm", "exact match before/after", n_accuracy, SYNTHETIC_PROMPT_TOKENS,
                 cfg.max_new_tokens, 32, repeats=2),
        fixed("llama.cpp F16 + Q8_0 (CPU)", 2 * cfg.n_eval * (
            SYNTHETIC_PROMPT_TOKENS / LLAMA_CPP_PROMPT_TOKENS_PER_S
            + cfg.max_new_tokens / LLAMA_CPP_DECODE_TOKENS_PER_S)),
    ]
    return ChapterPlan("13-10", f"2 QLoRA runs x {cfg.steps} steps x {cfg.batch_size} x "
                       f"{cfg.max_len} (Qwen); decoding checks", phases)


# --- Cuts: applied ones (the values before them) and proposed ones ------------------------------
# Each cut keeps the chapter's design (methods, arms, comparisons at equal budgets) and removes
# repetitions: seeds, steps, sweep points, evaluation sizes.
#
# Applied to the `full` configurations in the chapters: the values they had before, so that
# `plan(BEFORE_CUTS)` reproduces the plan of the uncut build (379 minutes) and `main()` can print
# old -> new. Learning rates were not changed.
BEFORE_CUTS: dict[str, dict[str, Any]] = {
    # 13-01 (and 13-07's gold classifier, trained with this recipe): half an epoch of SST-2 is
    # enough for roberta-base; the LM runs still evaluate every 100 steps
    "FT_CONFIGS": dict(steps=2000, lm_steps=600),
    # 13-02: 2 seeds (a spread remains) and shorter sweep runs; the headline run keeps 13-01's
    "LORA_CONFIGS": dict(seeds=(0, 1, 2), sweep_steps=1000),
    # 13-04: 7 methods x 2 seeds at 400 steps; the adapter bank at 300 steps per task
    "ADAPTER_CONFIGS": dict(seeds=(0, 1, 2), steps=1000, bank_steps=500),
    # 13-05
    "PT_CONFIGS": dict(lm_steps=1000, encoder_steps=1000),
    # 13-06: the SFT run itself is kept; the five ablation runs are halved
    "SFT_RECIPES": dict(ablation_steps=300),
    # 13-07: best-of-n up to 64 (16,384 held-out samples -> 4,096; also 13-09's held-out pairs)
    "RM_CONFIGS": dict(bon_max_n=256),
    # 13-08: 5 runs (3 betas, 2 seeds at the main one, no-normalisation arm) of 40 steps, 8
    # updates a step (minibatches of 32); 2 toy seeds. Sampling 48 tokens per step dominates.
    "PPO_CONFIGS": dict(steps=200, frontier_betas=(0.02, 0.05, 0.1, 0.2, 0.5), main_seeds=3,
                        frontier_seeds=2, toy_seeds=3, ppo={"num_minibatches": 4}),
    # 13-09: two seeds (GRPO, expert iteration and every DPO beta); GRPO (and its 4 variants) 10
    # steps of 32 x 8 replies, one generation batch of 256 each (the same 2,560 replies per run
    # as 20 steps of 16 x 8, with half the decoding calls), evaluated on 200 problems at steps 5
    # and 10; expert iteration in 2 rounds (its checkpoints match GRPO's); DPO at 3 betas, 250
    # steps. Decoding 256 tokens per GRPO step dominates.
    "DPO_CONFIGS": dict(seeds=(0, 1, 2), generate_batch_size=128,
                        dpo_betas=(0.05, 0.1, 0.3, 1.0, 3.0), dpo_steps=500, rlvr_eval=500,
                        rlvr_steps=100, rlvr_eval_every=20, ei_rounds=5),
    # 13-10: 200 QLoRA steps on examples cut at 512 tokens; 16 prompts through every runtime
    "EFFICIENT_CONFIGS": dict(n_train=20_000, steps=500, max_len=1024, n_eval=64,
                              n_accuracy=200, timeout_s=3600),
}

# Proposed, not applied: new values for the `full` configurations; `main()` prints the plan with
# them too. A value equal to the configuration's (once applied) is dropped by `pending_cuts`.
PROPOSED_CUTS: dict[str, dict[str, Any]] = {}


def _current(table: str) -> Any:
    return getattr(importlib.import_module(CONFIG_TABLES[table]), table)["full"]


def _differences(config: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """The entries of `changes` that differ from `config`'s values (nested dicts recursively)."""
    out = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            nested = _differences(getattr(config, name), value)
            if nested:
                out[name] = nested
        elif getattr(config, name) != value:
            out[name] = value
    return out


def pending_cuts(cuts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`cuts` without the values the configurations already have."""
    out = {}
    for table, changes in cuts.items():
        diff = _differences(_current(table), changes)
        if diff:
            out[table] = diff
    return out


def _flatten(changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in changes.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _value(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def cuts_table(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]] | None = None
               ) -> str:
    """A markdown table, one row per configuration: `field old -> new` for every field of `old`
    (the values before) with the values of `new` (default: the configurations as they are)."""
    lines = ["| configuration | field: before -> now |", "|---|---|"]
    for table, changes in old.items():
        config = with_changes(_current(table), (new or {}).get(table, {}))
        fields = ", ".join(f"`{name}` {value} -> {_value(config, name)}"
                           for name, value in _flatten(changes).items())
        lines.append(f"| `{table}[\"full\"]` | {fields} |")
    return "\n".join(lines)


CHAPTERS: dict[str, Callable[[], ChapterPlan]] = {
    "00-01": plan_00_01, "00-02": plan_00_02, "00-03": plan_00_03,
    "13-01": plan_13_01, "13-02": plan_13_02, "13-03": plan_13_03, "13-04": plan_13_04,
    "13-05": plan_13_05, "13-06": plan_13_06, "13-07": plan_13_07, "13-08": plan_13_08,
    "13-09": plan_13_09, "13-10": plan_13_10,
}


# --- The table ---------------------------------------------------------------------------------
def plan(cuts: dict[str, dict[str, Any]] | None = None) -> list[ChapterPlan]:
    """Every chapter's plan, in build order, from the configurations as they are or with `cuts`
    ({table: {field: new value}}, e.g. `PROPOSED_CUTS`) applied."""
    global _active_cuts
    previous, _active_cuts = _active_cuts, dict(cuts or {})
    try:
        return [make() for make in CHAPTERS.values()]
    finally:
        _active_cuts = previous


def total_minutes(plans: list[ChapterPlan]) -> float:
    """The build: every chapter's planned minutes and the rendering."""
    return sum(p.minutes for p in plans) + RENDER_MIN


def _tokens(n: int) -> str:
    return "-" if n == 0 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def markdown_table(plans: list[ChapterPlan]) -> str:
    """chapter | what runs | training / scored / generated tokens | PFLOP | minutes, with the
    rendering and the total as the last rows."""
    lines = ["| chapter | what runs | training tokens | scored tokens | generated tokens | "
             "PFLOP | min, compute-bound | min, plan |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for p in plans:
        lines.append(f"| {p.chapter} | {p.what} | {_tokens(p.tokens('train'))} | "
                     f"{_tokens(p.tokens('forward'))} | {_tokens(p.tokens('generate'))} | "
                     f"{p.flops / 1e15:.1f} | {p.compute_minutes:.1f} | {p.minutes:.1f} |")
    lines.append(f"| build | render + site check | | | | | {RENDER_MIN:.1f} | {RENDER_MIN:.1f} |")
    compute = sum(p.compute_minutes for p in plans) + RENDER_MIN
    lines.append(f"| **total** | | | | | {sum(p.flops for p in plans) / 1e15:.1f} | "
                 f"{compute:.1f} | **{total_minutes(plans):.1f}** |")
    return "\n".join(lines)


def phase_table(chapter: ChapterPlan) -> str:
    """The phases of one chapter: FLOPs, calls, compute-bound and planned seconds."""
    lines = [f"{chapter.chapter}: {'phase':<38} {'PFLOP':>8} {'calls':>8} {'s@MFU':>8} "
             f"{'s plan':>8}"]
    for ph in chapter.phases:
        lines.append(f"       {ph.what:<38} {ph.flops / 1e15:8.2f} {ph.calls:8d} "
                     f"{compute_seconds(ph):8.1f} {phase_seconds(ph):8.1f}")
    return "\n".join(lines)


def verdict(plans: list[ChapterPlan]) -> str:
    total = total_minutes(plans)
    fits = "fits" if total <= BUDGET_MIN else "does NOT fit"
    compute = sum(p.compute_minutes for p in plans) + RENDER_MIN
    return (f"total {total:.1f} min: {fits} the {BUDGET_MIN:.0f}-minute budget "
            f"(compute-bound alone: {compute:.1f} min)")


def main() -> None:
    print(f"Assumptions: peak {PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 dense bf16); MFU "
          + ", ".join(f"{k} {v:.2f}" for k, v in MFU.items())
          + f"; latency floor per call {FORWARD_S_PER_LAYER * 1e3:.1f} ms/layer (forward), "
          f"{TRAIN_S_PER_LAYER * 1e3:.1f} ms/layer (training) + {CALL_S * 1e3:.0f} ms; "
          f"overhead {OVERHEAD_MIN:g} min per chapter, {RENDER_MIN:g} min rendering\n")
    plans = plan()
    before = plan(BEFORE_CUTS)
    print("## The configurations as they are\n")
    print(markdown_table(plans))
    print(f"\n{verdict(plans)}\n")
    print(f"Before the applied cuts: {verdict(before)}\n")
    print("## Applied cuts (values before -> as they are)\n")
    print(cuts_table(BEFORE_CUTS))
    print()
    proposed = pending_cuts(PROPOSED_CUTS)
    if not proposed:
        print("No cuts proposed (PROPOSED_CUTS is applied or empty).")
        return
    cut = plan(proposed)
    print("## With PROPOSED_CUTS (not applied)\n")
    print("| configuration | field: now -> proposed |\n|---|---|")
    for table, changes in proposed.items():
        config = _current(table)
        print(f"| `{table}[\"full\"]` | " + ", ".join(
            f"`{name}` {_value(config, name)} -> {value}"
            for name, value in _flatten(changes).items()) + " |")
    print()
    print(markdown_table(cut))
    print(f"\n{verdict(cut)}\n")
    print("## Phases (as they are | with the proposed cuts)\n")
    for chapter, after in zip(plans, cut, strict=True):
        if chapter.phases:
            print(phase_table(chapter))
            if after != chapter:
                print(phase_table(after))


if __name__ == "__main__":
    main()
