r"""Tables and plots of a sweep's ablations: report.md, recall_vs_density.png, error_vs_length.png.

python experiments/report.py --workdir=workdirs/sweep_budget
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import report  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A sweep's workdir (experiments/sweep.py).")
_OUT = flags.DEFINE_string("out", None, "Where to write the report (default: the workdir).")
_ALLOW_MISSING = flags.DEFINE_bool(
  "allow_missing", False, "Report the finished items of an unfinished sweep."
)
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  path = report.write_report(_WORKDIR.value, _OUT.value, _ALLOW_MISSING.value)
  with open(path) as f:
    print(f.read())
  print(f"report in {path}")


if __name__ == "__main__":
  app.run(main)
