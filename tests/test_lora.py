"""Tests of ftbook.lora (chapter 13-02): eq. (2.1)/(2.2), apply/merge, parity with PEFT (forward,
gradients, one AdamW step) and PEFT-format adapter files in both directions.

Every model is a random tiny BERT or Llama built here; nothing is downloaded. Comparisons of two
implementations of a network run in float64, where rounding is far below lora.PARITY_TOLERANCE
(see chapter 13-02); single-layer identities use the bound of Appendix A in float32.
"""
import copy
import json

import pytest
import tiny_models
import torch
from tiny_models import FFN, D, L, bert_batch, tiny_bert  # noqa: F401
from torch import nn
from transformers import LlamaForCausalLM

from ftbook import lora
from ftbook.workbench import rounding_bound

R, ALPHA = 4, 8.0  # rank and alpha of the adapters below
TOL = lora.PARITY_TOLERANCE  # float64 comparisons of whole models


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_models.tiny_llama(100, seed=seed, hidden_size=D, num_hidden_layers=L,
                                  num_attention_heads=2, max_position_embeddings=64,
                                  attn_implementation=None)


def tiny_bert64(seed: int = 0):
    return tiny_bert(seed).double()


def randomize_b(model: nn.Module, seed: int = 7) -> None:
    """Non-zero B in every LoRALinear (with B = 0 the adapter would be invisible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- LoRALinear ----------------------------------------------------------------------------------

def test_lora_linear_starts_equal_to_base_with_right_shapes():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    weight = base.weight.detach().clone()
    layer = lora.LoRALinear(base, rank=3, alpha=6.0)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (10, 3)
    assert (layer.in_features, layer.out_features) == (12, 10)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 2.0 and layer.rank == 3 and layer.alpha == 6.0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x = torch.randn(5, 7, 12)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.base.weight, weight)


def test_lora_linear_forward_is_eq_2_1():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    x = torch.randn(5, 12)
    expected = x @ base.weight.detach().T + base.bias.detach() + 2.0 * (x @ A.T) @ B.T
    # both evaluate the same sums with at most 12 + 3 + 3 roundings along any path: each within
    # gamma_18 of the sum of absolute terms, the two within twice that (Appendix A)
    abs_terms = (x.abs() @ base.weight.detach().abs().T + base.bias.detach().abs()
                 + 2.0 * (x.abs() @ A.abs().T) @ B.abs().T)
    assert ((layer(x) - expected).abs() <= 2 * rounding_bound(19, abs_terms)).all()
    # a rank-3 sum and the scale (exact, a power of two): twice gamma_3 of 2 |B| |A|
    bound = 2 * rounding_bound(4, 2.0 * B.abs() @ A.abs())
    assert ((layer.delta_weight() - 2.0 * B @ A).abs() <= bound).all()
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()).item() == 3


def test_lora_linear_gradients_are_eq_2_2():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(12, 10).double(), rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.copy_(0.5 * torch.randn(10, 3, dtype=torch.float64))
    x = torch.randn(8, 12, dtype=torch.float64)  # a batch of 8 inputs
    g = torch.randn(8, 10, dtype=torch.float64)  # dL/dh for each input
    (layer(x) * g).sum().backward()  # L = sum_n g_n . h_n
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), 6.0 / 3
    grad_B = s * sum(torch.outer(g[n], A @ x[n]) for n in range(8))
    grad_A = s * sum(torch.outer(B.T @ g[n], x[n]) for n in range(8))
    # float64: sums of 8 x 12 or 8 x 10 terms of size ~10 round at ~1e-13, far below 1e-10
    torch.testing.assert_close(layer.lora_B.grad, grad_B, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_A.grad, grad_A, rtol=1e-10, atol=1e-10)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_a_gets_no_gradient_while_b_is_zero():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(6, 5), rank=2, alpha=4.0)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


def test_rank_equal_to_min_dimension_is_allowed():
    assert lora.LoRALinear(nn.Linear(12, 10), rank=10, alpha=1.0).lora_A.shape == (10, 12)


@pytest.mark.parametrize("rank", [0, -1, 11])
def test_invalid_rank_raises_with_the_limit(rank):
    with pytest.raises(ValueError, match=rf"rank.*= 10 .*12->10.*rank={rank}"):
        lora.LoRALinear(nn.Linear(12, 10), rank=rank, alpha=8.0)


@pytest.mark.parametrize("alpha", [0, -2.0])
def test_non_positive_alpha_raises(alpha):
    with pytest.raises(ValueError, match=rf"alpha must be positive, got {alpha}"):
        lora.LoRALinear(nn.Linear(12, 10), rank=2, alpha=alpha)


def test_wrapping_a_non_linear_raises_type_error():
    with pytest.raises(TypeError, match=r"nn\.Linear.*Embedding"):
        lora.LoRALinear(nn.Embedding(10, 4), rank=2, alpha=4.0)


def test_dropout_only_touches_the_low_rank_path():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = lora.LoRALinear(base, rank=2, alpha=2.0, dropout=0.5).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot show
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = base(x) + 1.0 * x @ A.T @ B.T
    abs_terms = (x.abs() @ base.weight.detach().abs().T + base.bias.detach().abs()
                 + (x.abs() @ A.abs().T) @ B.abs().T)
    assert ((layer(x) - expected).abs() <= 2 * rounding_bound(8 + 2 + 4, abs_terms)).all()


# --- apply_lora ----------------------------------------------------------------------------------

def test_apply_lora_replaces_exactly_the_targets_and_freezes_the_rest():
    model = lora.apply_lora(tiny_bert(), ["query", "value"], rank=R, alpha=ALPHA,
                            modules_to_save=["classifier"])
    layers = lora.lora_layers(model)
    assert sorted(layers) == sorted(f"bert.encoder.layer.{i}.attention.self.{t}"
                                    for i in range(L) for t in ("query", "value"))
    assert all(layer.scaling == ALPHA / R for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in layers for f in "AB"} | {
        "classifier.weight", "classifier.bias"}
    # q, v of L layers: r (d_in + d_out) each; the head: D * 2 + 2
    assert n_trainable(model) == 2 * L * R * (D + D) + D * 2 + 2 == 1090
    assert model.lora_config == {"target_modules": ["query", "value"], "rank": R, "alpha": ALPHA,
                                 "dropout": 0.0, "modules_to_save": ["classifier"]}


def test_apply_lora_leaves_the_output_unchanged_at_init():
    base = tiny_bert()
    batch = bert_batch()
    with torch.no_grad():
        expected = base(**batch).logits
        adapted = lora.apply_lora(copy.deepcopy(base), ["query", "key", "value"], R, ALPHA)
        assert torch.equal(adapted(**batch).logits, expected)


def test_apply_lora_without_modules_to_save_trains_only_factors():
    model = lora.apply_lora(tiny_bert(), ["value"], rank=2, alpha=4.0)
    assert n_trainable(model) == L * 2 * (D + D)
    assert not model.classifier.weight.requires_grad


def test_apply_lora_unknown_target_lists_the_linear_layers():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"'q_proj'.*BertForSequenceClassification") as info:
        lora.apply_lora(model, ["query", "q_proj"], rank=R, alpha=ALPHA)
    message = str(info.value)
    for name in ("query", "key", "value", "dense", "classifier"):
        assert f"'{name}'" in message
    assert not lora.lora_layers(model)  # nothing was changed
    assert all(p.requires_grad for p in model.parameters())


def test_apply_lora_matches_whole_name_components_only():
    model = tiny_bert()
    with pytest.raises(ValueError, match="'ery'"):  # a suffix that is not a whole component
        lora.apply_lora(model, ["ery"], rank=R, alpha=ALPHA)


@pytest.mark.parametrize("targets", [[], ()])
def test_apply_lora_empty_targets_raise(targets):
    with pytest.raises(ValueError, match="target_modules is empty"):
        lora.apply_lora(tiny_bert(), targets, rank=R, alpha=ALPHA)


def test_apply_lora_invalid_rank_raises():
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(tiny_bert(), ["query"], rank=D + 1, alpha=ALPHA)


# --- parity with PEFT ----------------------------------------------------------------------------

def peft_pair(base: nn.Module, targets: list[str], modules_to_save: list[str] | None):
    """(ours, PEFT's) on deep copies of `base`, with our non-zero B and our head copied over."""
    import peft

    ours = lora.apply_lora(copy.deepcopy(base), targets, rank=R, alpha=ALPHA,
                           modules_to_save=modules_to_save or ())
    randomize_b(ours)
    if modules_to_save:
        with torch.no_grad():
            for name in modules_to_save:
                for p in ours.get_submodule(name).parameters():
                    p.add_(0.05 * torch.randn_like(p))
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=targets, modules_to_save=modules_to_save,
        lora_dropout=0.0, task_type=None))
    lora.copy_lora_into_peft(ours, reference)
    return ours, reference


