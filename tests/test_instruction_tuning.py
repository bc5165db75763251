"""Tests of ftbook.instruction_tuning (chapter 13-06): conversation formats, the CS336
Assignment 5 contracts (eqs. 6.2, 6.3), gradient accumulation, and packing."""
import copy

import pytest
import torch
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from ftbook.data import DataFormatError
from ftbook.instruction_tuning import (
    compute_entropy,
    from_alpaca,
    from_dolly,
    from_oasst,
    get_response_log_probs,
    log_softmax_tolerance,
    masked_normalize,
    pack_examples,
    packed_attention_mask,
    packed_batches,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
    transformer_tolerance,
    validate_conversation,
)
from ftbook.workbench import rounding_bound, unit_roundoff


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 63) for c in text]}


def toy_lm(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed=seed, max_position_embeddings=2048).train()


# --- formats --------------------------------------------------------------------------------------

def test_alpaca_puts_the_input_after_the_instruction():
    conv = from_alpaca({"instruction": "Sum these.", "input": "2 3", "output": "5"})
    assert conv == [{"role": "user", "content": "Sum these.\n\n2 3"},
                    {"role": "assistant", "content": "5"}]
    assert from_alpaca({"instruction": "Hi", "input": "", "output": "Hello"})[0]["content"] == "Hi"


@pytest.mark.parametrize("record, field", [
    ({"instruction": "x", "input": "", "output": " "}, "output"),
    ({"input": "", "output": "y"}, "instruction"),
    ({"instruction": 3, "input": "", "output": "y"}, "instruction"),
])
def test_alpaca_errors_name_record_and_field(record, field):
    with pytest.raises(DataFormatError, match=rf"alpaca record 12: .*{field}"):
        from_alpaca(record, 12)


def test_dolly_requires_category_and_uses_context():
    conv = from_dolly({"instruction": "Q?", "context": "ctx", "response": "A",
                       "category": "closed_qa"})
    assert conv[0]["content"] == "Q?\n\nctx"
    with pytest.raises(DataFormatError, match="category"):
        from_dolly({"instruction": "Q?", "context": "", "response": "A"}, 3)


def oasst(*rows):
    keys = ("message_id", "parent_id", "role", "text", "rank")
    return [dict(zip(keys, r, strict=True)) | {"deleted": False} for r in rows]


def test_oasst_follows_the_best_ranked_path_and_drops_a_trailing_prompt():
    tree = oasst(("r", None, "prompter", "hello", None),
                 ("a1", "r", "assistant", "worse", 1), ("a0", "r", "assistant", "best", 0),
                 ("p", "a0", "prompter", "more?", None))
    conv = from_oasst(tree)
    assert [m["content"] for m in conv] == ["hello", "best"]


def test_oasst_skips_deleted_and_unranked_go_last():
    tree = oasst(("r", None, "prompter", "hello", None),
                 ("u", "r", "assistant", "unranked", None), ("k", "r", "assistant", "kept", 3))
    assert from_oasst(tree)[1]["content"] == "kept"
    tree[2]["deleted"] = True
    assert from_oasst(tree)[1]["content"] == "unranked"


def test_oasst_errors():
    with pytest.raises(DataFormatError, match="one root"):
        from_oasst(oasst(("a", "x", "assistant", "hi", 0)), "tree 5")
    with pytest.raises(DataFormatError, match="role"):
        from_oasst(oasst(("r", None, "bot", "hi", None)))


def test_validate_conversation_rules():
    ok = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "hello"}]
    assert validate_conversation(ok) == ok
    with pytest.raises(DataFormatError, match="alternate"):
        validate_conversation([{"role": "assistant", "content": "x"}])
    with pytest.raises(DataFormatError, match="last message"):
        validate_conversation([{"role": "user", "content": "x"}])
    with pytest.raises(DataFormatError, match="empty"):
        validate_conversation([{"role": "user", "content": "x"},
                               {"role": "assistant", "content": ""}])


# --- CS336 contracts ------------------------------------------------------------------------------

def test_tokenize_prompt_and_output_shapes_shift_and_mask():
    out = tokenize_prompt_and_output(["ab", "a"], ["XYZ", "Q"], CharTokenizer())
    assert set(out) == {"input_ids", "labels", "response_mask"}
    assert out["input_ids"].shape == out["labels"].shape == (2, 4)
    full0 = CharTokenizer()("abXYZ")["input_ids"]
    assert out["input_ids"][0].tolist() == full0[:-1]
    assert out["labels"][0].tolist() == full0[1:]
    assert out["response_mask"].int().tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    assert out["labels"][1, 1:].tolist() == [0, 0, 0]  # right padding
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["a", "b"], ["c"], CharTokenizer())


