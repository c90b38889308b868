#!/usr/bin/env bash
# The attention benchmark at 128k and 1M as the results READMEs run it, for one device call
# (about 410 s on an H200 with a warm machine; give the call a 600 s limit):
#
#   bash tools/bench_128k_1m.sh "$OUT/bench"   # -> $OUT/bench.tgz (attention_128k/, attention_1m/, logs)
#
# tools/bench_lengths.sh with 131072:5:2:200 and 1048576:2:1:330; OUT_DIR is removed once
# archived (PACK=$OUT/bench.tgz with OUT_DIR outside $OUT: the archive goes there, written
# after each length, so a call cut short keeps what ran).
# Optional: PLAN_CHECK=1 first checks every 128k plan against the dense planner (~50 s);
# BENCH_FLAGS="--config.planner.score_topk_impl=pallas ..." adds flags to both runs.
# Carry the ml_collections wheel in .whl/ (WORKSPACE "Running on the GPU").
set -u
out=${1:?usage: bench_128k_1m.sh OUT_DIR}
mkdir -p "$out"
if [ "${PLAN_CHECK:-0}" = 1 ]; then
  . "$(dirname "$0")/device_env.sh" || exit 1
  timeout 150 python3 tools/plan_trace.py --length 131072 --check --top 2 \
    --out "$out/plan_trace_128k_check.json" > "$out/plan_trace_128k_check.txt" 2>&1
  grep "plan \|identical" "$out/plan_trace_128k_check.txt"
fi
bash "$(dirname "$0")/bench_lengths.sh" "$out" 131072:5:2:200 1048576:2:1:330 && rm -rf "$out"
