#!/usr/bin/env bash
# The book's two entry points; each sets up everything it needs on a fresh machine.
#   bash book/make.sh build [--force]
#       install, check the tangle, execute the chapters whose inputs changed (all with --force;
#       book/execute.py), render _build/html, check every page in headless Chromium
#       (book/check_site.py) and print the per-chapter timings (_build/timings.json)
#   bash book/make.sh test [pytest args]
#       install, check the tangle, lint, build and check the smoke-profile site
#       (_build/smoke/_build/html), run the tests
# Environment: FTBOOK_DATA (data folder), FTBOOK_PROFILE (smoke|tiny|full; build default tiny),
# PYTHON (interpreter for the venv, default python3), FTBOOK_TORCH (torch pin, default 2.13.0),
# FTBOOK_CHROMIUM (browser for the site check, default /usr/bin/chromium from apt),
# FTBOOK_CUDA (1: install for a CUDA GPU, 0: for the CPU, default: 1 when nvidia-smi sees a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# A CUDA machine (the publish workflow's) gets PyPI's CUDA torch and unsloth with its own
# dependencies (xformers, triton, torchvision: its GPU kernels); a CPU machine gets the CPU torch
# and unsloth without them (requirements-nodeps.txt says why).
cuda_machine() {
  case "${FTBOOK_CUDA:-auto}" in
    1) return 0 ;;
    0) return 1 ;;
    *) command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 ;;
  esac
}

setup() {
  if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local mode=cpu
  cuda_machine && mode=cuda
  local stamp="$VENV/.ftbook-installed-$mode"
  if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-nodeps.txt -nt "$stamp" ] \
    || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing requirements for a $mode machine (first run: a few minutes)"
    local start=$SECONDS
    local pip=("$PY" -m pip install -q --disable-pip-version-check)
    # torch first, pinned: on a CPU machine a CPU wheel where one is available locally (an
    # unpinned torch can pull a multi-GB CUDA build); on a CUDA machine PyPI's CUDA build.
    "${pip[@]}" "torch==${FTBOOK_TORCH:-2.13.0}"
    "${pip[@]}" -r requirements.txt
    if [ "$mode" = cuda ]; then
      # unsloth and unsloth_zoo with their dependencies, the torch above held in place
      local constraints="$VENV/constraints-cuda.txt"
      "$PY" -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > "$constraints"
      "${pip[@]}" -c "$constraints" $(grep -E '^unsloth(_zoo)?==' requirements-nodeps.txt)
      "${pip[@]}" --no-deps $(grep -vE '^(#|unsloth(_zoo)?==|$)' requirements-nodeps.txt)
    else
      # unsloth (13-10) without its dependency resolution: see requirements-nodeps.txt
      "${pip[@]}" --no-deps -r requirements-nodeps.txt
      if "$PY" -m pip show torchvision >/dev/null 2>&1; then
        "$PY" -m pip uninstall -y -q torchvision
      fi
    fi
    "${pip[@]}" --no-deps -e .
    rm -f "$VENV"/.ftbook-installed-*
    touch "$stamp"
    echo "== installed in $((SECONDS - start)) s; venv size $(du -sh "$VENV" | cut -f1)"
  fi
  "$PY" book/tangle.py --check
  ensure_chromium
}

# The site check drives Debian's chromium; Playwright's own browser download is not used.
ensure_chromium() {
  local browser="${FTBOOK_CHROMIUM:-/usr/bin/chromium}"
  [ -x "$browser" ] && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n"; }
  if { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; } && command -v apt-get >/dev/null; then
    echo "== installing Debian's chromium for the site check"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  fi
  if [ ! -x "$browser" ]; then
    echo "no browser at $browser: install Debian's chromium (apt-get install chromium) or set FTBOOK_CHROMIUM" >&2
    exit 1
  fi
}

# render PROFILE OUTPUT: Jupyter Book renders the notebooks book/execute.py executed, into
# OUTPUT/_build/html; warnings (an unresolved reference or citation) fail the build.
render() {
  rm -rf "$2/_build/html" "$2/_build/.doctrees" "$2/_build/jupyter_execute"
  FTBOOK_PROFILE="$1" "$VENV/bin/jupyter-book" build "$ROOT" --path-output "$2" -W --keep-going
}

case "${1:-}" in
  build)
    setup
    export FTBOOK_PROFILE="${FTBOOK_PROFILE:-tiny}"
    echo "== building the book (profile $FTBOOK_PROFILE)"
    start=$SECONDS
    "$PY" book/execute.py --profile "$FTBOOK_PROFILE" --timings _build/timings.json "${@:2}"
    render "$FTBOOK_PROFILE" "$ROOT"
    "$PY" book/check_site.py _build/html
    "$PY" book/execute.py --print-timings _build/timings.json
    echo "== book built in $((SECONDS - start)) s: open _build/html/index.html"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check src book tests chapters
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    echo "== the smoke-profile site: execute every chapter, render, check in Chromium"
    start=$SECONDS
    site=0
    { "$PY" book/execute.py --profile smoke --timings _build/smoke/timings.json \
        && render smoke _build/smoke && "$PY" book/check_site.py _build/smoke/_build/html; } \
      || site=$?
    echo "== smoke site built and checked in $((SECONDS - start)) s (status $site)"
    # loadfile: the chapter scripts run in order in one worker (13-02 reuses what 13-01 cached)
    "$PY" -m pytest -n "${FTBOOK_TEST_WORKERS:-2}" --dist loadfile -q "${@:2}" || exit $?
    if [ "$site" != 0 ]; then
      echo "the smoke-profile site failed (see above)" >&2
      exit "$site"
    fi
    ;;
  *)
    echo "usage: bash book/make.sh build|test [pytest args]" >&2
    exit 2
    ;;
esac