def test_compute_entropy_matches_categorical_and_is_stable():
    logits = torch.randn(3, 4, 50) * 5
    want = torch.distributions.Categorical(logits=logits).entropy()
    # as in the chapter: a log-sum-exp (eps) and a 50-term dot product of probabilities (relative
    # error 2 eps) with terms of total size at most sum p|z| + H, on each side
    eps = log_softmax_tolerance(logits)
    size = ((torch.softmax(logits, -1) * logits.abs()).sum(-1) + want).max().item()
    tolerance = 2 * (eps + (rounding_bound(50 + 1, 1.0) + 2 * eps) * size)
    assert (compute_entropy(logits) - want).abs().max().item() <= tolerance
    huge = torch.tensor([[[1e4, 0.0, -1e4]]])
    assert torch.isfinite(compute_entropy(huge)).all()


def test_get_response_log_probs_gathers_labels():
    model = toy_lm()
    ids = torch.randint(1, 64, (2, 6))
    labels = torch.randint(1, 64, (2, 6))
    out = get_response_log_probs(model, ids, labels, return_token_entropy=True)
    logits = model(ids).logits
    logp = torch.log_softmax(logits, -1)
    # two forward passes (rounding moves log-sum-exp and target logit), two log-softmaxes
    tolerance = 2 * (transformer_tolerance(model.config, 6, logits.abs().max().item())
                     + log_softmax_tolerance(logits))
    gathered = logp.gather(-1, labels[..., None])[..., 0]
    assert (out["log_probs"] - gathered).abs().max().item() <= tolerance
    assert out["token_entropy"].shape == (2, 6)
    assert "token_entropy" not in get_response_log_probs(model, ids, labels)


def test_masked_normalize():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    assert masked_normalize(t, m, 2.0).item() == (1 + 3 + 5 + 6) / 2
    assert masked_normalize(t, m, 1.0, dim=-1).tolist() == [4.0, 11.0]
    assert masked_normalize(t, m, 1.0, dim=0).tolist() == [1.0, 5.0, 9.0]


def test_sft_microbatch_train_step_value_and_backward():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    loss, meta = sft_microbatch_train_step(logps, mask, gradient_accumulation_steps=2,
                                           normalize_constant=3.0)
    assert loss.item() == ((3 / 3) + (4.5 / 3)) / 2 / 2  # dyadic rationals: exact
    # each side is -1/12 after at most 3 roundings of relative size u
    assert torch.allclose(logps.grad, -mask.float() / (3.0 * 2 * 2), rtol=4 * unit_roundoff(),
                          atol=0)
    assert meta["response_tokens"].item() == 4
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        sft_microbatch_train_step(logps, mask, 0)


def test_gradient_accumulation_equals_the_large_batch():
    """Microbatch m of b_m rows out of G, with normalize_constant N / (b_m G) (N response tokens
    in the whole batch), gives the gradient of eq. (6.1) on the whole batch, even split unevenly;
    the per-microbatch token count instead of N gives a different gradient."""
    tok = CharTokenizer()
    batch = tokenize_prompt_and_output(["Q: 1+1?", "Name:", "Say:", "Why?"],
                                       ["2", "a very long answer indeed", "ok", "rain"], tok)
    N = batch["response_mask"].sum().item()
    base = toy_lm()

    def accumulated_grad(parts: list[slice], constant) -> torch.Tensor:
        model = copy.deepcopy(base)
        for part in parts:
            mask = batch["response_mask"][part]
            out = get_response_log_probs(model, batch["input_ids"][part], batch["labels"][part])
            sft_microbatch_train_step(out["log_probs"], mask, len(parts),
                                      constant(mask, len(parts)))
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def global_count(mask: torch.Tensor, G: int) -> float:
        return N / (mask.shape[0] * G)

    whole = accumulated_grad([slice(0, 4)], global_count)
    # rounding of a forward and backward pass; weight gradients sum over all tokens
    tolerance = transformer_tolerance(base.config, batch["input_ids"].numel(),
                                      whole.abs().max().item(), backward=True)
    for parts in ([slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 4)],
                  [slice(0, 1), slice(1, 3), slice(3, 4)]):
        assert (whole - accumulated_grad(parts, global_count)).abs().max().item() <= tolerance
    per_micro = accumulated_grad([slice(0, 2), slice(2, 4)], lambda m, G: m.sum().item() / 2)
    assert (whole - per_micro).abs().max().item() > tolerance  # a real difference


# --- packing --------------------------------------------------------------------------------------

