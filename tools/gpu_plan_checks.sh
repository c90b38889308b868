#!/usr/bin/env bash
# The planner's changes checked and timed on the device machine, in two device calls of
# about 250 s each on a warm H200 (give each a 600 s limit), before the benchmark
# (tools/bench_128k_1m.sh) in a third:
#
#   bash tools/gpu_plan_checks.sh "$OUT/checks" tests    # -> $OUT/checks.tgz
#   bash tools/gpu_plan_checks.sh "$OUT/traces" traces   # -> $OUT/traces.tgz
#
# tests:  the planner kernels' GPU tests (attn_mass with its diagonal window and p in f16,
#         pooled_topk against pooled_scores' own scores); the planner's kernel tests on
#         the GPU backend; every 128k plan against the dense planner's (plan_trace
#         --check), as the planner is now and with the pooled-score picks in one kernel.
# traces: mminference's 1M plan by function (2 heads per step) as it is, with p in f16,
#         and with the picks in one kernel; mass_bench and score_bench (planner vs fused).
# bf16:   the pooled scores in bfloat16 (planning.SCORE_DTYPE): the pooled kernels' GPU
#         tests, score_bench's bf16 variants, every 128k plan against the dense planner's
#         with bf16, mminference's 128k plan (concurrent) in f32 and bf16, 1M plans in
#         bf16 by function with 14 and 28 heads per step (HPS_1M). TILES="64,128,4": the tile.
# quick:  the planner kernels' GPU tests (topk_select, attn_mass, block_pool), then every
#         128k plan against the dense planner's (about 120 s), before a benchmark call.
# sort:   pooled_topk with the blocks sorted by their limits in grid views
#         (planning.SCORE_TOPK_SORT): the sparse kernels', col_select's and pooled_topk's
#         GPU tests, every 128k plan against the dense planner's without and with it,
#         128k plans (concurrent) and 1M plans by kernel (grid, 2d_boundary, mminference)
#         without and with it (PACK=: the archive after each step; about 450 s).
# tiles:  pooled_topk's tile (SCORE_TILES): grid's 1M plan by kernel for each tile of
#         TILE_LIST, then every 128k grid / block_sparse / 2d_boundary plan against the
#         dense planner's with CHECK_TILE (about 300 s; PACK=).
# pool:   the pooled means with the heads innermost (planning.POOL_HEADS_INNER): block_pool's
#         GPU tests, pool_bench at 1M, every 128k plan against the dense planner's with
#         it; 1M plans by kernel (28 heads per step) without and with it, and with command
#         buffers (the benchmark's default); 128k plans (concurrent) without and with it;
#         each pattern of the mminference table alone on 5 heads at 128k (its groups' chains).
# estimate: the grid estimate's cost (Grid.stride_norm "window", Grid.pool_tokens 16) and
#         pooled_topk's packed keys: the GPU tests of pooled_topk, block_pool, attn_mass
#         and the sparse kernels, every 128k plan against the dense planner's, 1M plans by
#         kernel (grid, 2d_boundary, mminference) (about 350 s; PACK=).
# pool_group: block_mean with 16 blocks per program for the sampled means
#         (planning.POOL_GROUP): block_pool's GPU tests, pool_bench on the sampled grid
#         shapes with 3 selections (groups 1, 16, 32), grid's and 2d_boundary's 1M plans
#         by kernel with POOL_GROUP 1 and 16, the 128k check with 16 (PACK=); attn_mass's
#         GPU tests run with block_pool's.
# split:  the widest query modality's intervals only in a window of rows
#         (planning.SPLIT_ROWS): the planner's list tests on the GPU, the GPU tests of
#         col_select, pooled_topk, block_pool and attn_mass, 1M plans by kernel of
#         2d_boundary and mminference without and with it (SPLIT_LIST, TOP), 2d_boundary's
#         128k plan by kernel, every 128k plan against the dense planner's (CHECK=0: not;
#         PACK=; ~350 s).
# early:  the 2D boundary's text estimate before the grid permutation
#         (planning.early_estimates): its test and the planner's kernel and list tests on
#         the GPU, the attn_mass GPU tests, tools/plan_variants.py on 2d_boundary at 128k
#         (VARIANTS, default base,noearly,div32,noopt), then the benchmark at 128k for
#         2d_boundary and mminference (its usual cycle table) (PACK=; about 350 s).
# conds:  the plan's conditionals and its output copy (planning.SKIP_EMPTY_WORK,
#         planning_lists._count_below, col_select.SPARE_SLOT): col_select's GPU tests, the
#         planner's list tests, tools/plan_variants.py on 2d_boundary at 128k (VARIANTS),
#         then the 128k benchmark of 2d_boundary and mminference for each planner setting of
#         BENCH_PLANNERS ("default", name=value) (PACK=; about 450 s).
# count:  the group sort by counts (planning.GROUP_COUNT_IDS): its tests on the GPU,
#         tools/plan_variants.py on 2d_boundary at 128k (VARIANTS, default base,gsort,base2,
#         gsort2), then the 128k benchmark of every policy (PACK=; about 350 s).
# conds2: what the plan's conditionals cost: tools/cond_cost.py (a chain of kernels with
#         0-10 lax.conds, the plan's compile options and XLA's defaults), then
#         tools/plan_variants.py on 2d_boundary at 128k with the conds static (nocond*)
#         (PACK=; about 300 s).
# windows: the split rows' windows in 32nds (planning_lists.ROW_WINDOWS): their list tests
#         on the GPU, plan_variants on 2d_boundary at 128k (base, pow2win, the conds one
#         kind at a time static), the 128k benchmark of 2d_boundary and mminference
#         (PACK=; about 450 s).
# rstats: attn_mass's pass 1 over a key range laid over its tiles (STATS_SHARE_RANGE):
#         attn_mass's GPU tests, the early estimate's and the windows' list tests on the
#         GPU, plan_variants base / rstats8 twice, the 128k benchmark of 2d_boundary and
#         mminference (PACK=; about 450 s).
# launch: where the per-call latency of 2d_boundary's 128k plan goes: plan_variants with
#         the host's dispatch time and the command buffer's host events, attn_mass's
#         warps / stages / tile, LHS scheduling, then one base run with
#         command_buffer_thunk's VLOG (are the graphs updated every call?) (PACK=; ~420 s).
# launch2: XLA's command-buffer flags and update modes in the installed jaxlib / CUDA
#         plugin (tools/xla_flags.py), tools/launch_probe.py --vlog (which calls
#         re-record the plan's graph), plan_variants with attn_mass's and pooled_topk's
#         pipeline stages, then launch_probe's option variants for 2d_boundary and a_shape
#         (PACK=; ~450 s).
# launch3: what the untaken branches of the plan's conditionals cost at launch:
#         plan_variants with the split rows' switch static (sw3), every cond static
#         (nocond_w3), fewer row windows (rw4, rw3), attn_mass's stages (PACK=; ~300 s).
# final2: attn_mass's GPU tests and the windows' list tests, plan_variants base / old /
#         oldwin / bw8, then the 128k benchmark of every policy (PACK=; ~480 s).
# twopass: attn_mass's two passes (planning.MASS_TILE_STATS): attn_mass's GPU tests (both
#         forms), the planner's two-pass and early-estimate tests on the GPU, plan_variants
#         base / ts twice, the 128k benchmark of 2d_boundary and mminference without and
#         with --config.planner.mass_tile_stats=True (PACK=; ~550 s).
# final:  the 128k benchmark of every policy, then 2d_boundary and mminference at 256k
#         (PACK=; about 370 s).
# pool2:  block_mean's outputs one buffer per selection (`stacked` False in the planner):
#         block_pool's GPU tests, the planner's two-pass and fallback-pair list tests on
#         the GPU, every 128k plan against the dense planner's with the two-pass estimates,
#         plan_variants base / ts / stacked / ts_noskip / loop3 / ts_loop3 in turn (--rounds
#         12), then the 128k benchmark of 2d_boundary and mminference with
#         --config.planner.mass_tile_stats=True (PACK=; ~560 s).
# final3: the 128k benchmark of every policy (PACK=; ~230 s).
# conds3: block_mean's skip of a selection with no row in a block, which lets the
#         optional selectors be pooled with the others (planning.POOL_OPTIONAL_APART
#         False: two conds fewer), beside the two-pass estimates and the merge's cond:
#         the GPU tests of block_pool and attn_mass, the planner's list tests of those on
#         the GPU, plan_variants base / ts / poolapart / noskip / ts_noskip timed in turn
#         (--rounds 12), then the 128k benchmark of 2d_boundary and mminference as it is
#         and with BENCH_SETTING (default mass_tile_stats=True+skip_empty_work=False)
#         (PACK=; ~540 s).
# Carry the ml_collections wheel in .whl/ (WORKSPACE "Running on the GPU").
set -u
usage="usage: gpu_plan_checks.sh OUT_DIR tests|traces|bf16|quick|sort|tiles|pool|estimate|pool_group|split|early|conds|count|conds2|windows|rstats|launch|launch2|launch3|final2|twopass|final|conds3|pool2|final3"
out=${1:?$usage}
part=${2:?$usage}
mkdir -p "$out"
. "$(dirname "$0")/device_env.sh" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
git log --oneline -1 > "$out/commit.txt" 2>/dev/null  # stale on the device: say it yourself
# PACK=$OUT/NAME.tgz (OUT_DIR outside $OUT): the parts sort, tiles and pool rewrite that
# archive after each step, so that a call cut short still brings back what ran
pack() { [ -n "${PACK:-}" ] && tar czf "$PACK" -C "$(dirname "$out")" "$(basename "$out")"; }
# check_128k NAME LIMIT [FLAGS...]: every 128k plan (plan_trace.py --check, its FLAGS)
# against the dense planner's into $out/plan_trace_128k_check<NAME>.txt, its verdicts shown
check_128k() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 tools/plan_trace.py --length 131072 --check --top 2 "$@" \
    > "$out/plan_trace_128k_check$name.txt" 2>&1
  grep "plan \|identical" "$out/plan_trace_128k_check$name.txt"
}
# run_pytest NAME LIMIT PYTEST_ARGS...: pytest on 4 workers into $out/NAME.txt, its last lines shown
run_pytest() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m pytest -q -n 4 -p no:cacheprovider "$@" > "$out/$name.txt" 2>&1
  tail -2 "$out/$name.txt"
}
# run_variants LIMIT VARIANTS: tools/plan_variants.py on 2d_boundary at 128k ($VARIANTS if
# set) into $out/variants, each variant's lines shown
run_variants() {
  timeout "$1" python3 tools/plan_variants.py --out "$out/variants" \
    --variants "${VARIANTS:-$2}" --rounds "${ROUNDS:-0}" > "$out/variants.txt" 2>&1
  grep -A3 "wall\|interleaved" "$out/variants.txt"
  pack
}
# bench_at NAME LENGTH LIMIT [FLAGS...]: the attention benchmark at one length into
# $out/NAME, its rows shown
bench_at() {
  local name=$1 length=$2 limit=$3
  shift 3
  timeout "$limit" python3 experiments/bench_attention.py --config=configs/bench_attention.py \
    --workdir="$out/$name" "--config.lengths=($length,)" --config.iters=5 "$@" \
    > "$out/${name}_log.txt" 2>&1
  grep "| $length" "$out/${name}_log.txt"
  pack
}
# bench_128k NAME LIMIT [FLAGS...]: bench_at at 128k
bench_128k() {
  local name=$1
  shift
  bench_at "$name" 131072 "$@"
}
# 2d_boundary and mminference (with its usual cycle table: `mminference_cycle`) alone
TWO_POLICIES=(
  "--config.policies=('2d_boundary','mminference')"
  "--config.mminference_cycle=('a_shape','vertical_slash','block_sparse','grid','q_boundary','2d_boundary')"
)
# bench_settings LIMIT SETTINGS...: bench_128k of TWO_POLICIES once per planner setting
# ("default", or name=value[+name=value...]: --config.planner.name=value each) into
# attention_128k_<the names>
bench_settings() {
  local limit=$1 v flags name pairs p
  shift
  for v in "$@"; do
    flags=() name=default
    if [ "$v" != default ]; then
      IFS=+ read -ra pairs <<< "$v"
      name=""
      for p in "${pairs[@]}"; do
        flags+=("--config.planner.$p")
        name="${name:+${name}_}${p%%=*}"
      done
    fi
    echo "$v"
    bench_128k "attention_128k_$name" "$limit" ${flags[@]+"${flags[@]}"} "${TWO_POLICIES[@]}"
  done
}
if [ "$part" = tests ]; then
  timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider --gpu -m gpu \
    tests/test_attn_mass.py tests/test_pooled_topk.py > "$out/gpu_tests_kernels.txt" 2>&1
  tail -2 "$out/gpu_tests_kernels.txt"
  timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_planning_lists.py \
    tests/test_policies.py -k "planner_kernels_are_the_same or last_query_mass or \
    group_order or stride or heads_per_step or one_kernel" > "$out/gpu_tests_planner.txt" 2>&1
  tail -2 "$out/gpu_tests_planner.txt"
  for topk in xla pallas; do
    check_128k "_$topk" 120 --score_topk $topk --out "$out/plan_trace_128k_check_$topk.json"
  done