def check_parity(ours, reference, batch, loss_fn):
    ours.eval()
    reference.eval()
    with torch.no_grad():
        logits_ours, logits_peft = ours(**batch).logits, reference(**batch).logits
        assert max_diff(logits_ours, logits_peft) < TOL
        base_logits = reference.get_base_model()
        with reference.disable_adapter():
            plain = base_logits(**batch).logits
        assert max_diff(logits_ours, plain) > 1e-3  # the adapter is visible
    assert n_trainable(ours) == n_trainable(reference)

    ours.train()
    reference.train()
    loss_fn(ours(**batch)).backward()
    loss_fn(reference(**batch)).backward()
    peft_params = dict(reference.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            q = peft_params[lora.peft_parameter_name(name, ours.lora_config["modules_to_save"])]
            assert p.grad is not None and q.grad is not None, name
            assert p.grad.abs().max() > 0, name
            assert max_diff(p.grad, q.grad) < TOL, name
            checked += 1
    assert checked == sum(1 for p in reference.parameters() if p.requires_grad)

    for model in (ours, reference):
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
        model.eval()
    with torch.no_grad():
        moved = ours(**batch).logits
        assert max_diff(moved, reference(**batch).logits) < TOL
        assert max_diff(moved, logits_ours) > 1e-4  # the step did something


def test_peft_parity_bert_classifier():
    labels = torch.tensor([0, 1, 1, 0])
    ours, reference = peft_pair(tiny_bert64(), ["query", "value"], ["classifier"])
    check_parity(ours, reference, bert_batch(),
                 lambda out: nn.functional.cross_entropy(out.logits, labels))


def test_peft_parity_llama_causal_lm():
    ours, reference = peft_pair(tiny_llama().double(), ["q_proj", "v_proj"], None)
    assert len(lora.lora_layers(ours)) == 2 * L
    input_ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    check_parity(ours, reference, {"input_ids": input_ids},
                 lambda out: nn.functional.cross_entropy(
                     out.logits[:, :-1].reshape(-1, 100), input_ids[:, 1:].reshape(-1)))


def test_peft_parameter_name():
    assert lora.peft_parameter_name("bert.encoder.layer.0.attention.self.query.lora_A") == (
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight")
    assert lora.peft_parameter_name("classifier.bias", ["classifier"]) == (
        "base_model.model.classifier.modules_to_save.default.bias")
    # RoBERTa's head is a module of two Linears: PEFT wraps the whole `classifier`
    assert lora.peft_parameter_name("classifier.out_proj.weight", ["classifier"]) == (
        "base_model.model.classifier.modules_to_save.default.out_proj.weight")
    with pytest.raises(KeyError, match="neither a LoRA factor"):
        lora.peft_parameter_name("classifier.bias", [])


def tiny_roberta64():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=70, num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=1)
    return RobertaForSequenceClassification(config).eval().double()


def test_peft_parity_roberta_classifier_head():
    # the full profile's encoder: a classification head of two Linears (dense, out_proj)
    labels = torch.tensor([0, 1, 1, 0])
    ours, reference = peft_pair(tiny_roberta64(), ["query", "value"], ["classifier"])
    check_parity(ours, reference, bert_batch(),
                 lambda out: nn.functional.cross_entropy(out.logits, labels))


def test_seq_cls_adapter_without_its_head_is_refused(tmp_path):
    model = lora.apply_lora(tiny_bert64(), ["query", "value"], rank=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="must carry the classification head 'classifier'"):
        lora.save_adapter(model, tmp_path / "a", "tiny-bert")
    assert not (tmp_path / "a").exists()  # nothing PEFT cannot load is written
    lora.save_adapter(model, tmp_path / "b", "tiny-bert", task_type=None)  # a bare adapter


# --- merging -------------------------------------------------------------------------------------

def test_merge_lora_equals_unmerged_and_folds_the_update():
    model = lora.apply_lora(tiny_bert64(), ["query", "value", "intermediate.dense"], rank=R,
                            alpha=ALPHA)
    randomize_b(model)
    expected_weights = {name: layer.base.weight.detach().clone()
                        + (ALPHA / R) * layer.lora_B.detach() @ layer.lora_A.detach()
                        for name, layer in lora.lora_layers(model).items()}
    # W0 + s B A: a rank-R sum, the scale and the add, at most R + 2 roundings either way
    weight_bounds = {}
    for name, layer in lora.lora_layers(model).items():
        abs_terms = (layer.base.weight.detach().abs()
                     + (ALPHA / R) * layer.lora_B.detach().abs() @ layer.lora_A.detach().abs())
        weight_bounds[name] = 2 * rounding_bound(R + 3, abs_terms, torch.float64)
    assert len(expected_weights) == 3 * L
    batch = bert_batch()
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged_model = lora.merge_lora(model)
        merged = merged_model(**batch).logits
    assert merged_model is model
    assert not lora.lora_layers(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert max_diff(merged, unmerged) < TOL
    for name, weight in expected_weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear, name
        assert ((layer.weight.detach() - weight).abs() <= weight_bounds[name]).all(), name
    assert not any("lora" in n for n, _ in model.named_parameters())


# --- adapter files -------------------------------------------------------------------------------

@pytest.mark.parametrize("make_base", [tiny_bert64, tiny_roberta64])  # one Linear / a module
def test_peft_loads_our_adapter_with_its_head(tmp_path, make_base):
    import peft

    base = make_base()
    ours = lora.apply_lora(copy.deepcopy(base), ["query", "value"], rank=R, alpha=ALPHA,
                           modules_to_save=["classifier"])
    randomize_b(ours)
    with torch.no_grad():
        for p in ours.classifier.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.equal(next(ours.classifier.parameters()), next(base.classifier.parameters()))
    path = lora.save_adapter(ours, tmp_path / "adapter", "tiny-bert")
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, ALPHA)
    assert config["target_modules"] == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "tiny-bert"

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    ours.eval()
    head = loaded.base_model.model.classifier.modules_to_save["default"]
    for theirs, mine in zip(head.parameters(), ours.classifier.parameters(), strict=True):
        assert torch.equal(theirs, mine)
    batch = bert_batch()
    with torch.no_grad():
        assert max_diff(loaded(**batch).logits, ours(**batch).logits) < TOL
        # and the head matters: the base head gives different logits
        with loaded.disable_adapter():
            assert max_diff(loaded(**batch).logits, ours(**batch).logits) > 1e-3


def test_adapter_file_holds_exactly_the_trainable_tensors(tmp_path):
    from safetensors.torch import load_file

    ours = lora.apply_lora(tiny_bert(), ["query", "value"], rank=R, alpha=ALPHA,
                           modules_to_save=["classifier"])
    path = lora.save_adapter(ours, tmp_path / "adapter", "tiny-bert")
    stored = load_file(str(path / "adapter_model.safetensors"))
    expected = {f"base_model.model.bert.encoder.layer.{i}.attention.self.{t}.lora_{f}.weight"
                for i in range(L) for t in ("query", "value") for f in "AB"}
    expected |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(stored) == expected
    assert sum(t.numel() for t in stored.values()) == n_trainable(ours)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_load_adapter_reads_peft_save_pretrained(tmp_path, task_type):
    import peft

    base = tiny_bert64()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["query", "value"], modules_to_save=["classifier"],
        lora_dropout=0.0, task_type=task_type))
    torch.manual_seed(11)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # non-zero B, a changed head
    reference.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    reference.eval()
    assert len(lora.lora_layers(ours)) == 2 * L
    assert n_trainable(ours) == n_trainable(reference)
    batch = bert_batch()
    with torch.no_grad():
        assert max_diff(ours(**batch).logits, reference(**batch).logits) < TOL
        assert max_diff(ours(**batch).logits, base(**batch).logits) > 1e-3


