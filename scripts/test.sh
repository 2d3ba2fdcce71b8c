#!/usr/bin/env bash
# Set up, then run the test suite. Extra arguments go to pytest (e.g. -k collator, -m "not cluster").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# Test-only system packages, where we may install them (root with apt): Open MPI for the mpirun launcher test;
# Slurm, munge, sshd and pdsh for the cluster tests (tests/localcluster.py starts its own daemons and ends
# them; the install itself must start none, hence a policy-rc.d that refuses service starts meanwhile).
test_packages="slurmctld slurmd slurm-client munge openssh-server pdsh openmpi-bin"
missing=0
for exe in mpirun slurmctld slurmd sbatch munged sshd pdsh; do
  command -v "$exe" >/dev/null 2>&1 || [[ -x /usr/sbin/$exe ]] || missing=1
done
if (( missing )) && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing $test_packages (mpirun and cluster tests)" >&2
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    { printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1; } || true
  fi
  # shellcheck disable=SC2086
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $test_packages) \
    >/dev/null 2>&1 || echo "[test] could not install them: the mpirun and cluster tests will be skipped" >&2
  if (( made_policy )); then rm -f "$policy"; fi
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
