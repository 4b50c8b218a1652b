#!/usr/bin/env bash
# Run the test suite under other torch releases than the one installed, each in its own venv.
#
#   bash scripts/test_torch_versions.sh [VERSION ...]      (default: 2.11.0 2.14.1)
#
# The GPU machines carry torch 2.11 with triton 3.6; the CPU machines torch 2.13 with triton 3.9.
# Each release installs with the triton it pins (2.11.0 -> 3.6, 2.14.1 -> 3.8). On PyPI these are CUDA
# builds (several GB per venv, downloaded once); their tests run on the CPU as in CI.
# Venvs live under $VENVS (default /tmp/sparse_compiler_venvs) and are reused by later runs.
set -u
cd "$(dirname "$0")/.."
VENVS="${VENVS:-/tmp/sparse_compiler_venvs}"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.11.0 2.14.1)
status=0
for v in "${versions[@]}"; do
    venv="$VENVS/torch-$v"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" || { status=1; continue; }
    fi
    echo "=== torch $v ($venv)"
    "$venv/bin/pip" install -q "torch==$v" wheel >/dev/null || { echo "torch $v: install failed"; status=1; continue; }
    # the checkout itself, editable (its entry point registers the backend), with the test extras
    "$venv/bin/pip" install -q --no-build-isolation -e ".[test]" >/dev/null || { echo "torch $v: install of the checkout failed"; status=1; continue; }
    "$venv/bin/python" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider || status=1
done
exit $status