elif [ "$part" = traces ]; then
  for v in "plain" "float16 --mass_p_dtype float16" "fused --score_topk pallas"; do
    set -- $v
    name=$1
    shift
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/plan_trace.py \
      --length 1048576 --policies mminference --heads_per_step 2 --by function --top 25 "$@" \
      > "$out/plan_trace_1m_mminference_$name.txt" 2>&1
    head -8 "$out/plan_trace_1m_mminference_$name.txt"
  done
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/mass_bench.py \
    --out "$out/mass_bench.json" > "$out/mass_bench.txt" 2>&1
  cat "$out/mass_bench.txt"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/score_bench.py \
    --variants planner,fused --out "$out/score_bench.json" > "$out/score_bench.txt" 2>&1
  grep same "$out/score_bench.txt"
elif [ "$part" = bf16 ]; then
  timeout 150 python3 -m pytest -q -n 4 -p no:cacheprovider --gpu -m gpu \
    tests/test_pooled_scores.py tests/test_pooled_topk.py > "$out/gpu_tests_pooled.txt" 2>&1
  tail -2 "$out/gpu_tests_pooled.txt"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 python3 tools/score_bench.py \
    --cases block_sparse_1m,grid_1m,block_sparse_128k --out "$out/score_bench_bf16.json" \
    --variants "${SCORE_VARIANTS:-planner,planner_bf16,fused,fused_bf16}" \
    > "$out/score_bench_bf16.txt" 2>&1
  grep same "$out/score_bench_bf16.txt"
  tiles=${TILES:-64,128,4}
  check_128k _bf16 150 --score_dtype bfloat16 --score_tiles "$tiles" \
    --out "$out/plan_trace_128k_check_bf16.json"
  for dt in float32 bfloat16; do
    timeout 60 python3 tools/plan_trace.py --length 131072 --policies mminference --top 2 \
      --concurrent 1 --score_dtype $dt > "$out/plan_trace_128k_mminference_$dt.txt" 2>&1
    grep "plan " "$out/plan_trace_128k_mminference_$dt.txt"
  done
  for hps in ${HPS_1M:-14 28}; do
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 python3 tools/plan_trace.py \
      --length 1048576 --policies block_sparse,grid,2d_boundary,mminference --by function \
      --top 12 --heads_per_step $hps --score_dtype bfloat16 --score_tiles "$tiles" \
      > "$out/plan_trace_1m_bfloat16_hps$hps.txt" 2>&1
    grep "plan " "$out/plan_trace_1m_bfloat16_hps$hps.txt"
  done
