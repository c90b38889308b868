r"""Converts a Hugging Face Qwen2.5-VL checkpoint to Flax params saved with orbax.

  python experiments/convert_checkpoint.py --checkpoint=/path/to/Qwen2.5-VL-7B-Instruct \
      --out=/path/to/qwen2_5_vl_7b_orbax --dtype=bfloat16
"""

import os
import sys

import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax.models import checkpoint  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint dir.", required=True)
_OUT = flags.DEFINE_string("out", None, "Orbax output dir (must not exist).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Params dtype.")


def main(argv):
  del argv
  _, params = checkpoint.load_hf_checkpoint(_CKPT.value, dtype=jnp.dtype(_DTYPE.value))
  checkpoint.save_params(_OUT.value, params)
  print(f"saved {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
