"""Tests of ftbook.adapters (chapter 13-04): IA3 (eqs. 4.1, 4.2) and its PEFT parity, the harness
on every method, the adapter bank, and LoRA merging (eqs. 4.3, 4.4) against PEFT.

Two computations of a whole model are compared in float64, to `PARITY_TOLERANCE` (13-02); single
layers and merged factors in float32, to the bound of Appendix A on their sums."""
import copy
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from tiny_models import FFN, D, L, bert_batch, tiny_bert

from ftbook.adapters import (
    ADAPTER_CONFIGS,
    MERGEABLE,
    METHODS,
    AdapterBank,
    IA3Linear,
    apply_ia3,
    bytes_on_disk,
    combine_lora,
    copy_ia3_into_peft,
    dequantize_model,
    encoder_ia3_targets,
    for_inference,
    ia3_layers,
    merge_ia3,
    non_review_sentences,
    prepare_method,
    review_detection_task,
    run_method,
    trained_state,
)
from ftbook.lora import PARITY_TOLERANCE, apply_lora, lora_layers
from ftbook.workbench import rounding_bound


def randomize_ia3(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            layer.ia3_l.copy_(0.5 + torch.rand(layer.ia3_l.shape, generator=generator))


# --- IA3 ------------------------------------------------------------------------------------------

def test_ia3_linear_scales_outputs_or_inputs():
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    out_layer, in_layer = IA3Linear(copy.deepcopy(base)), IA3Linear(copy.deepcopy(base), True)
    assert out_layer.ia3_l.shape == (3,) and in_layer.ia3_l.shape == (4,)
    with torch.no_grad():
        out_layer.ia3_l.copy_(torch.tensor([2.0, 0.5, 1.0]))
        in_layer.ia3_l.copy_(torch.tensor([1.0, 0.0, 3.0, 1.0]))
    # the same operations as the layer's definition: equal to the last bit
    assert torch.equal(out_layer(x), base(x) * torch.tensor([2.0, 0.5, 1.0]))
    assert torch.equal(in_layer(x), base(x * torch.tensor([1.0, 0.0, 3.0, 1.0])))
    scalings = ((out_layer, out_layer.ia3_l, 1.0), (in_layer, 1.0, in_layer.ia3_l))
    for layer, ell_out, ell_in in scalings:
        # eq. (4.2): a 4-term dot product, the bias and the scalings, at most 7 roundings on
        # either side, each within gamma_7 of the sum of absolute terms (Appendix A)
        with torch.no_grad():
            abs_terms = ell_out * ((x.abs() * ell_in) @ base.weight.abs().T + base.bias.abs())
            gap = (layer.merged()(x) - layer(x)).abs()
        assert (gap <= 2 * rounding_bound(8, abs_terms)).all()
    assert not out_layer.base.weight.requires_grad


def test_ia3_starts_as_identity_and_counts_parameters():
    model = tiny_bert()
    targets, ff = encoder_ia3_targets(model)
    ia3 = apply_ia3(copy.deepcopy(model), targets, ff, modules_to_save=["classifier"])
    batch = bert_batch()
    with torch.no_grad():
        assert torch.equal(ia3(**batch).logits, model(**batch).logits)
    vectors = sum(p.numel() for n, p in ia3.named_parameters() if "ia3_l" in n)
    assert vectors == L * (2 * D + FFN)
    ffn_layers = [n for n, m in ia3_layers(ia3).items() if m.feedforward]
    assert ffn_layers == [f"bert.encoder.layer.{i}.output.dense" for i in range(L)]


def test_ia3_bad_targets_are_clear_errors():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_ia3(tiny_bert(), ["key", "nope"], [])
    with pytest.raises(ValueError, match="not in target_modules"):
        apply_ia3(tiny_bert(), ["key"], ["intermediate.dense"])
    with pytest.raises(ValueError, match="empty"):
        apply_ia3(tiny_bert(), [], [])


def test_ia3_matches_peft_logits_gradients_and_merge():
    model = tiny_bert().double()  # float64: see the module docstring
    targets, ff = encoder_ia3_targets(model)
    ours = apply_ia3(copy.deepcopy(model), targets, ff, modules_to_save=["classifier"])
    randomize_ia3(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(model), IA3Config(
            target_modules=targets, feedforward_modules=ff, modules_to_save=["classifier"]))
    copy_ia3_into_peft(ours, theirs)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        theirs.get_nb_trainable_parameters()[0]
    batch = {**bert_batch(), "labels": torch.tensor([0, 1, 1, 0])}
    a, b = ours(**batch), theirs(**batch)
    assert (a.logits - b.logits).abs().max() < PARITY_TOLERANCE
    a.loss.backward()
    b.loss.backward()
    peft_params = dict(theirs.named_parameters())
    for name, layer in ia3_layers(ours).items():
        grad = peft_params[f"base_model.model.{name}.ia3_l.default"].grad.flatten()
        assert (layer.ia3_l.grad - grad).abs().max() < PARITY_TOLERANCE
    with torch.no_grad():
        merged_ours = merge_ia3(copy.deepcopy(ours))
        merged_peft = theirs.merge_and_unload()
        assert not ia3_layers(merged_ours)
        gap = (merged_ours(**batch).logits - merged_peft(**batch).logits).abs().max()
        assert gap < PARITY_TOLERANCE


# --- harness --------------------------------------------------------------------------------------

def test_prepare_method_rejects_unknown():
    with pytest.raises(ValueError, match="unknown method"):
        prepare_method("BitFit", tiny_bert(), ADAPTER_CONFIGS["smoke"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_deploys(method, real_env):
    """Each method runs through the harness in the smoke profile and the deployable model
    gives the trained model's outputs (merged where the method allows)."""
    from datasets import Dataset

    rows = {"sentence": ["a fine film", "dull and long", "very good", "bad"] * 4,
            "label": [1, 0, 1, 0] * 4}
    data = Dataset.from_dict(rows)
    cfg = ADAPTER_CONFIGS["smoke"]
    result, deployable = run_method(method, "smoke", cfg, data, data, seed=0,
                                    device=torch.device("cpu"), max_len=16, bf16=False)
    assert 0 <= result["dev accuracy"] <= 1
    assert result["trainable params"] > 0 and 0 < result["trainable %"] <= 100
    assert result["adapter MiB"] > 0
    if method == "full fine-tuning":
        assert result["trainable %"] == 100
    else:
        assert result["trainable %"] < 100
    if MERGEABLE[method] and method not in ("feature extraction", "full fine-tuning"):
        assert not lora_layers(deployable) and not ia3_layers(deployable)


def test_for_inference_keeps_outputs_for_mergeable_methods():
    cfg = ADAPTER_CONFIGS["smoke"]
    batch = bert_batch()
    for method in ("LoRA", "IA3"):
        model = prepare_method(method, tiny_bert().double(), cfg)  # float64, as for parity
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
            before = model(**batch).logits
            after = for_inference(method, model)(**batch).logits
        assert (before - after).abs().max() < PARITY_TOLERANCE, method


def test_dequantize_model_restores_plain_linears():
    from ftbook.qlora import NF4Linear, quantize_model

    model = quantize_model(tiny_bert())
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    batch = bert_batch()
    # float64 compute on both sides: the plain model must hold exactly the dequantized weights
    model = model.double()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module.compute_dtype = torch.float64
    with torch.no_grad():
        quantized = model(**batch).logits
        plain = dequantize_model(model, dtype=torch.float64)
        assert not any(isinstance(m, NF4Linear) for m in plain.modules())
        assert (plain(**batch).logits - quantized).abs().max() < PARITY_TOLERANCE


def test_trained_state_and_size_on_disk():
    model = apply_lora(tiny_bert(), ["query", "value"], 2, 4, modules_to_save=["classifier"])
    state = trained_state(model)
    assert all(("lora_" in k) or ("classifier" in k) for k in state)
    numbers = sum(v.numel() for v in state.values())
    size = bytes_on_disk(state)
    assert 4 * numbers <= size < 4 * numbers + 4096  # float32 data plus a small header


# --- bank and merging -----------------------------------------------------------------------------

def test_adapter_bank_switches_and_reproduces_each_adapter():
    batch = bert_batch()
    models, states = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = apply_lora(tiny_bert(), ["query", "value"], 2, 4, modules_to_save=["classifier"])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        models.append(model)
        states.append(trained_state(model))
    bank = AdapterBank(apply_lora(tiny_bert(), ["query", "value"], 2, 4,
                                  modules_to_save=["classifier"]))
    bank.add("one", states[0])
    bank.add("two", states[1])
    with torch.no_grad():
        for name, model in (("two", models[1]), ("one", models[0]), ("two", models[1])):
            assert torch.equal(bank.activate(name)(**batch).logits, model(**batch).logits)
    with pytest.raises(KeyError, match="holds"):
        bank.activate("three")
    with pytest.raises(KeyError, match="lacks"):
        bank.add("bad", {"not.a.parameter": torch.zeros(1)})


def two_lora_states():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = apply_lora(tiny_bert(), ["query", "value"], 2, 4)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_()
        states.append(trained_state(model))
    return states


def test_cat_merge_is_exact_task_arithmetic_and_linear_adds_cross_terms():
    states = two_lora_states()
    s = 4 / 2
    weights = (0.7, 0.4)
    cat = combine_lora(states, [s, s], weights, "cat")
    linear = combine_lora(states, [s, s], weights, "linear")
    for key in (k for k in cat if k.endswith("lora_A")):
        key_b = key[:-1] + "B"
        want = sum(w * s * st[key_b] @ st[key] for w, st in zip(weights, states, strict=True))
        # eq. (4.3): both sides sum the same 4 products of coefficient, B and A entries, with
        # at most 7 roundings along any path: within twice gamma_7 of the absolute terms
        abs_want = sum(w * s * st[key_b].abs() @ st[key].abs()
                       for w, st in zip(weights, states, strict=True))
        assert ((cat[key_b] @ cat[key] - want).abs() <= 2 * rounding_bound(8, abs_want)).all()
        a1, a2 = states[0][key], states[1][key]
        b1, b2 = states[0][key_b], states[1][key_b]
        cross = (weights[0] * s * weights[1] * s) ** 0.5 * (b1 @ a2 + b2 @ a1)
        # eq. (4.4): (r1 B1 + r2 B2)(r1 A1 + r2 A2) expands into the same terms, cross terms
        # included, with at most 9 roundings along any path
        roots = [(w * s) ** 0.5 for w in weights]
        abs_linear = ((roots[0] * b1.abs() + roots[1] * b2.abs())
                      @ (roots[0] * a1.abs() + roots[1] * a2.abs()))
        gap = (linear[key_b] @ linear[key] - want - cross).abs()
        assert (gap <= 2 * rounding_bound(10, abs_linear)).all()
        assert cat[key].shape[0] == 4 and linear[key].shape[0] == 2


def test_combine_lora_matches_peft_add_weighted_adapter():
    states = two_lora_states()
    targets = ["query", "value"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4,
                                                            target_modules=targets), "a")
        peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for adapter, state in zip(("a", "b"), states, strict=True):
            for key, value in state.items():
                params[f"base_model.model.{key}.{adapter}.weight"].copy_(value)
    for how, weights in (("cat", [1.0, 0.5]), ("linear", [0.5, 0.5]), ("linear", [1.0, -0.5])):
        name = f"{how}_{len(weights)}_{int(100 * weights[1])}".replace("-", "m")
        peft_model.add_weighted_adapter(["a", "b"], weights, name, combination_type=how)
        params = dict(peft_model.named_parameters())
        ours = combine_lora(states, [2.0, 2.0], weights, how)
        # an entry is a sum of at most two products c_i X_i, c_i made of w_i, s_i and perhaps a
        # square root: within gamma_5 of sum |c_i| max |X| for either implementation
        coefficients = sum(max(abs(w) * 2.0, (abs(w) * 2.0) ** 0.5, 1.0) for w in weights)
        for key, value in ours.items():
            largest = max(st[key].abs().max().item() for st in states)
            bound = 2 * rounding_bound(6, coefficients * largest)
            gap = (params[f"base_model.model.{key}.{name}.weight"] - value).abs().max().item()
            assert gap <= bound, (how, weights, key)


def test_combine_lora_bad_input():
    states = two_lora_states()
    with pytest.raises(ValueError, match="'cat' or 'linear'"):
        combine_lora(states, [1, 1], [1, 1], "svd")
    with pytest.raises(ValueError, match="same"):
        combine_lora(states, [1], [1, 1])
    torch.manual_seed(3)
    other = trained_state(apply_lora(tiny_bert(), ["query", "value"], 4, 4))
    with pytest.raises(ValueError, match="equal rank"):
        combine_lora([states[0], other], [1, 1], [1, 1], "linear")
    assert combine_lora([states[0], other], [1, 1], [1, 1], "cat")


def test_review_detection_task_is_balanced_seeded_and_normalised(real_env):
    a = review_detection_task(40, seed=0)
    b = review_detection_task(40, seed=0)
    assert a["sentence"] == b["sentence"] and a["label"] == b["label"]
    assert sum(a["label"]) == 20 and len(a) == 40
    negatives = [s for s, y in zip(a["sentence"], a["label"], strict=True) if y == 0]
    assert all(s == s.lower() and 5 <= len(s.split()) for s in negatives)
    with pytest.raises(ValueError, match="at least 2"):
        review_detection_task(1, seed=0)


def test_review_detection_splits_share_no_sentence_and_refuse_what_they_lack(real_env):
    train, dev = non_review_sentences("train"), non_review_sentences("validation")
    assert train and dev and not set(train) & set(dev)
    assert len(set(train)) == len(train)  # distinct
    task = review_detection_task(40, seed=0, split="validation")
    negatives = {s for s, y in zip(task["sentence"], task["label"], strict=True) if y == 0}
    assert negatives <= set(dev)
    with pytest.raises(ValueError, match="ask for at most"):
        review_detection_task(2 * len(dev) + 2, seed=0, split="validation")
    with pytest.raises(ValueError, match="split must be"):
        non_review_sentences("test")
