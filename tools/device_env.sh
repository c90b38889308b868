# Sourced by the device scripts (`. tools/device_env.sh || exit 1`, from the repository
# root): installs the carried ml_collections wheel (.whl/, WORKSPACE "Running on the GPU")
# into /tmp/site unless it imports already, and puts /tmp/site and the checkout on
# PYTHONPATH.
python3 -c "import ml_collections" 2>/dev/null || python3 -m pip install -q --no-index \
  --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
