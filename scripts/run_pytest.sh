#!/usr/bin/env bash
# Run pytest with the project's conventions. pytest exits 5 when it collected no test: that is a failure for a
# tier that must have tests, and accepted (with a message) only where --allow-empty says the tier may be empty.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
allow_empty=0
if [ "${1:-}" = "--allow-empty" ]; then allow_empty=1; shift; fi
"$PY" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  if [ $allow_empty -eq 1 ]; then
    echo "[run_pytest] no test collected in this tier (allowed: $*)"
    exit 0
  fi
  echo "[run_pytest] pytest collected no test: a tier that must have tests ran none" >&2
fi
exit $rc
