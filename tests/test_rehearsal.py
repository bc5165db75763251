"""Every chapter runs top to bottom as a script in a rehearsal of the full profile
(`FTBOOK_PROFILE=full FTBOOK_REHEARSE=1`): the full profile's code path and model classes
(RoBERTa, Qwen2 with a ChatML byte-level BPE tokenizer) with random stand-in weights on shrunk
configurations and the smoke profile's sizes, so that a full-profile breakage shows on a CPU.

The chapters share one rehearsal cache, in order (pytest-xdist `--dist loadfile` keeps this file
in one worker), so a chapter reuses what an earlier one built (13-07 reads 13-06's SFT model).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "chapters").glob("[0-9][0-9]_[0-9][0-9]_*.py"))


@pytest.fixture(scope="module")
def rehearsal_env(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The environment of a rehearsal, its stand-in models built once in a fresh cache."""
    env = {**os.environ, "FTBOOK_PROFILE": "full", "FTBOOK_REHEARSE": "1",
           "FTBOOK_DATA": str(data_root), "FTBOOK_CACHE": str(tmp_path_factory.mktemp("rehearse")),
           "HF_HUB_OFFLINE": "1", "FTBOOK_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}
    build = subprocess.run(
        [sys.executable, "-c",
         "from ftbook.base_models import build_rehearsal_models; build_rehearsal_models()"],
        env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return env


def test_rehearsal_shrinks_sizes_and_keeps_the_code_path(monkeypatch):
    from ftbook.dpo_grpo import DPO_CONFIGS
    from ftbook.instruction_tuning import SFT_RECIPES
    from ftbook.rlhf_ppo import PPO_CONFIGS
    from ftbook.workbench import pick

    monkeypatch.setenv("FTBOOK_REHEARSE", "1")
    sft = pick("full", SFT_RECIPES)
    assert (sft.steps, sft.seq_len) == (SFT_RECIPES["smoke"].steps, SFT_RECIPES["smoke"].seq_len)
    assert sft.lora_rank is None and sft.bf16 and sft.lr == SFT_RECIPES["full"].lr  # full's path
    ppo = pick("full", PPO_CONFIGS)
    assert ppo.ppo.batch_size == PPO_CONFIGS["smoke"].ppo.batch_size  # nested dataclasses too
    assert ppo.lora_rank is None and ppo.ppo.lr == PPO_CONFIGS["full"].ppo.lr
    dpo = pick("full", DPO_CONFIGS)
    assert dpo.rlvr_task == DPO_CONFIGS["full"].rlvr_task  # GSM8K, as in full
    monkeypatch.setenv("FTBOOK_REHEARSE", "0")
    assert pick("full", SFT_RECIPES) is SFT_RECIPES["full"]


def test_rehearsal_keeps_its_own_cache_and_outputs(monkeypatch, tmp_path):
    from ftbook.workbench import cache_dir, outputs_dir

    monkeypatch.setenv("FTBOOK_CACHE", str(tmp_path))
    monkeypatch.setenv("FTBOOK_REHEARSE", "1")
    assert cache_dir("x") == tmp_path / "rehearsal" / "x"
    assert outputs_dir("13_01_x").parent.name == "rehearsal"
    monkeypatch.setenv("FTBOOK_REHEARSE", "0")
    assert cache_dir("x") == tmp_path / "x"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_rehearses_the_full_profile(chapter: str, rehearsal_env: dict, tmp_path: Path):
    script = str(ROOT / "chapters" / f"{chapter}.py")
    result = subprocess.run([sys.executable, script], cwd=tmp_path, env=rehearsal_env,
                            capture_output=True, text=True, timeout=600)
    tail = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"{chapter} failed in the rehearsal:\n{tail}"
    assert "profile : full" in result.stdout