elif [ "$part" = quick ]; then
  timeout 150 python3 -m pytest -q -n 4 -p no:cacheprovider --gpu -m gpu tests/test_topk_select.py \
    tests/test_attn_mass.py tests/test_block_pool.py > "$out/gpu_tests_kernels.txt" 2>&1
  tail -2 "$out/gpu_tests_kernels.txt"
  check_128k "" 120 --out "$out/plan_trace_128k_check.json"
elif [ "$part" = sort ]; then
  timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider --gpu -m gpu tests/test_kernels.py \
    tests/test_col_select.py tests/test_pooled_topk.py > "$out/gpu_tests_kernels.txt" 2>&1
  tail -2 "$out/gpu_tests_kernels.txt"
  for srt in 0 1; do
    check_128k "_sort$srt" 120 --score_topk_sort $srt
    pack
  done
  for srt in 0 1; do
    timeout 60 python3 tools/plan_trace.py --length 131072 --top 2 --concurrent 1 \
      --policies grid,2d_boundary,mminference --score_topk_sort $srt \
      > "$out/plan_trace_128k_sort$srt.txt" 2>&1
    grep "plan " "$out/plan_trace_128k_sort$srt.txt"
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/plan_trace.py \
      --length 1048576 --policies grid,2d_boundary,mminference --by kernel --top 14 \
      --score_topk_sort $srt > "$out/plan_trace_1m_sort$srt.txt" 2>&1
    grep "plan \|pooled_topk" "$out/plan_trace_1m_sort$srt.txt"
    pack
  done
  exit 0
