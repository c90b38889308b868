"""Sparse attention vs dense (cuDNN on the GPU) over lengths and policies.

Hypothesis: at a fixed budget the sparse plans' cost grows ~linearly with T while dense
grows quadratically, so the speedup over cuDNN grows with length.

  python experiments/bench_attention.py --config=configs/bench_attention.py \
      --workdir=benchmarks/results/h100      # on the GPU (device tool)
  python experiments/bench_attention.py --config=configs/bench_attention.py:smoke
  # an option of the planner for the run (recorded in bench.json's planner_settings):
  python experiments/bench_attention.py --config=configs/bench_attention.py \
      --workdir=... --config.planner.score_topk_impl=pallas

Args: "" (Qwen2.5-VL-7B attention: 28 q heads, 4 kv heads, H=128, bf16, 16k..1M, pallas
backend), "xla" (the same with the xla backend, to 128k), "smoke" (tiny, CPU, xla backend).
"""

import ml_collections

from mmjax import sweep

POLICIES = ("a_shape", "vertical_slash", "block_sparse", "grid", "q_boundary", "2d_boundary")
# mminference with no kwargs: head i runs POLICIES[i % 6] at its default budget
# (`mmjax.bench.cycle_table_policy`); give policy_kwargs.mminference.table_path for a
# searched table instead.
ALL = (*POLICIES, "mminference")


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ("", "xla", "smoke"):
    raise ValueError(f"configs/bench_attention.py: unknown arg {arg!r}; use '', xla, smoke")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.backend = "pallas"
  c.pallas_kernel = "auto"  # auto: Mosaic GPU where it runs (Hopper, identity order), else Triton
  c.baseline_impl = ""  # "": cudnn on the GPU, XLA on the CPU
  c.dtype = "bfloat16"
  c.num_heads = 28
  c.num_kv_heads = 4
  c.head_dim = 128
  c.block_q = 128  # tools/kernel_tiles.py: 128x64, 4 warps, 2 stages was the best tile
  c.block_k = 64
  c.heads_per_step = 4  # used when plan_step_tokens is 0
  # the planner's heads per step = plan_step_tokens // length (all 28 heads up to 1M, 14
  # at 2M): fewer kernel launches at short lengths, a bounded memory at long ones. On an
  # H200 at 1M, 14 heads per step against 2: mminference's plan 1.22x faster, 2D
  # boundary's 1.19x (h200_2026-12-02b); 28 against 14 with bf16 scores: block_sparse
  # 9.19 -> 8.75 ms, grid 19.41 -> 18.32, 2D boundary 47.81 -> 45.71, temp memory 7-7.7
  # GiB (h200_2026-12-02c)
  c.plan_step_tokens = 28 * 1048576
  # up to this length the plan programs compile with mmjax.planning.PLAN_COMPILER_OPTIONS
  # (XLA's concurrent command-buffer scheduling: faster plans, more temp memory; 0:
  # never). mminference's 512k plan on an H200: 14.86 -> 11.67 ms, 0.8 -> 5.0 GiB temp
  # (h200_2026-12-02c)
  c.concurrent_plan_max_len = 524288
  # with concurrent scheduling, the command-buffer types (xla_gpu_enable_command_buffer;
  # "": XLA's default, FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN) of the plan programs of
  # the policies in plan_command_buffers_policies (empty: every policy). XLA's default
  # and CONDITIONAL,WHILE put a plan's lax.cond / lax.switch branches into its CUDA
  # graphs. On an H200 at 128k (h200_2026-12-03): mminference's plan (21 conds) 3.11 ->
  # 2.87 ms, 2d_boundary's 2.47 -> 2.39, grid's (1 cond) 1.05 -> 1.19; without the
  # empty top-k's conds (planning.SKIP_EMPTY_TOPK off on a GPU), XLA's default types ->
  # these (h200_2026-12-03b): mminference 3.00 -> 2.75, 2d_boundary (9 conds) 2.57 ->
  # 2.24, grid (none) 1.06 -> 1.16
  c.plan_command_buffers = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
  c.plan_command_buffers_policies = ("mminference", "2d_boundary")
  # more XLA options ("name=value;...") for the plans that get plan_command_buffers. A
  # CUB sort (XLA's choice for the group sort, planning.group_sort) cannot go into a CUDA
  # graph: it cut 2d_boundary's plan in two graphs launched from the host. XLA's own sort
  # instead, on an H200 at 128k (h200_2026-12-03c/2_flags): 2.25 -> 2.09 ms
  c.plan_command_buffer_options = "xla_gpu_enable_cub_radix_sort=false"
  # from this length on the plan programs compile without command buffers (0: never). At
  # 1M the plans traced with and without them took the same time (block_sparse 8.95 and
  # 8.89 ms, h200_2026-12-02d): the 10.00 ms of h200_2026-12-02c was two timed calls'
  # median (now plan_iters)
  c.plan_no_command_buffers_from = 0
  # the planner's kernel settings for the run (mmjax.planning.settings; "": as planning
  # has it), e.g. --config.planner.score_topk_impl=pallas; bench.json records them all
  c.planner = ml_collections.ConfigDict(
    {
      n: ""
      for n in (
        "score_topk_impl",
        "mass_p_dtype",
        "score_impl",
        "topk_impl",
        "mass_impl",
        "score_dtype",
      )
    }
  )
  # pooled_topk (score_topk_impl "pallas", the default on a GPU) only for top k <= this
  # (0: every k; mmjax.planning.SCORE_TOPK_MAX_K)
  c.planner.score_topk_max_k = 8
  # pooled_topk with the blocks sorted by their limits in grid views (None: as planning
  # has it; --config.planner.score_topk_sort=True)
  c.planner.score_topk_sort = ml_collections.config_dict.placeholder(bool)
  # blocks per block_pool program for the sampled means (None: as planning has it;
  # --config.planner.pool_group=1)
  c.planner.pool_group = ml_collections.config_dict.placeholder(int)
  # programs per head of a last-query estimate over one modality group: L / tile / this
  # (None: as planning has it; --config.planner.mass_range_div=32)
  c.planner.mass_range_div = ml_collections.config_dict.placeholder(int)
  # the estimates by attn_mass's two passes (None: as planning has it;
  # --config.planner.mass_tile_stats=False)
  c.planner.mass_tile_stats = ml_collections.config_dict.placeholder(bool)
  # the widest query modality's intervals only in a window of rows (None: as planning has
  # it, on a GPU; --config.planner.split_rows=False)
  c.planner.split_rows = ml_collections.config_dict.placeholder(bool)
  # each scored component's top-k in a lax.cond that skips it when the component is
  # empty (None: as planning has it, off on a GPU; --config.planner.skip_empty_topk=True)
  c.planner.skip_empty_topk = ml_collections.config_dict.placeholder(bool)
  # the other lax.conds that skip work no head needs (the optional selectors' pooling, an
  # empty merge; None: as planning has it; --config.planner.skip_empty_work=False)
  c.planner.skip_empty_work = ml_collections.config_dict.placeholder(bool)
  # modality ids below this are grouped by a counting sort, others by a sort (None: as
  # planning has it, 16; --config.planner.group_count_ids=0: always the sort)
  c.planner.group_count_ids = ml_collections.config_dict.placeholder(int)
  c.warmup = 2
  c.iters = 10
  # the plan alone is timed over max(iters, plan_iters) calls: a plan takes milliseconds,
  # and the 1M runs take iters=2 (cuDNN's call there takes 16 s), a noisy median
  c.plan_iters = 20
  c.lengths = (16384, 65536, 131072, 262144, 524288, 1048576)
  c.dense_ours_max_len = 262144  # the dense plan's index lists grow as T^2
  c.frame_tokens = 576  # 24 x 24 merged patches per frame
  c.text_between = 16
  c.text_prefix = 256
  c.policies = ALL
  # the names mminference's heads cycle through (the table above); (): the other names of
  # `policies`. To time 2d_boundary and mminference with mminference's usual table:
  # --config.policies="('2d_boundary','mminference')" --config.mminference_cycle="('a_shape',
  # 'vertical_slash','block_sparse','grid','q_boundary','2d_boundary')" (one line)
  c.mminference_cycle = ()
  c.policy_kwargs = ml_collections.ConfigDict({n: ml_collections.ConfigDict({}) for n in ALL})
  # the grid estimate's options (the grid row and mminference's grid heads), e.g. the
  # estimate before 1e0ef2f: --config.policy_kwargs.grid.stride_norm=all
  # --config.policy_kwargs.grid.pool_tokens=0
  sweep.add_policy_defaults(c, "grid", "stride_norm", "pool_tokens")
  if arg == "xla":
    c.backend = "xla"
    c.lengths = (16384, 65536, 131072)
  if arg == "smoke":
    c.backend = "xla"
    c.dtype = "float32"
    c.num_heads, c.num_kv_heads, c.head_dim = 4, 2, 32
    c.lengths = (256, 512)
    c.iters = 2
    c.plan_iters = 2
    c.frame_tokens, c.text_between, c.text_prefix = 64, 8, 32
    c.block_q = 64
    c.dense_ours_max_len = 512
  return c
