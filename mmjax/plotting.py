"""Matplotlib, headless, when it is installed (the `plot` extra)."""


def pyplot(path: str):
  """`matplotlib.pyplot` on the Agg backend, or None (with a note naming `path`)."""
  try:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print(f"matplotlib is not installed: no plot at {path} (pip install 'mmjax[plot]')")
    return None
  return plt