elif [ "$part" = estimate ]; then
  timeout 240 python3 -m pytest -q -n 4 -p no:cacheprovider --gpu -m gpu tests/test_pooled_topk.py \
    tests/test_block_pool.py tests/test_attn_mass.py tests/test_kernels.py \
    > "$out/gpu_tests_kernels.txt" 2>&1
  tail -2 "$out/gpu_tests_kernels.txt"
  pack
  check_128k "" 150
  pack
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 python3 tools/plan_trace.py \
    --length 1048576 --policies grid,2d_boundary,mminference --by kernel --top 14 \
    > "$out/plan_trace_1m.txt" 2>&1
  grep "plan \|pooled_topk\|block_mean\|attn_mass" "$out/plan_trace_1m.txt"
  pack
  exit 0
elif [ "$part" = tiles ]; then
  # pooled_topk's tile (planning.SCORE_TILES, shared with pooled_scores): grid's 1M plan
  # by kernel per tile, then whether a smaller block_m gives the same 128k plans
  for t in ${TILE_LIST:-64,128,4 32,128,4 16,128,4 64,64,4 32,64,4}; do
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 python3 tools/plan_trace.py \
      --length 1048576 --policies grid --by kernel --top 6 --score_tiles $t \
      > "$out/plan_trace_1m_grid_tiles_${t//,/_}.txt" 2>&1
    echo "tile $t"; grep "plan \|pooled_topk" "$out/plan_trace_1m_grid_tiles_${t//,/_}.txt"
    pack
  done
  check_128k _tiles 90 --policies grid,block_sparse,2d_boundary \
    --score_tiles "${CHECK_TILE:-32,128,4}"
  pack
  exit 0
