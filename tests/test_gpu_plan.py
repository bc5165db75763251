"""book/gpu_plan.py: every chapter has a row, the counts are the book's, the totals add up."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest

PLAN_FILE = Path(__file__).resolve().parents[1] / "book" / "gpu_plan.py"


@pytest.fixture(scope="module")
def gp() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_plan", PLAN_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_plan"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plans(gp: types.ModuleType) -> list:
    return gp.plan()


CHAPTERS = [f"13-{i:02d}" for i in range(1, 11)]


def test_every_chapter_has_a_row(gp, plans) -> None:
    assert [p.chapter for p in plans if p.chapter.startswith("13-")] == CHAPTERS
    table = gp.markdown_table(plans)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == [p.chapter for p in plans] + ["build", "**total**"]


def test_flops_positive_and_finite(gp, plans) -> None:
    for p in plans:
        assert math.isfinite(p.flops) and p.flops >= 0, p.chapter
        assert math.isfinite(p.minutes) and p.minutes >= gp.OVERHEAD_MIN, p.chapter
        for phase in p.phases:
            assert math.isfinite(phase.flops) and phase.flops >= 0, (p.chapter, phase.what)
            assert gp.phase_seconds(phase) >= gp.compute_seconds(phase), (p.chapter, phase.what)
        if p.chapter in CHAPTERS:
            assert p.flops > 0 and p.tokens("train") > 0, p.chapter


def test_models_are_the_full_profile_ones(gp) -> None:
    from ftbook.workbench import count_parameters

    assert count_parameters(gp.model("lm")) == 494_032_768  # Qwen2.5-0.5B, tied embeddings
    assert round(count_parameters(gp.model("encoder")) / 1e6) == 125  # roberta-base + head
    assert gp.layers("lm") == 24 and gp.model("lm").config.hidden_size == 896


def test_training_counts_three_forward_passes(gp) -> None:
    from ftbook.workbench import transformer_flops

    lm = gp.model("lm")
    assert gp.forward_flops("lm", 1, 1) == transformer_flops(lm, 1, 1, training=False)
    assert transformer_flops(lm, 8, 512, training=True) == 3 * gp.forward_flops("lm", 8, 512)
    phase = gp.train("lm", "x", steps=10, batch=8, seq_len=512)
    assert phase.flops == 10 * transformer_flops(lm, 8, 512, training=True)
    assert phase.tokens == 10 * 8 * 512 and phase.calls == 10
    adapters = gp.train("lm", "x", steps=10, batch=8, seq_len=512, passes=2)
    assert adapters.flops == pytest.approx(2 / 3 * phase.flops)


def test_ppo_step_agrees_with_the_books_policy_flops(gp) -> None:
    """13-08 counts a PPO step with `policy_flops`; the plan's phases for one step agree."""
    from ftbook.rlhf_ppo import PPO_CONFIGS, policy_flops

    p = PPO_CONFIGS["full"].ppo
    prompt, new = gp.REVIEW_PROMPT_TOKENS, p.max_new_tokens
    seq = prompt + new
    ours = (gp.generate("lm", "", p.batch_size, prompt, new, p.batch_size).flops
            + gp.forward("lm", "", p.batch_size, seq, p.batch_size).flops
            + gp.forward("lm-cls", "", p.batch_size, seq, 32).flops
            + gp.train("lm", "", p.ppo_epochs * p.num_minibatches,
                       p.batch_size // p.num_minibatches, seq).flops)
    books = policy_flops(types.SimpleNamespace(lm=gp.model("lm")), p.batch_size * seq,
                         p.batch_size * new, p.ppo_epochs, 2.0)
    assert ours == pytest.approx(books, rel=0.1)


def test_total_is_the_sum_of_the_rows(gp, plans) -> None:
    total = gp.total_minutes(plans)
    assert total == pytest.approx(sum(p.minutes for p in plans) + gp.RENDER_MIN)
    table = gp.markdown_table(plans).splitlines()
    shown = [float(line.rstrip(" |").rsplit("|", 1)[1].strip(" *")) for line in table[2:]]
    assert shown[-1] == pytest.approx(total, abs=0.05)
    assert sum(shown[:-1]) == pytest.approx(total, abs=0.05 * len(shown))


def test_plan_follows_the_configs(gp, plans) -> None:
    """Halving 13-01's steps lowers its FLOPs, and 13-07's (its gold classifier reuses them)."""
    from ftbook.full_finetuning import FT_CONFIGS

    steps = FT_CONFIGS["full"].steps
    cut = {p.chapter: p for p in gp.plan({"FT_CONFIGS": {"steps": steps // 2}})}
    before = {p.chapter: p for p in plans}
    assert cut["13-01"].flops < before["13-01"].flops
    assert cut["13-07"].flops < before["13-07"].flops
    assert cut["13-08"].flops == before["13-08"].flops
    assert gp.plan() == plans  # the cuts were undone


def test_proposed_cuts_are_valid_configs_that_fit(gp) -> None:
    for table, changes in gp.PROPOSED_CUTS.items():
        config = gp.full_config(table)
        assert dataclasses.is_dataclass(config)
        gp.with_changes(config, changes)  # __post_init__ accepts the new values
        assert set(changes) <= {f.name for f in dataclasses.fields(config)}, table
    assert gp.total_minutes(gp.plan(gp.PROPOSED_CUTS)) <= gp.BUDGET_MIN


def test_before_cuts_are_the_uncut_values(gp, plans) -> None:
    """`BEFORE_CUTS` holds valid old values of fields the configurations have changed since."""
    for table, changes in gp.BEFORE_CUTS.items():
        config = gp.full_config(table)
        gp.with_changes(config, changes)  # __post_init__ accepts the old values
        assert set(changes) <= {f.name for f in dataclasses.fields(config)}, table
        assert gp.pending_cuts({table: changes}) == {table: changes}, table  # all differ now
    assert gp.total_minutes(gp.plan(gp.BEFORE_CUTS)) > 5 * gp.total_minutes(plans)
    table = gp.cuts_table(gp.BEFORE_CUTS)
    assert "`steps` 2000 -> 1000" in table and "`ppo.num_minibatches` 4 -> 2" in table


def test_pending_cuts_drop_applied_values(gp) -> None:
    from ftbook.full_finetuning import FT_CONFIGS

    steps = FT_CONFIGS["full"].steps
    assert gp.pending_cuts({"FT_CONFIGS": {"steps": steps}}) == {}
    assert gp.pending_cuts({"FT_CONFIGS": {"steps": steps + 1, "lm_steps": FT_CONFIGS[
        "full"].lm_steps}}) == {"FT_CONFIGS": {"steps": steps + 1}}
    assert gp.pending_cuts({"PPO_CONFIGS": {"ppo": {"num_minibatches": gp.full_config(
        "PPO_CONFIGS").ppo.num_minibatches}}}) == {}


def test_headline_comparisons_keep_two_seeds(gp) -> None:
    """The cuts keep at least two seeds where the book compares across seeds."""
    assert len(gp.full_config("DPO_CONFIGS").seeds) >= 2
    assert gp.full_config("PPO_CONFIGS").main_seeds >= 2
    assert len(gp.full_config("LORA_CONFIGS").seeds) >= 2
    assert len(gp.full_config("ADAPTER_CONFIGS").seeds) >= 2