def test_save_then_load_adapter_round_trips(tmp_path):
    base = tiny_bert()
    ours = lora.apply_lora(copy.deepcopy(base), ["key"], rank=2, alpha=3.0,
                           modules_to_save=["classifier"])
    randomize_b(ours)
    with torch.no_grad():
        ours.classifier.bias.add_(0.5)
    lora.save_adapter(ours, tmp_path / "a", "tiny-bert")
    again = lora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert again.lora_config == ours.lora_config
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.fixture
def peft_folder(tmp_path):
    import peft

    reference = peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0))
    reference.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_load_adapter_rejects_other_peft_types(peft_folder):
    edit_config(peft_folder, peft_type="IA3")
    with pytest.raises(ValueError, match=r"peft_type is 'IA3', expected 'LORA'"):
        lora.load_adapter(tiny_bert(), peft_folder)


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_load_adapter_rejects_unsupported_options(peft_folder, option):
    edit_config(peft_folder, **{option: True})
    with pytest.raises(ValueError, match=rf"unsupported LoRA options \['{option}'\]"):
        lora.load_adapter(tiny_bert(), peft_folder)


def test_load_adapter_rejects_an_unknown_tensor(peft_folder):
    from safetensors.torch import load_file, save_file

    file = peft_folder / "adapter_model.safetensors"
    stored = load_file(str(file))
    stored["base_model.model.bert.bogus.weight"] = torch.zeros(2, 2)
    save_file(stored, str(file))
    with pytest.raises(KeyError, match=r"'bert\.bogus\.weight' has no place"):
        lora.load_adapter(tiny_bert(), peft_folder)