elif [ "$part" = pool ]; then
  timeout 100 python3 -m pytest -q -n 4 -p no:cacheprovider --gpu -m gpu \
    tests/test_block_pool.py > "$out/gpu_tests_pool.txt" 2>&1
  tail -2 "$out/gpu_tests_pool.txt"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/pool_bench.py \
    --out "$out/pool_bench.json" > "$out/pool_bench.txt" 2>&1
  cat "$out/pool_bench.txt"
  pack
  pols=block_sparse,grid,2d_boundary,mminference
  for inner in 0 1; do
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/plan_trace.py \
      --length 1048576 --policies $pols --by kernel --top 14 --pool_heads_inner $inner \
      > "$out/plan_trace_1m_pool_inner$inner.txt" 2>&1
    grep "plan " "$out/plan_trace_1m_pool_inner$inner.txt"
    timeout 60 python3 tools/plan_trace.py --length 131072 --policies block_sparse,mminference \
      --top 2 --concurrent 1 --pool_heads_inner $inner > "$out/plan_trace_128k_inner$inner.txt" 2>&1
    grep "plan " "$out/plan_trace_128k_inner$inner.txt"
    pack
  done
  timeout 80 python3 tools/plan_trace.py --length 1048576 --policies $pols --top 2 \
    --pool_heads_inner 1 > "$out/plan_trace_1m_command_buffers.txt" 2>&1
  grep "plan " "$out/plan_trace_1m_command_buffers.txt"
  timeout 60 python3 tools/plan_trace.py --length 131072 --heads 5 --kv_heads 5 --top 2 \
    --concurrent 1 --policies a_shape,vertical_slash,block_sparse,grid,q_boundary,2d_boundary \
    > "$out/plan_trace_128k_5_heads.txt" 2>&1
  grep "plan " "$out/plan_trace_128k_5_heads.txt"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 python3 tools/plan_trace.py \
    --length 131072 --policies mminference --by function --top 30 \
    > "$out/plan_trace_128k_mminference_by_function.txt" 2>&1
  head -4 "$out/plan_trace_128k_mminference_by_function.txt"
  pack
  check_128k _pool_inner 120 --pool_heads_inner 1
  pack
  exit 0
