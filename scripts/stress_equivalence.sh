#!/usr/bin/env bash
# Run every equivalence test (tests/test_equivalence.py, test_mixing.py's and test_train_step.py's layout tests) under
# other summation orders: narrower ISAs, other device counts, one and two CPU threads.
# One line per configuration (pass/fail, seconds); exit status 1 if any fails.
#   bash scripts/stress_equivalence.sh [OUT.txt]   (OUT: the same lines plus machine facts)
# Threads: in jax 0.10.2 XLA:CPU sizes its thread pools from the CPU affinity mask, so `taskset`
# sets them (observed: 1 busy thread with `taskset -c 0`, 3 with `-c 0,1`);
# --xla_cpu_multi_thread_eigen=false alone still left 4 busy threads, and
# intra_op_parallelism_threads is not an XLA flag (XLA rejects it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/dev/null}
PY=.venv/bin/python
TESTS="tests/test_equivalence.py tests/test_mixing.py::test_mix_batch_is_the_same_per_example_on_one_device_under_pmap_and_on_a_mesh tests/test_train_step.py::test_single_device_jit_mesh_and_pmap_agree"
# name | XLA_FLAGS | LMOE_TEST_DEVICES | CPUs for taskset
CONFIGS=(
  "default||8|0-$(($(nproc) - 1))"
  "isa=AVX2|--xla_cpu_max_isa=AVX2|8|0-$(($(nproc) - 1))"
  "isa=AVX|--xla_cpu_max_isa=AVX|8|0-$(($(nproc) - 1))"
  "devices=4|--xla_cpu_max_isa=AVX2|4|0-$(($(nproc) - 1))"
  "devices=2||2|0-$(($(nproc) - 1))"
  "threads=1|--xla_cpu_max_isa=AVX2|8|0"
  "threads=2||8|0,1"
)
{
  echo "stress_equivalence $(date -u '+%Y-%m-%d %H:%M UTC') commit $(git rev-parse --short HEAD)"
  echo "cpu: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p'); avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); cores: $(nproc)"
  echo "load average before: $(cat /proc/loadavg)"
} | tee "$OUT"
failed=0
for c in "${CONFIGS[@]}"; do
  IFS='|' read -r name flags devices cpus <<<"$c"
  start=$(date +%s)
  if XLA_FLAGS="$flags" LMOE_TEST_DEVICES="$devices" taskset -c "$cpus" \
      $PY -m pytest $TESTS -q -p no:cacheprovider >/tmp/stress_equivalence_$$.log 2>&1; then
    status=pass
  else
    status=FAIL; failed=1
  fi
  summary=$(tail -1 /tmp/stress_equivalence_$$.log)
  echo "$status $name (XLA_FLAGS='$flags' devices=$devices cpus=$cpus) $(($(date +%s) - start)) s: $summary" | tee -a "$OUT"
  [ "$status" = FAIL ] && grep -E '^(FAILED|E )' /tmp/stress_equivalence_$$.log | head -5 | tee -a "$OUT"
done
rm -f /tmp/stress_equivalence_$$.log
echo "load average after: $(cat /proc/loadavg)" | tee -a "$OUT"
exit $failed