def test_pack_examples_layout():
    packed = pack_examples([([1, 2, 3], [1, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8], [6, 7, 8])],
                           seq_len=6, pad_token_id=0)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 0, 0, 0]]
    assert packed["labels"].tolist() == [[1, 2, 3, -100, 5, -100], [6, 7, 8, -100, -100, -100]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 0, 0]]
    assert packed["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, -1, -1, -1]]


def test_pack_examples_errors():
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_examples([([1] * 5, [1] * 5)], seq_len=4, pad_token_id=0)
    with pytest.raises(ValueError, match="labels"):
        pack_examples([([1, 2], [1])], seq_len=4, pad_token_id=0)


def test_packed_mask_is_block_diagonal_causal():
    mask = packed_attention_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0] == 0
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, want)


def test_packed_logits_equal_each_example_alone():
    model = toy_lm().eval()
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 64, (n,), generator=generator).tolist() for n in (4, 7, 3, 5)]
    packed = pack_examples([(d, d) for d in docs], seq_len=12, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       attention_mask=packed_attention_mask(packed["document_ids"])).logits
        k = 0
        for r in range(logits.shape[0]):
            for d in range(int(packed["document_ids"][r].max()) + 1):
                where = packed["document_ids"][r] == d
                alone = model(input_ids=torch.tensor([docs[k]])).logits[0]
                tolerance = transformer_tolerance(model.config, 12, alone.abs().max().item())
                assert (logits[r, where] - alone).abs().max().item() <= tolerance
                k += 1
    assert k == len(docs)


