"""Shared fixtures: the repository root, the data folder and an isolated cache per worker."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """`$FTBOOK_DATA`, else `../shared/data` beside the repository, else None."""
    env = os.environ.get("FTBOOK_DATA")
    candidate = Path(env) if env else ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data folder; tests that need it skip with a reason when it is absent."""
    path = shared_data()
    if path is None:
        pytest.skip("no data folder: set FTBOOK_DATA to a folder laid out like shared/data")
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per test worker, so tests never touch the book's .cache/."""
    return tmp_path_factory.mktemp("ftbook-cache")


@pytest.fixture
def real_env(monkeypatch: pytest.MonkeyPatch, data_root: Path, session_cache: Path) -> None:
    """Point the book at the real data and the worker's cache, offline."""
    monkeypatch.setenv("FTBOOK_DATA", str(data_root))
    monkeypatch.setenv("FTBOOK_CACHE", str(session_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FTBOOK_NO_PROGRESS", "1")
