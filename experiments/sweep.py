r"""Runs a sweep (a base config + override items, one workdir per item) and its summary.

python experiments/sweep.py --config=configs/sweep_budget.py --workdir=workdirs/sweep_budget
python experiments/sweep.py --config=configs/sweep_budget.py:smoke --workdir=/tmp/sweep_smoke \
    --config.layout.height=4 --shard_index=0 --num_shards=2

Started again on the same workdir it skips the finished items (see mmjax/sweep.py).

Spread over this machine's devices (worker i runs shard i; logs in <workdir>/workers/):

# one worker per GPU (CUDA_VISIBLE_DEVICES=i each), or 2 GPUs per worker
python experiments/sweep.py --config=configs/sweep_budget.py --workdir=workdirs/sweep_budget \
    --workers=-1
python experiments/sweep.py --config=configs/sweep_budget.py --workdir=workdirs/sweep_budget \
    --workers=4 --devices_per_worker=2
# on the CPU (JAX_PLATFORMS=cpu, or no GPU): 2 processes, not pinned
python experiments/sweep.py --config=configs/sweep_budget.py:smoke --workdir=/tmp/sweep_smoke \
    --workers=2

Spread over hosts, on a workdir every host sees (a shared filesystem), one process per host:
shard = jax.process_index() of jax.process_count(), after jax.distributed.initialize().

# on host 0 and host 1 (process_id=1 there); host0:1234 is a free port on host 0
python experiments/sweep.py --config=configs/sweep_budget.py --workdir=/shared/sweep_budget \
    --shard_by_process --coordinator_address=host0:1234 --num_processes=2 --process_id=0
# under SLURM, Open MPI or on a TPU pod jax finds these itself
srun python experiments/sweep.py --config=configs/sweep_budget.py \
    --workdir=/shared/sweep_budget --shard_by_process

Or, without jax.distributed, several hosts each with local workers: host h of H runs
`--shard_index=h --num_shards=H --workers=-1`; its workers split its share.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Sweep config file (`configs/<file>.py:<arg>`).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (items/, summaries).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard of the items.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Processes sharing the items (every n-th).")
_WORKERS = flags.DEFINE_integer(
  "workers",
  0,
  "0: run the items in this process. N: spread them over N local worker processes (worker i "
  "runs shard i, each on its own --devices_per_worker GPUs through CUDA_VISIBLE_DEVICES; on "
  "the CPU not pinned), logs in <workdir>/workers/, then the summary. -1: one worker per "
  "local GPU (per CPU core without GPUs). With --shard_index/--num_shards the workers split "
  "that shard. --config.* overrides go to every worker.",
)
_DEVICES_PER_WORKER = flags.DEFINE_integer(
  "devices_per_worker", 1, "With --workers: consecutive local devices each worker gets."
)
_SHARD_BY_PROCESS = flags.DEFINE_bool(
  "shard_by_process",
  False,
  "Several hosts, one process each, on a shared workdir: call jax.distributed.initialize "
  "(with --coordinator_address, --num_processes, --process_id; left out, jax detects SLURM, "
  "Open MPI, TPU pods), take shard jax.process_index() of jax.process_count() instead of "
  "--shard_index/--num_shards, and shut jax.distributed down again (the hosts share only "
  "the workdir; each runs its items on its own devices).",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address", None, "With --shard_by_process: host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "With --shard_by_process: how many processes (hosts) in all."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "With --shard_by_process: this process's id, 0 <= id < num_processes."
)
flags.mark_flags_as_required(["config", "workdir"])


def _print_summary(summary, missing):
  if summary:
    with open(os.path.join(_WORKDIR.value, "summary.md")) as f:
      print(f.read())
    print(f"summary in {summary} and summary.md")
  else:
    print(f"{len(missing)} item(s) not done yet (other shards?): no summary written")


def main(argv):
  del argv
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  distributed = [_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if _SHARD_BY_PROCESS.value and (_WORKERS.value or flags.FLAGS["shard_index"].present):
    raise app.UsageError("--shard_by_process takes neither --workers nor --shard_index")
  if not _SHARD_BY_PROCESS.value and any(v is not None for v in distributed):
    raise app.UsageError("--coordinator_address etc. go with --shard_by_process")
  if _DEVICES_PER_WORKER.value != 1 and not _WORKERS.value:
    raise app.UsageError("--devices_per_worker goes with --workers")
  if _WORKERS.value:
    res = sweep.launch(
      config_file,
      _WORKDIR.value,
      workers=_WORKERS.value,
      devices_per_worker=_DEVICES_PER_WORKER.value,
      extra_flags=sweep.worker_flags(sys.argv[1:], flags.FLAGS),
      shard_index=_SHARD_INDEX.value,
      num_shards=_NUM_SHARDS.value,
    )
    print(f"{len(res.workers)} worker(s) done, {len(res.names)} item(s) in the sweep")
    _print_summary(res.summary, res.missing)
    return
  shard_index, num_shards = _SHARD_INDEX.value, _NUM_SHARDS.value
  if _SHARD_BY_PROCESS.value:
    shard_index, num_shards = sweep.distributed_shard(*distributed)
    print(f"process {shard_index} of {num_shards}: shard {shard_index}/{num_shards}")
  items = sweep.load_items(config_file)
  progress = sys.stderr.isatty()  # a bar on a terminal, else a line per item (logs)
  res = sweep.run(
    _CONFIG.value,
    items,
    _WORKDIR.value,
    shard_index,
    num_shards,
    progress=progress,
    log=None if progress else print,
  )
  print(f"{len(res.ran)} item(s) run, {len(res.skipped)} already done, of {len(res.names)}")
  _print_summary(res.summary, res.missing)


if __name__ == "__main__":
  app.run(main)