def random_examples(n: int, max_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """`n` (input_ids, labels) pairs of 2..max_len tokens, labels -100 on the first two."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(2, max_len + 1, (1,), generator=generator))
        ids = torch.randint(1, 64, (length,), generator=generator).tolist()
        examples.append((ids, [-100, -100] + ids[2:]))
    return examples


def unpacked(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) pairs of a packed batch in row order, asserting that each one is
    contiguous in its row, with positions 0, 1, ..."""
    examples = []
    for r in range(batch["input_ids"].shape[0]):
        documents = batch["document_ids"][r]
        for d in range(int(documents.max()) + 1):
            where = (documents == d).nonzero().flatten()
            assert (where.diff() == 1).all()  # not split
            assert batch["position_ids"][r, where].tolist() == list(range(len(where)))
            examples.append((batch["input_ids"][r, where].tolist(),
                             batch["labels"][r, where].tolist()))
    return examples


@pytest.mark.parametrize("seq_len, rows_per_step", [(16, 1), (16, 2), (20, 3), (9, 4)])
def test_packed_batches_fill_rows_in_order_and_split_nothing(seq_len, rows_per_step):
    examples = random_examples(40, min(seq_len, 12), seed=seq_len + rows_per_step)
    batches = list(packed_batches(iter(examples), seq_len, rows_per_step, pad_token_id=0))
    assert [e for batch in batches for e in unpacked(batch)] == examples  # once, whole, in order
    lengths, k = [len(ids) for ids, _ in examples], 0
    for i, batch in enumerate(batches):
        assert batch["input_ids"].shape[1] == seq_len
        # a batch is closed only when all its rows are open (the last one: the stream ended)
        assert batch["input_ids"].shape[0] == rows_per_step or i == len(batches) - 1
        for documents in batch["document_ids"]:
            k += int(documents.max()) + 1
            if k < len(examples):  # a row is closed only when the next example does not fit
                assert int((documents >= 0).sum()) + lengths[k] > seq_len
    assert k == len(examples)


def test_packed_batches_errors_and_the_padded_stream():
    from ftbook.instruction_tuning import pad_examples, padded_batches

    with pytest.raises(ValueError, match="example 1 of the stream has 5 tokens"):
        list(packed_batches([([1], [1]), ([1] * 5, [1] * 5)], seq_len=4, rows_per_step=2,
                            pad_token_id=0))
    with pytest.raises(ValueError, match="rows_per_step"):
        next(packed_batches([([1], [1])], seq_len=4, rows_per_step=0, pad_token_id=0))
    examples = random_examples(10, 8, seed=0)
    batches = list(padded_batches(iter(examples), 4, pad_token_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]  # in order, the last smaller
    for batch, start in zip(batches, (0, 4, 8), strict=True):
        want = pad_examples(examples[start:start + 4], pad_token_id=0)
        assert all(torch.equal(batch[k], want[k]) for k in want)


def old_inline_packing(stream, seq_len: int, rows_per_step: int, pad_token_id: int, steps: int):
    """The packing state machine that `sft_train` ran inside its loop before `packed_batches`
    (commit 74a3718), kept verbatim as the reference."""
    waiting = None
    for _ in range(steps):
        chosen, rows, used = [], 1, 0
        while True:
            example = waiting if waiting is not None else next(stream)
            waiting = None
            if used + len(example[0]) > seq_len:
                if rows == rows_per_step:
                    waiting = example
                    break
                rows, used = rows + 1, 0
            chosen.append(example)
            used += len(example[0])
        yield pack_examples(chosen, seq_len, pad_token_id)


@pytest.mark.parametrize("seq_len, rows_per_step", [(16, 1), (16, 2), (17, 3), (12, 4)])
def test_packed_batches_equal_the_old_inline_packing(seq_len, rows_per_step):
    examples = random_examples(23, 12, seed=rows_per_step)

    def stream():  # sft_train's: the examples in order, cycling
        return (examples[i % len(examples)] for i in range(10**12))

    old = old_inline_packing(stream(), seq_len, rows_per_step, 0, steps=30)
    new = packed_batches(stream(), seq_len, rows_per_step, 0)
    for a, b in zip(old, new, strict=False):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- chat template and EOS ---------------------------------------------------------------------

def test_conversation_to_prompt_and_output_keeps_eos_in_the_loss(real_env):
    from ftbook.base_models import load_causal_lm
    from ftbook.instruction_tuning import conversation_to_prompt_and_output

    _, tok = load_causal_lm("smoke")
    conv = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    prompt, output = conversation_to_prompt_and_output(tok, conv)
    assert prompt + output == tok.apply_chat_template(conv, tokenize=False)
    assert output.endswith(tok.eos_token) and prompt.endswith("<|assistant|>\n")
    batch = tokenize_prompt_and_output([prompt], [output], tok)
    last = int(batch["response_mask"][0].nonzero().max())
    assert batch["labels"][0, last].item() == tok.eos_token_id


def test_conversation_to_prompt_and_output_refuses_pad_equal_to_eos():
    from ftbook.instruction_tuning import conversation_to_prompt_and_output

    class Tok:
        eos_token, eos_token_id, pad_token_id = "</s>", 2, 2

    conv = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(ValueError, match="pad and EOS"):
        conversation_to_prompt_and_output(Tok(), conv)


# --- filtering ------------------------------------------------------------------------------------

def test_minhash_estimates_jaccard():
    import random

    from ftbook.instruction_tuning import minhash_signature

    rng = random.Random(1)
    words = [f"w{i}" for i in range(300)]
    for _ in range(10):
        a = set(rng.sample(words, 50))
        b = set(rng.sample(sorted(a), 25)) | set(rng.sample(words, 25))
        exact = len(a & b) / len(a | b)
        estimate = (minhash_signature(a, 512, 3) == minhash_signature(b, 512, 3)).float().mean()
        # a mean of 512 agreements: within 5 standard errors (at most (0.25 / 512)^0.5) except
        # with probability 6e-7; integer hashing, so nothing machine-dependent
        assert abs(estimate.item() - exact) < 5 * (0.25 / 512) ** 0.5
    same = minhash_signature({"x y", "z"}, 64)
    assert torch.equal(same, minhash_signature({"z", "x y"}, 64))


def test_lsh_finds_near_duplicates_and_not_strangers():
    from ftbook.instruction_tuning import lsh_candidate_pairs, near_duplicates

    base = " ".join(f"word{i}" for i in range(60))  # 56 shingles; changing the last word touches 1
    texts = [base, base.replace("word59", "other"), "completely different words about cats " * 3]
    found = near_duplicates(texts, threshold=0.7)
    # deterministic (integer hashes); J(0, 1) = 55/57 = 0.96 is 16 standard errors of a 128-hash
    # estimate above the 0.7 threshold, and the third text shares no shingle with them
    assert [(i, j) for i, j, _ in found] == [(0, 1)]
    with pytest.raises(ValueError, match="divisible"):
        lsh_candidate_pairs(torch.zeros(2, 10, dtype=torch.long), 3)


def test_exact_duplicates_normalise_case_and_space():
    from ftbook.instruction_tuning import exact_duplicates

    assert exact_duplicates(["A b", "a  B", "c", "A b "]) == [1, 3]


def conv(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_rule_filters():
    from ftbook.instruction_tuning import format_problem, length_problem, toxicity_problem

    assert format_problem(conv("Describe it", "<nooutput>")) == "placeholder reply"
    assert format_problem(conv("Hi", "As an AI language model, I can't.")) == "refusal"
    assert "link" in format_problem(conv("Summarise https://x.org", "ok"))
    assert format_problem(conv("Name a color", "Blue.")) is None
    assert length_problem(conv("a " * 500, "b"), max_words=400) is not None
    assert length_problem(conv("hi", "there")) is None
    assert toxicity_problem(conv("hi", "you are an idiot")) == "contains 'idiot'"
    assert toxicity_problem(conv("hi", "idiomatic phrasing")) is None  # whole words only


def test_filter_conversations_charges_each_removal_once():
    from ftbook.instruction_tuning import filter_conversations

    long = " ".join(f"word{i}" for i in range(60))
    data = [conv("Name a color", "Blue."), conv("Name a color", "Blue."),
            conv("Describe it", "<nooutput>"), conv("Write", long),
            conv("Write", long.replace("word59", "other")), conv("hi", "you idiot")]
    kept, removed = filter_conversations(data)
    assert kept == [0, 3]
    assert [i for i, _ in removed["exact duplicate"]] == [1]
    assert [i for i, _ in removed["format"]] == [2]
    assert [i for i, _ in removed["near duplicate"]] == [4]
    assert [i for i, _ in removed["toxicity"]] == [5]


# --- synthetic data, mixing, the SFT loop -----------------------------------------------------

def test_synthetic_instructions_are_checkable_and_held_out_is_disjoint():
    from ftbook.instruction_tuning import SYNTHETIC_TASKS, answer_is_correct, synthetic_instructions

    sentences = [f"this film number {i} is fine and long enough" for i in range(50)]
    labels = [i % 2 for i in range(50)]
    train = synthetic_instructions(sentences, labels, 6, seed=0)
    assert [sum(e["category"] == t for e in train) for t in SYNTHETIC_TASKS] == [6] * 6
    for e in train:
        reply = e["messages"][1]["content"]
        if e["answer"] is not None:
            assert answer_is_correct(reply, e["answer"])
        if e["category"] == "arithmetic":
            a, op, b = e["messages"][0]["content"][8:-1].split()
            assert int(reply) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert int(reply) >= 0  # as in the pretraining corpus
        if e["category"] == "uppercase":
            assert reply == reply.upper()
        if e["category"] == "continue":  # the running task of 13-07 to 13-09
            opening = e["messages"][0]["content"].removeprefix("Continue this movie review: ")
            assert reply.startswith(opening) and reply in sentences
    seen = {e["messages"][0]["content"] for e in train}
    held = synthetic_instructions(sentences, labels, 3, seed=1, exclude=seen)
    assert not seen & {e["messages"][0]["content"] for e in held}
    with pytest.raises(ValueError, match="labels"):
        synthetic_instructions(["a"], [0, 1], 1, seed=0)


def test_mixture_weights_temperature():
    from ftbook.instruction_tuning import mixture_weights

    # float64, a few roundings: pytest.approx's relative 1e-6 is far above them
    natural = mixture_weights({"a": 900, "b": 100}, 1.0)
    assert natural == pytest.approx({"a": 0.9, "b": 0.1})
    flat = mixture_weights({"a": 900, "b": 100}, 1e9)
    spread = 9 ** (1 / 1e9) - 1  # (6.6) leaves |p - 1/2| <= (n_max / n_min)^(1/T) - 1
    assert flat["a"] == pytest.approx(0.5, abs=spread + 4 * unit_roundoff(torch.float64))
    sqrt = mixture_weights({"a": 900, "b": 100}, 2.0)
    assert sqrt["a"] == pytest.approx(30 / 40)
    with pytest.raises(ValueError, match="temperature"):
        mixture_weights({"a": 1}, 0)
    with pytest.raises(ValueError, match="at least one"):
        mixture_weights({"a": 0}, 1)


def test_sft_loss_is_mean_over_response_tokens_and_respects_boundaries():
    from ftbook.instruction_tuning import sft_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, 6]])
    loss, n = sft_loss(logits, labels)
    logp = torch.log_softmax(logits, -1)
    want = -(logp[0, 0, 3] + logp[0, 1, 4] + logp[0, 3, 6]) / 3
    # the same cross-entropies by two code paths: log-softmax rounding and a 3-term mean
    tolerance = 2 * (log_softmax_tolerance(logits) + rounding_bound(3 + 1, want.item()))
    assert n == 3 and abs(loss.item() - want.item()) <= tolerance
    docs = torch.tensor([[0, 0, 0, 1, 1]])  # position 3 starts a new example
    loss_b, n_b = sft_loss(logits, torch.tensor([[-100, 3, 4, 5, 6]]), docs)
    assert n_b == 3  # the target at position 3 belongs to the next example: not predicted
    assert abs(loss_b.item() - want.item()) <= tolerance


