"""Tests of ftbook.workbench (Appendix A)."""
import math
import time

import pytest
import torch

from ftbook import workbench as wb


def test_profile_from_argv_env_and_default(monkeypatch):
    monkeypatch.delenv("FTBOOK_PROFILE", raising=False)
    assert wb.get_profile([]) == "tiny"
    monkeypatch.setenv("FTBOOK_PROFILE", "smoke")
    assert wb.get_profile([]) == "smoke"
    assert wb.get_profile(["--profile", "full", "--other", "x"]) == "full"  # argv wins


def test_bad_profile_names_its_source(monkeypatch):
    with pytest.raises(ValueError, match=r"--profile='huge'.*smoke, tiny, full"):
        wb.get_profile(["--profile", "huge"])
    monkeypatch.setenv("FTBOOK_PROFILE", "tyny")
    with pytest.raises(ValueError, match=r"FTBOOK_PROFILE='tyny'"):
        wb.get_profile([])


def test_pick_lists_defined_profiles():
    assert wb.pick("smoke", {"smoke": 1, "tiny": 2}) == 1
    with pytest.raises(KeyError, match=r"'full'.*\['smoke', 'tiny'\]"):
        wb.pick("full", {"smoke": 1, "tiny": 2})


def test_seed_everything_repeats_draws():
    wb.seed_everything(3)
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    wb.seed_everything(3)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_repo_root_finds_config(tmp_path, monkeypatch):
    monkeypatch.delenv("FTBOOK_ROOT", raising=False)
    assert (wb.repo_root() / "_config.yml").is_file()
    (tmp_path / "_config.yml").write_text("title: x\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert wb.repo_root() == tmp_path


def test_data_dir_errors_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FTBOOK_DATA", str(tmp_path / "nope"))
    with pytest.raises(wb.DataDirError, match=r"FTBOOK_DATA=.*nope.*not a folder.*shared/data"):
        wb.data_dir()
    monkeypatch.setenv("FTBOOK_DATA", str(tmp_path))
    assert wb.data_dir() == tmp_path.resolve()
    # no FTBOOK_DATA, a root with neither data/ nor ../shared/data
    monkeypatch.delenv("FTBOOK_DATA")
    root = tmp_path / "book"
    root.mkdir()
    (root / "_config.yml").write_text("title: x\n")
    monkeypatch.setenv("FTBOOK_ROOT", str(root))
    with pytest.raises(wb.DataDirError, match="FTBOOK_DATA is not set"):
        wb.data_dir()


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FTBOOK_CACHE", str(tmp_path))
    path = wb.cache_dir("x", "y")
    assert path == tmp_path / "x" / "y" and path.is_dir()


def test_timer_and_peak_memory():
    with wb.Timer() as t:
        time.sleep(0.03)
    # time.sleep never returns early; the loose upper bound only catches a unit bug (a loaded
    # machine may wake the sleeper late, so it is not a speed claim)
    assert 0.025 < t.seconds < 3
    with wb.PeakMemory() as m:
        block = torch.ones(32 * 1024 * 1024)  # 128 MiB, touched: resident at the last sample
        time.sleep(0.01)
    del block
    assert 120 * 2**20 < m.peak_bytes < 300 * 2**20  # nothing else of size is allocated


def test_check_finite_raises_with_step():
    assert wb.check_finite(torch.tensor(1.5), "loss", 0) == 1.5
    with pytest.raises(FloatingPointError, match="loss became nan at step 7"):
        wb.check_finite(float("nan"), "loss", 7)


def test_step_meter_times_counts_checks_and_records():
    seen = []
    meter = wb.StepMeter("toy", callback=lambda k, model: seen.append((k, model)) or {"k": k})
    for step in meter.steps(3, bar=False):
        time.sleep(0.01)
        meter.flops += 10.0
        row = meter.record(step, {"loss": float(step), "step": step + 1}, "model")
        assert row is meter.history[-1]
    assert [list(row) for row in meter.history] == [["loss", "step", "seconds", "k"]] * 3
    assert meter.column("step") == [1, 2, 3] and meter.flops == 30.0
    assert seen == [(1, "model"), (2, "model"), (3, "model")]
    # time.sleep never returns early: each step lasted at least 10 ms, the run at least their sum
    assert all(s >= 0.01 for s in meter.column("seconds"))
    assert meter.seconds >= sum(meter.column("seconds"))
    plain = wb.StepMeter("toy", loss_key=None, step_seconds=False)
    for step in plain.steps(2):  # behind a progress bar (silenced in the tests)
        plain.record(step, {"loss": float("nan")})  # not checked
    assert [list(row) for row in plain.history] == [["loss"], ["loss"]]
    checked = wb.StepMeter("toy run", loss_key="objective")
    with pytest.raises(FloatingPointError, match="toy run objective became inf at step 1"):
        for step in checked.steps(3, bar=False):
            checked.record(step, {"objective": [0.5, math.inf, 0.5][step]})
    assert len(checked.history) == 1  # the bad row is not recorded


def test_count_parameters_counts_tied_once():
    from tiny_models import tiny_llama

    model = tiny_llama(64, None, seed=None, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=2048, attn_implementation=None).train()
    assert wb.count_parameters(model) == sum(p.numel() for p in model.parameters())
    untied = sum(p.numel() for p in model.parameters()) + 64 * 16
    assert wb.count_parameters(model) == untied - 64 * 16
    model.model.layers[0].requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.layers[0].parameters())
    assert wb.count_parameters(model, trainable_only=True) == wb.count_parameters(model) - frozen


@pytest.mark.parametrize("training", [False, True])
def test_transformer_flops_matches_flop_counter(training):
    """Eq. (A.1)-(A.3) equal PyTorch's operator count up to the rotary frequency product."""
    from tiny_models import tiny_llama

    model = tiny_llama(300, None, seed=0, hidden_size=48, intermediate_size=96,
                       num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
                       max_position_embeddings=2048).train()
    ids = torch.randint(0, 300, (2, 24))

    def step():
        if training:
            model(input_ids=ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)

    counted = wb.measured_flops(step)
    rotary = 2 * (48 // 3 // 2) * 24
    assert counted - wb.transformer_flops(model, 2, 24, training=training) == rotary


def test_bert_flops_matches_flop_counter():
    """The same formula holds for an encoder (biases and pooler included in N_lin)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        counted = wb.measured_flops(model, input_ids=ids)
    predicted = wb.transformer_flops(model, 2, 16, training=False)
    # the pooler and classifier run on the first token only: 2 (d*d + 2d) per sequence
    pooler_and_head = 2 * (32 * 32 + 2 * 32)
    assert predicted - counted == pooler_and_head * (16 - 1) * 2


def test_matmul_peak_is_positive_and_finite():
    peak = wb.measure_matmul_peak(torch.float32, n=128, device=torch.device("cpu"), repeats=2)
    assert math.isfinite(peak) and peak > 0  # a timing: its size is a measurement, not a check


def test_median_forward_seconds_times_every_model_round_robin():
    import torch

    from ftbook.workbench import median_forward_seconds

    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(self.name)
            return x + self.w

    models = {"a": Probe("a"), "b": Probe("b")}
    result = median_forward_seconds(models, {"x": torch.ones(2)}, repeats=3)
    assert set(result) == {"a", "b"} and all(v >= 0 for v in result.values())
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then alternating
    assert not any(m.training for m in models.values())
