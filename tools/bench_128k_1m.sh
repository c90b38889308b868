#!/usr/bin/env bash
# The attention benchmark at 128k and 1M as the results READMEs run it, for one device call
# (about 410 s on an H200 with a warm machine; give the call a 600 s limit):
#
#   bash tools/bench_128k_1m.sh "$OUT/bench"   # -> $OUT/bench.tgz (attention_128k/, attention_1m/, logs)
#
# PACK=$OUT/bench.tgz with OUT_DIR outside $OUT: the archive goes there, written after
# each length (a call cut short keeps what ran).
# Optional: PLAN_CHECK=1 first checks every 128k plan against the dense planner (~50 s);
# BENCH_FLAGS="--config.planner.score_topk_impl=pallas ..." adds flags to both runs.
# Carry the ml_collections wheel in .whl/ (WORKSPACE "Running on the GPU").
set -u
out=${1:?usage: bench_128k_1m.sh OUT_DIR}
mkdir -p "$out"
python3 -c "import ml_collections" 2>/dev/null || python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
git log --oneline -1 > "$out/commit.txt" 2>/dev/null  # stale on the device: say it yourself
if [ "${PLAN_CHECK:-0}" = 1 ]; then
  timeout 150 python3 tools/plan_trace.py --length 131072 --check --top 2 \
    --out "$out/plan_trace_128k_check.json" > "$out/plan_trace_128k_check.txt" 2>&1
  grep "plan \|identical" "$out/plan_trace_128k_check.txt"
fi
cfg=configs/bench_attention.py
timeout 200 python3 experiments/bench_attention.py --config=$cfg \
  --workdir="$out/attention_128k" '--config.lengths=(131072,)' --config.iters=5 \
  ${BENCH_FLAGS:-} > "$out/attention_128k_log.txt" 2>&1
tail -9 "$out/attention_128k_log.txt"
# (at most 8 files come back from the device: one archive, written after each length so
# that a call cut short keeps the 128k run)
tar czf "${PACK:-$out.tgz}" -C "$(dirname "$out")" "$(basename "$out")"
timeout 330 python3 experiments/bench_attention.py --config=$cfg \
  --workdir="$out/attention_1m" '--config.lengths=(1048576,)' --config.iters=2 \
  --config.warmup=1 ${BENCH_FLAGS:-} \
  > "$out/attention_1m_log.txt" 2>&1
tail -9 "$out/attention_1m_log.txt"
# (at most 8 files come back from the device: one archive)
tar czf "${PACK:-$out.tgz}" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
