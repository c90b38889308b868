#!/usr/bin/env bash
# The planner's changes checked and timed on the device machine in one call (about 330 s
# on an H200 with a warm machine; give the call a 600 s limit), before the benchmark
# (tools/bench_128k_1m.sh) in a second call:
#
#   bash tools/gpu_plan_checks.sh "$OUT/checks"   # -> $OUT/checks.tgz
#
#   1. attn_mass compiled for the GPU against its reference (windowed diagonals, p in f16);
#      the planner's kernels against its XLA path and the stepped heads, on the GPU backend;
#   2. every 128k plan against the dense planner's (plan_trace --check), serial scheduling;
#   3. mminference's 1M plan by function (2 heads per step), p in f32 and in f16;
#   4. tools/mass_bench.py at 128k and 1M (f16 p, the stride window).
# Carry the ml_collections wheel in .whl/ (WORKSPACE "Running on the GPU").
set -u
out=${1:?usage: gpu_plan_checks.sh OUT_DIR}
mkdir -p "$out"
python3 -c "import ml_collections" 2>/dev/null || python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
git log --oneline -1 > "$out/commit.txt" 2>/dev/null  # stale on the device: say it yourself
echo "== 1. GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider --gpu tests/test_attn_mass.py \
  > "$out/gpu_tests_attn_mass.txt" 2>&1
tail -2 "$out/gpu_tests_attn_mass.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_planning_lists.py \
  tests/test_policies.py -k "planner_kernels_are_the_same or last_query_mass or \
  group_order or stride or heads_per_step" \
  > "$out/gpu_tests_planner.txt" 2>&1
tail -2 "$out/gpu_tests_planner.txt"
echo "== 2. 128k plans against the dense planner"
timeout 150 python3 tools/plan_trace.py --length 131072 --check --top 2 \
  --out "$out/plan_trace_128k_check.json" > "$out/plan_trace_128k_check.txt" 2>&1
grep "plan \|identical" "$out/plan_trace_128k_check.txt"
echo "== 3. mminference at 1M by function"
for p in float32 float16; do
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 python3 tools/plan_trace.py \
    --length 1048576 --policies mminference --heads_per_step 2 --by function --top 25 \
    --mass_p_dtype $p > "$out/plan_trace_1m_mminference_$p.txt" 2>&1
  head -6 "$out/plan_trace_1m_mminference_$p.txt"
done
echo "== 4. mass_bench"
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 tools/mass_bench.py \
  --out "$out/mass_bench.json" > "$out/mass_bench.txt" 2>&1
cat "$out/mass_bench.txt"
# (at most 8 files come back from the device: one archive)
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