elif [ "$part" = pool_group ]; then
  # block_mean with 16 blocks per program (planning.POOL_GROUP) for the sampled means
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 python3 -m pytest -q -n 4 -p no:cacheprovider \
    --gpu -m gpu tests/test_block_pool.py tests/test_attn_mass.py > "$out/gpu_tests_pool.txt" 2>&1
  tail -2 "$out/gpu_tests_pool.txt"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 100 python3 tools/pool_bench.py \
    --cases "q grid /8,k grid /4" --n_sel 3 --groups 1,16,32 --warps 4 --inner 1 \
    --out "$out/pool_bench_groups.json" > "$out/pool_bench_groups.txt" 2>&1
  cat "$out/pool_bench_groups.txt"
  pack
  for g in 1 16; do
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python3 tools/plan_trace.py \
      --length 1048576 --policies grid,2d_boundary --by kernel --top 6 --pool_group $g \
      > "$out/plan_trace_1m_group$g.txt" 2>&1
    echo "pool_group $g"; grep "plan \|block_mean" "$out/plan_trace_1m_group$g.txt"
    pack
  done
  check_128k _group16 100 --pool_group 16 --policies grid,2d_boundary,mminference
  pack
  exit 0
elif [ "$part" = split ]; then
  # the widest query modality's intervals in a window of rows (planning.SPLIT_ROWS)
  run_pytest gpu_tests_split 150 tests/test_planning_lists.py \
    -k "wide_rows or one_pair or planner_kernels_are_the_same or fallback"
  run_pytest gpu_tests_kernels 150 --gpu -m gpu tests/test_col_select.py tests/test_pooled_topk.py \
    tests/test_block_pool.py tests/test_attn_mass.py
  pack
  for sr in ${SPLIT_LIST:-0 1}; do
    XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 python3 tools/plan_trace.py \
      --length 1048576 --policies 2d_boundary,mminference --by kernel --top ${TOP:-16} \
      --split_rows $sr > "$out/plan_trace_1m_split$sr.txt" 2>&1
    echo "split_rows $sr"; grep "plan " "$out/plan_trace_1m_split$sr.txt"
    pack
  done
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 python3 tools/plan_trace.py \
    --length 131072 --policies 2d_boundary --by kernel --top ${TOP:-16} \
    > "$out/plan_trace_128k_2d_boundary.txt" 2>&1
  grep "plan " "$out/plan_trace_128k_2d_boundary.txt"
  pack
  [ "${CHECK:-1}" = 1 ] || exit 0
  check_128k "" 150
  pack
  exit 0
elif [ "$part" = early ]; then
  run_pytest gpu_tests_early 150 tests/test_planning_lists.py \
    -k "early_vertical or planner_kernels_are_the_same or fallback"
  run_pytest gpu_tests_attn_mass 100 --gpu -m gpu tests/test_attn_mass.py
  pack
  run_variants 150 base,noearly,div32,noopt
  bench_128k attention_128k 150 "${TWO_POLICIES[@]}"
  exit 0
elif [ "$part" = conds ]; then
  run_pytest gpu_tests_cols 120 --gpu -m gpu tests/test_col_select.py
  run_pytest gpu_tests_lists 150 tests/test_planning_lists.py -k "fallback_pairs or \
    merge_candidates_skips or count_below or wide_rows or planner_kernels_are_the_same"
  pack
  run_variants 200 base,wscan,spare,noskip,nosplit,noskip_nosplit,noopt,base2
  # shellcheck disable=SC2086
  bench_settings 120 ${BENCH_PLANNERS:-default skip_empty_work=False split_rows=False}
  exit 0
elif [ "$part" = count ]; then
  run_pytest gpu_tests_count 100 tests/test_policies.py -k "group_sort"
  pack
  run_variants 150 base,gsort,base2,gsort2
  bench_128k attention_128k 300
  exit 0
elif [ "$part" = conds2 ]; then
  timeout 150 python3 tools/cond_cost.py --out "$out/cond_cost.json" > "$out/cond_cost.txt" 2>&1
  grep conds "$out/cond_cost.txt"
  pack
  run_variants 250 base,nocond,nocond_w1,nocond_w2,nocond_w6,base2
  exit 0
elif [ "$part" = windows ]; then
  run_pytest gpu_tests_windows 100 tests/test_planning_lists.py -k "wide_rows or count_below"
  pack
  run_variants 260 base,pow2win,nocond,nc_group,nc_merge,nc_fits,nc_pool,base2
  bench_128k attention_128k 200 "${TWO_POLICIES[@]}"
  exit 0