def test_load_adapter_rejects_a_missing_factor(peft_folder):
    from safetensors.torch import load_file, save_file

    file = peft_folder / "adapter_model.safetensors"
    stored = load_file(str(file))
    del stored["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    save_file(stored, str(file))
    with pytest.raises(KeyError, match=r"no weights for .*layer\.1\.attention\.self\.value"):
        lora.load_adapter(tiny_bert(), peft_folder)


@pytest.mark.parametrize("pattern", ["alpha_pattern", "rank_pattern"])
def test_load_adapter_honours_or_rejects_per_module_patterns(tmp_path, pattern):
    import peft

    base = tiny_bert64()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0,
        **{pattern: {"value": 2 if pattern == "rank_pattern" else 4 * ALPHA}}))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "peft")
    try:
        ours = lora.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    except ValueError as error:  # refusing the option, naming it, is acceptable
        assert pattern in str(error)
        return
    reference.eval()
    batch = bert_batch()
    with torch.no_grad():
        assert max_diff(ours(**batch).logits, reference(**batch).logits) < TOL


# --- encoder placements --------------------------------------------------------------------------

def test_ffn_placement_expands_the_down_projection_per_layer():
    model = tiny_bert()
    targets = lora.encoder_target_modules(model, "FFN")
    assert targets == ["intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"]
    lora.apply_lora(model, targets, rank=R, alpha=ALPHA)
    assert sorted(lora.lora_layers(model)) == sorted(
        [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(L)]
        + [f"bert.encoder.layer.{i}.output.dense" for i in range(L)])
    for i in range(L):
        attention_output = model.bert.encoder.layer[i].attention.output.dense
        assert type(attention_output) is nn.Linear


def test_all_linear_placement_wraps_every_encoder_linear():
    model = tiny_bert()
    lora.apply_lora(model, lora.encoder_target_modules(model, "all linear"), rank=R, alpha=ALPHA)
    encoder_linears = {n for n, m in tiny_bert().named_modules()
                       if isinstance(m, nn.Linear) and n.startswith("bert.encoder.")}
    assert len(encoder_linears) == 6 * L
    assert set(lora.lora_layers(model)) == encoder_linears
    assert lora.encoder_target_modules(model, "attention q,v") == ["query", "value"]


def test_unknown_placement_raises():
    with pytest.raises(ValueError, match=r"'ffn'.*'attention q,v'.*'FFN'"):
        lora.encoder_target_modules(tiny_bert(), "ffn")
