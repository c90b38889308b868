#!/usr/bin/env bash
# The attention benchmark (every policy of configs/bench_attention.py) at the lengths given,
# one run per length, for one device call:
#
#   PACK=$OUT/b.tgz bash tools/bench_lengths.sh /tmp/b 1048576:2:1:330 262144:5:2:200
#   # -> $OUT/b.tgz: attention_1m/, attention_256k/, their logs
#
# Each argument is LENGTH:ITERS:WARMUP:TIMEOUT_S. The archive (PACK; default OUT_DIR.tgz,
# keep OUT_DIR outside $OUT) is rewritten after each length, so a call cut short keeps the
# lengths that ran. BENCH_FLAGS="--config.planner.score_topk_impl=pallas ..." adds flags to
# every run. Measured on an H200 (h200_2026-12-04b): 128k 136-144 s, 256k 133 s, 512k 125 s,
# 1M 177 s, plus about 60 s for a cold start. Carry the ml_collections wheel in .whl/.
set -u
out=${1:?usage: bench_lengths.sh OUT_DIR LENGTH:ITERS:WARMUP:TIMEOUT_S ...}
shift
[ $# -gt 0 ] || { echo "bench_lengths.sh: give at least one LENGTH:ITERS:WARMUP:TIMEOUT_S" >&2; exit 2; }
for spec in "$@"; do
  [[ $spec =~ ^[0-9]+:[0-9]+:[0-9]+:[0-9]+$ ]] || {
    echo "bench_lengths.sh: bad spec '$spec'; want LENGTH:ITERS:WARMUP:TIMEOUT_S, e.g. 131072:5:2:200" >&2
    exit 2
  }
done
mkdir -p "$out"
. "$(dirname "$0")/device_env.sh" || exit 1
git log --oneline -1 > "$out/commit.txt" 2>/dev/null  # stale on the device: say it yourself
for spec in "$@"; do
  IFS=: read -r length iters warmup limit <<< "$spec"
  if ((length % 1048576 == 0)); then name=$((length / 1048576))m; else name=$((length / 1024))k; fi
  start=$SECONDS
  timeout "$limit" python3 experiments/bench_attention.py --config=configs/bench_attention.py \
    --workdir="$out/attention_$name" "--config.lengths=($length,)" --config.iters="$iters" \
    --config.warmup="$warmup" ${BENCH_FLAGS:-} > "$out/attention_${name}_log.txt" 2>&1
  echo "attention_$name: rc $?, $((SECONDS - start)) s" | tee -a "$out/walls.txt"
  tail -9 "$out/attention_${name}_log.txt"
  # (at most 8 files come back from the device: one archive, rewritten after each length)
  tar czf "${PACK:-$out.tgz}" -C "$(dirname "$out")" "$(basename "$out")"
done