def test_pad_examples():
    from ftbook.instruction_tuning import pad_examples

    out = pad_examples([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sft_train_packs_rows_full_and_learns():
    from ftbook.instruction_tuning import sft_train

    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in [5, 7, 3, 6, 4, 8, 5, 6] * 4:
        ids = torch.randint(1, 64, (n,), generator=generator).tolist()
        examples.append((ids, [-100, -100] + ids[2:]))
    model = toy_lm()
    packed = sft_train(model, examples, steps=30, lr=1e-2, seq_len=16, pad_token_id=0,
                       packing=True, seed=0, rows_per_step=2)
    assert packed.utilization > 0.8  # deterministic packing of fixed lengths
    assert all(slots == 32 for slots in packed.slots)
    # learns at all: over 5 seeds of model and data the last five losses summed 4.5 to 7 below
    # the first five (about 21), a margin of some 6 seed-to-seed standard deviations
    assert sum(packed.losses[-5:]) < sum(packed.losses[:5])
    padded = sft_train(toy_lm(), examples, steps=2, lr=0.0, seq_len=16, pad_token_id=0,
                       packing=False, seed=0, examples_per_step=4)
    assert padded.utilization < 1 and len(padded.losses) == 2


def old_sft_train(model, examples, *, steps, lr, seq_len, pad_token_id, packing, seed,
                  examples_per_step=16, rows_per_step=4, warmup=0):
    """`sft_train` as it was before `packed_batches` and `padded_batches` (commit 74a3718),
    packing inline, without the progress bar and the clock: the reference for the same losses."""
    from ftbook.base_models import schedule_factor
    from ftbook.instruction_tuning import pad_examples, sft_loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    stream = (examples[order[i % len(order)]] for i in range(10**12))
    packed = old_inline_packing(stream, seq_len, rows_per_step, pad_token_id, steps)
    log = {"losses": [], "response_tokens": [], "real_tokens": [], "slots": []}
    for step in range(steps):
        if packing:
            batch = next(packed)
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                      "attention_mask": packed_attention_mask(batch["document_ids"])}
            documents = batch["document_ids"]
            real = int((batch["document_ids"] >= 0).sum())
        else:
            batch = pad_examples([next(stream) for _ in range(examples_per_step)], pad_token_id)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            documents = None
            real = int(batch["attention_mask"].sum())
        model.train()
        if warmup > 0:
            for group in optimizer.param_groups:
                group["lr"] = schedule_factor("cosine", step, steps, warmup, min_ratio=0.1,
                                                scale=lr)  # = the old cosine_lr, bit for bit
        loss, n_tokens = sft_loss(model(**inputs).logits, batch["labels"], documents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for key, value in zip(log, (loss.item(), n_tokens, real, batch["input_ids"].numel()),
                              strict=True):
            log[key].append(value)
    return log


@pytest.mark.parametrize("packing, rows_per_step, warmup", [(True, 1, 0), (True, 2, 2),
                                                            (True, 3, 0), (False, 2, 2)])
def test_sft_train_equals_the_old_inline_loop(packing, rows_per_step, warmup):
    """`sft_train` on `packed_batches` (and `padded_batches`) trains on the same batches in the
    same order as the loop that packed inline: the same ops in the same order, so the same
    losses and weights bit for bit."""
    from ftbook.instruction_tuning import sft_train

    examples = random_examples(30, 12, seed=3)
    kwargs = dict(steps=6, lr=1e-2, seq_len=16, pad_token_id=0, packing=packing, seed=1,
                  examples_per_step=3, rows_per_step=rows_per_step, warmup=warmup)
    new_model, old_model = toy_lm(), toy_lm()
    new = sft_train(new_model, examples, **kwargs)
    old = old_sft_train(old_model, examples, **kwargs)
    assert {k: getattr(new, k) for k in old} == old
    for (name, a), b in zip(new_model.named_parameters(), old_model.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loader", ["load_causal_lm", "load_chat_lm"])  # book's template, ChatML
def test_tokenize_for_sft_matches_trl_completion_only_pipeline(real_env, tmp_path, loader):
    import warnings

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ftbook import base_models
    from ftbook.instruction_tuning import conversation_to_prompt_and_output, tokenize_for_sft

    lm, tok = getattr(base_models, loader)("smoke")
    convs = [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}],
             [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]]
    pairs = [conversation_to_prompt_and_output(tok, c) for c in convs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(
            model=lm, processing_class=tok,
            train_dataset=Dataset.from_dict({"prompt": [p for p, _ in pairs],
                                             "completion": [o for _, o in pairs]}),
            args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[],
                           use_cpu=True))
    ours = tokenize_for_sft(tok, convs, max_len=64)
    for i, (ids, labels) in enumerate(ours):
        assert trainer.train_dataset[i]["input_ids"] == ids
        assert trainer.train_dataset[i]["labels"] == labels
        assert labels[-1] == tok.eos_token_id


# --- mixing, curriculum, generation, the saved SFT model -----------------------------------------

def test_mixture_weights_limits_and_build_mixture_proportions():
    from ftbook.instruction_tuning import build_mixture, mixture_weights

    counts = {"big": 900, "small": 100}
    assert mixture_weights(counts, 1.0)["big"] == pytest.approx(0.9)  # float64: rel 1e-6 >> u
    spread = 9 ** (1 / 1e9) - 1  # (6.6) leaves |p - 1/2| <= (n_max / n_min)^(1/T) - 1
    assert mixture_weights(counts, 1e9)["big"] == pytest.approx(
        0.5, abs=spread + 4 * unit_roundoff(torch.float64))
    # eq. (6.6) at T = 2: sqrt(900) / (sqrt(900) + sqrt(100)) = 0.75
    weights = mixture_weights(counts, 2.0)
    assert weights["big"] == pytest.approx(0.75)
    groups = {"big": list(range(900)), "small": list(range(1000, 1100))}
    mix = build_mixture(groups, weights, 400, seed=0)
    assert sum(x < 1000 for x in mix) == 300 and sum(x >= 1000 for x in mix) == 100
    assert len(set(x for x in mix if x >= 1000)) == 100  # no repeat before the group is used up
    upsampled = build_mixture(groups, mixture_weights(counts, 1e9), 400, seed=0)
    assert sum(x >= 1000 for x in upsampled) == 200  # 100 items seen twice
    with pytest.raises(ValueError, match="same categories"):
        build_mixture(groups, {"big": 1.0}, 10, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        mixture_weights(counts, 0.0)


def test_curriculum_order_sorts_and_sft_train_rejects_a_bad_order():
    from ftbook.instruction_tuning import curriculum_order, sft_train

    difficulty = [3, 1, 2, 1, 5, 2]
    order = curriculum_order(difficulty, seed=0)
    assert sorted(order) == list(range(6))
    assert [difficulty[i] for i in order] == sorted(difficulty)
    with pytest.raises(ValueError, match="permutation"):
        sft_train(toy_lm(), [([1, 2], [1, 2])] * 3, steps=1, lr=0.0, seq_len=8, pad_token_id=0,
                  packing=True, seed=0, order=[0, 0, 1])


def test_sample_replies_marks_eos_and_cuts_after_it(real_env):
    from ftbook.base_models import load_causal_lm
    from ftbook.instruction_tuning import render_prompt, sample_replies

    lm, tok = load_causal_lm("smoke")
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size)
    with torch.no_grad():  # a head that always prefers EOS
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 10.0
    lm.lm_head = head
    prompts = [render_prompt(tok, "Say hi."), render_prompt(tok, "What is 2 + 3? Answer.")]
    replies = sample_replies(lm, tok, prompts, max_new_tokens=5, do_sample=False)
    assert [r["ids"] for r in replies] == [[tok.eos_token_id]] * 2
    assert all(r["finished"] and r["text"] == "" for r in replies)
    tok.padding_side = "right"
    with pytest.raises(ValueError, match="left"):
        sample_replies(lm, tok, prompts, max_new_tokens=2, do_sample=False)


def test_heldout_loss_equals_token_weighted_mean_of_batches():
    from ftbook.instruction_tuning import heldout_loss, pad_examples, sft_loss

    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 4, 7, 6):
        ids = torch.randint(1, 64, (n,), generator=generator).tolist()
        examples.append((ids, [-100] * 2 + ids[2:]))
    model = toy_lm().eval()
    with torch.no_grad():
        batch = pad_examples(examples, 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected, n = sft_loss(logits, batch["labels"])
    # batches of 2 vs one batch: logits differ by rounding (moving each cross-entropy by twice
    # that), a log-softmax on each side, and (A.1) for the means
    tolerance = 2 * (transformer_tolerance(model.config, 9, logits.abs().max().item())
                     + log_softmax_tolerance(logits) + rounding_bound(n, float(expected)))
    assert abs(heldout_loss(model, examples, 0, batch_size=2) - float(expected)) <= tolerance


def test_load_sft_model_trains_saves_and_reloads_the_same_weights(real_env):
    from ftbook.instruction_tuning import load_sft_model, sft_model_path

    model, tok = load_sft_model("smoke")
    assert (sft_model_path("smoke") / "sft_log.json").exists()
    again, _ = load_sft_model("smoke")
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_teacher_forced_scores_matches_a_plain_forward_pass(real_env):
    """Batched, length-sorted, with the shared prefix cached: the NLL of each reply and the
    greedy flag equal those of one unbatched forward pass over the whole conversation, up to
    rounding (flags compared where no arg-max is within rounding of a tie)."""
    from ftbook.base_models import load_chat_lm
    from ftbook.instruction_tuning import teacher_forced_scores, tokenize_for_sft

    lm, tok = load_chat_lm("smoke")
    pairs = [("Say hi.", "hello there"), ("What is 2 + 3?", "5"),
             ("Repeat exactly: a b c", "a b c"), ("Name a colour, please.", "blue"),
             ("Rewrite in capital letters: hi", "HI")]
    conversations = [[{"role": "user", "content": u}, {"role": "assistant", "content": r}]
                     for u, r in pairs]
    scores = teacher_forced_scores(lm, tok, conversations, batch_size=2)
    unshared = teacher_forced_scores(lm, tok, conversations, batch_size=2, share_prefix=False)
    tolerance = 2 * transformer_tolerance(lm.config, 128, 30.0)  # per logit
    for (ids, labels), s, u in zip(tokenize_for_sft(tok, conversations, 512), scores, unshared,
                                   strict=True):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0, :-1]  # (T - 1, vocab)
        targets = torch.tensor(labels[1:])
        on = targets != -100
        nll = torch.nn.functional.cross_entropy(logits[on], targets[on], reduction="sum")
        assert s["tokens"] == u["tokens"] == int(on.sum())
        per_token = tolerance + log_softmax_tolerance(logits)
        assert abs(s["nll"] - float(nll)) <= 2 * per_token * s["tokens"]
        assert abs(u["nll"] - float(nll)) <= 2 * per_token * s["tokens"]
        top2 = logits[on].topk(2, dim=-1).values
        if (top2[:, 0] - top2[:, 1]).min() > 2 * tolerance:
            greedy = bool((logits[on].argmax(-1) == targets[on]).all())
            assert s["greedy"] == u["greedy"] == greedy


