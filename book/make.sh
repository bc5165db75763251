#!/usr/bin/env bash
# The book's two entry points; each sets up everything it needs on a fresh machine.
#   bash book/make.sh build   install, check the tangle, execute every chapter, write _build/html
#   bash book/make.sh test    install, check the tangle, lint, run the tests
# Environment: FTBOOK_DATA (data folder), FTBOOK_PROFILE (smoke|tiny|full; build default tiny),
# PYTHON (interpreter for the venv, default python3), FTBOOK_TORCH (torch pin, default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local stamp="$VENV/.ftbook-installed"
  if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-nodeps.txt -nt "$stamp" ] \
    || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing requirements (first run: a few minutes)"
    local start=$SECONDS
    # torch first, pinned: a CPU wheel where one is available locally; an unpinned torch can
    # pull a multi-GB CUDA build. Never torchvision (PyPI's does not load beside this torch).
    "$PY" -m pip install -q --disable-pip-version-check "torch==${FTBOOK_TORCH:-2.13.0}"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
    # unsloth (13-10) without its dependency resolution: see requirements-nodeps.txt
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -e .
    if "$PY" -m pip show torchvision >/dev/null 2>&1; then
      "$PY" -m pip uninstall -y -q torchvision
    fi
    touch "$stamp"
    echo "== installed in $((SECONDS - start)) s; venv size $(du -sh "$VENV" | cut -f1)"
  fi
  "$PY" book/tangle.py --check
}

case "${1:-}" in
  build)
    setup
    export FTBOOK_PROFILE="${FTBOOK_PROFILE:-tiny}"
    echo "== building the book (profile $FTBOOK_PROFILE)"
    start=$SECONDS
    rm -rf _build/html _build/.doctrees _build/jupyter_execute
    "$VENV/bin/jupyter-book" build "$ROOT"
    echo "== book built in $((SECONDS - start)) s: open _build/html/index.html"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check src book tests chapters
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    # loadfile: the chapter scripts run in order in one worker (13-02 reuses what 13-01 cached)
    "$PY" -m pytest -n "${FTBOOK_TEST_WORKERS:-2}" --dist loadfile -q "${@:2}"
    ;;
  *)
    echo "usage: bash book/make.sh build|test [pytest args]" >&2
    exit 2
    ;;
esac
