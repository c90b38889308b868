"""XLA's command-buffer flags and update modes that the installed jaxlib and its CUDA plugin
know (their names found in the shared libraries): which options a jax version accepts.

  python3 tools/xla_flags.py

One line per library that names a command-buffer flag: its path and the names found.
"""

import glob
import os
import re
import site

PATTERN = re.compile(
  rb"xla_gpu_(?:command_buffer|graph|enable_command)[a-z_]*|[A-Z_]*_UPDATE[A-Z_]*|SKIP_[A-Z_]+"
)


def main():
  roots = site.getsitepackages() + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
  for root in roots:
    for so in glob.glob(os.path.join(root, "jax*", "**", "*.so"), recursive=True):
      with open(so, "rb") as f:
        found = sorted({m.group().decode() for m in PATTERN.finditer(f.read())})
      if any("command_buffer" in name for name in found):
        print(so, found)


if __name__ == "__main__":
  main()
