"""Every chapter runs top to bottom as a script in the smoke profile."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("[0-9][0-9]_[0-9][0-9]_*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_as_smoke_script(chapter, data_root, session_cache, tmp_path):
    env = {**os.environ, "FTBOOK_PROFILE": "tiny", "FTBOOK_DATA": str(data_root),
           "FTBOOK_CACHE": str(session_cache), "HF_HUB_OFFLINE": "1", "FTBOOK_NO_PROGRESS": "1",
           "MPLBACKEND": "Agg"}
    # --profile on the command line must win over FTBOOK_PROFILE; run from another folder to
    # check that nothing depends on the working directory.
    script = str(ROOT / "chapters" / chapter)
    result = subprocess.run([sys.executable, script, "--profile", "smoke"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    tail = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"{chapter} failed:\n{tail}"
    assert "profile : smoke" in result.stdout