elif [ "$part" = launch ]; then
  run_variants 330 base,mw8,mw2,ms1,ms3,tile64,tile256,noconc,base2
  pack
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 timeout 80 python3 \
    tools/plan_variants.py --out "$out/vlog" --variants base --iters 10 > "$out/vlog.txt" 2>&1
  grep -c "Execute command buffer" "$out/vlog.txt"
  grep "Updated command buffer\|Recorded command buffer\|Initialized command buffer" \
    "$out/vlog.txt" | tail -5
  grep -c "Updated command buffer" "$out/vlog.txt"
  pack
  exit 0
elif [ "$part" = launch2 ]; then
  python3 tools/xla_flags.py > "$out/xla_flags.txt" 2>&1
  cat "$out/xla_flags.txt"
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 timeout 100 python3 \
    tools/launch_probe.py --vlog > "$out/vlog.txt" 2>&1
  awk '/^PHASE/ {ph=$2} /Updated command buffer/ {n[ph]++} /updated_allocs=/ {match($0, /updated_allocs=[0-9]+/); a[ph]=a[ph] " " substr($0, RSTART+15, RLENGTH-15)} /^CALL/ {print} END {for (p in n) print p, "updates", n[p], "allocs:" a[p]}' "$out/vlog.txt"
  pack
  run_variants 230 base,ms311,ms211,ms311_t64,ms311_mw8,pt1,pt3,base2
  pack
  timeout 200 python3 tools/launch_probe.py --out "$out/probe.json" \
    --policies 2d_boundary,a_shape > "$out/probe.txt" 2>&1
  cat "$out/probe.txt"
  pack
  exit 0
elif [ "$part" = launch3 ]; then
  run_variants 300 base,sw3,nocond_w3,rw4,rw3,rw4_ms311,ms311,base2
  exit 0
elif [ "$part" = final2 ]; then
  run_pytest gpu_tests_mass 120 --gpu -m gpu tests/test_attn_mass.py
  run_pytest gpu_tests_lists 150 tests/test_planning_lists.py -k "early or wide_rows"
  pack
  run_variants 170 base,old,oldwin,bw8,base2
  pack
  bench_128k attention_128k 230
  exit 0
elif [ "$part" = twopass ]; then
  run_pytest gpu_tests_mass 150 --gpu -m gpu tests/test_attn_mass.py
  run_pytest gpu_tests_lists 150 tests/test_planning_lists.py -k "two_pass or early"
  pack
  run_variants 170 base,ts,base2,ts2
  pack
  bench_settings 130 default mass_tile_stats=True
  exit 0
elif [ "$part" = conds3 ]; then
  run_pytest gpu_tests_kernels 170 --gpu -m gpu tests/test_block_pool.py tests/test_attn_mass.py
  run_pytest gpu_tests_lists 120 tests/test_planning_lists.py -k "two_pass or early or fallback"
  pack
  ROUNDS=${ROUNDS:-12} run_variants 200 base,ts,poolapart,noskip,ts_noskip
  bench_settings 125 default "${BENCH_SETTING:-mass_tile_stats=True+skip_empty_work=False}"
  exit 0
elif [ "$part" = pool2 ]; then
  run_pytest gpu_tests_kernels 120 --gpu -m gpu tests/test_block_pool.py
  run_pytest gpu_tests_lists 120 tests/test_planning_lists.py -k "two_pass or fallback"
  check_128k "" 130 --mass_tile_stats 1 --out "$out/plan_trace_128k_check.json"
  pack
  ROUNDS=${ROUNDS:-12} run_variants 200 base,ts,stacked,ts_noskip,loop3,ts_loop3
  bench_settings 125 mass_tile_stats=True
  exit 0
elif [ "$part" = final3 ]; then
  bench_128k attention_128k 250
  exit 0
elif [ "$part" = final ]; then
  bench_128k attention_128k 220
  bench_at attention_256k 262144 150 "${TWO_POLICIES[@]}"
  exit 0
elif [ "$part" = rstats ]; then
  run_pytest gpu_tests_mass 120 --gpu -m gpu tests/test_attn_mass.py
  run_pytest gpu_tests_lists 150 tests/test_planning_lists.py -k "early or wide_rows"
  pack
  run_variants 200 base,rstats8,base2,rstats8b
  bench_128k attention_128k 200 "${TWO_POLICIES[@]}"
  exit 0
else
  echo "part must be tests, traces, bf16, quick, sort, tiles, pool, estimate, pool_group, split, early, conds, count, conds2, windows, rstats, launch, launch2, launch3, final2, twopass, final, conds3, pool2 or final3, got $part"
  exit 2
fi
# (at most 8 files come back from the device: one archive)
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