def test_teacher_forced_scores_greedy_flag_needs_the_end_of_turn_too(real_env):
    """With a context-free head that prefers "yes" everywhere, greedy decoding writes "yes"
    forever: the reply "yes" starts greedily but is not greedy, since the model would not stop;
    with end-of-turn preferred, no non-empty reply is greedy."""
    from ftbook.base_models import load_chat_lm
    from ftbook.instruction_tuning import teacher_forced_scores

    lm, tok = load_chat_lm("smoke")
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size)
    word = tok("yes", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # prefers "yes" after the assistant header, end-of-turn after "yes"
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 5.0
        head.bias[word[0]] = 10.0
    lm.lm_head = head
    conversations = [[{"role": "user", "content": u}, {"role": "assistant", "content": r}]
                     for u, r in (("a?", "yes"), ("b?", "no"))]
    scores = teacher_forced_scores(lm, tok, conversations)
    # "yes" then end of turn: the first is the arg-max, the second is not ("yes" wins again)
    assert len(word) == 1 and not scores[0]["greedy"] and not scores[1]["greedy"]
    with torch.no_grad():
        head.bias[tok.eos_token_id] = 10.0
        head.bias[word[0]] = 5.0
    assert not any(s["greedy"] for s in teacher_forced_scores(lm, tok, conversations))


def test_sft_train_callback_and_truncated_schedule():
    """The first k steps of a run equal a run of k steps on the same schedule (same losses),
    and the callback sees steps 1..k."""
    from ftbook.instruction_tuning import sft_train

    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 4, 7, 6, 8):
        ids = torch.randint(1, 64, (n,), generator=generator).tolist()
        examples.append((ids, [-100] * 2 + ids[2:]))
    seen = []
    long = sft_train(toy_lm(), examples, steps=8, lr=1e-2, seq_len=16, pad_token_id=0,
                     packing=True, seed=0, rows_per_step=1, warmup=2,
                     callback=lambda k, m: seen.append(k))
    short = sft_train(toy_lm(), examples, steps=5, lr=1e-2, seq_len=16, pad_token_id=0,
                      packing=True, seed=0, rows_per_step=1, warmup=2, schedule_steps=8)
    assert seen == list(range(1, 9))
    assert long.losses[:5] == short.losses  # same ops in the same order: bitwise equal
    unscheduled = sft_train(toy_lm(), examples, steps=5, lr=1e-2, seq_len=16, pad_token_id=0,
                            packing=True, seed=0, rows_per_step=1, warmup=2)
    # step 3's learning rate differs (cosine over 5 steps vs over 8), so the loss after it does
    assert unscheduled.losses[4] != short.losses[4]


def test_train_sft_model_with_lora_returns_a_merged_plain_model(real_env):
    from peft import PeftModel

    from ftbook.base_models import load_chat_lm
    from ftbook.instruction_tuning import SFT_RECIPES, train_sft_model

    assert SFT_RECIPES["smoke"].lora_rank is not None
    conversations = [[{"role": "user", "content": f"What is {a} + 1?"},
                      {"role": "assistant", "content": str(a + 1)}] for a in range(8)]
    model, tok, log = train_sft_model("smoke", conversations, steps=2)
    base, _ = load_chat_lm("smoke")
    assert not isinstance(model, PeftModel) and len(log.losses) == 2
    assert not any("lora" in name for name in model.state_dict())
    assert set(model.state_dict()) == set(base.state_dict())
    changed = [n for n, w in model.state_dict().items() if not torch.equal(w, base.state_dict()[n])]
    # LoRA on every linear layer: the attention and MLP projections move, embeddings do not
    assert changed and all("proj" in n for n in changed)
    assert tok.padding_side == "left"
