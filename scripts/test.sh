#!/usr/bin/env bash
# Set up, then run the test suite. Extra arguments go to pytest (e.g. -k collator, -m "not cluster").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# Test-only system packages (the mpirun launcher test), where we may install them: root with apt.
if ! command -v mpirun >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing openmpi-bin for the mpirun launcher test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openmpi-bin) \
    >/dev/null 2>&1 || echo "[test] could not install openmpi-bin: the mpirun test will be skipped" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then  # pytest: no test collected (e.g. a -k filter matched nothing) is not a failure
  echo "pytest collected no tests for: $*" >&2
  exit 0
fi
exit $rc
