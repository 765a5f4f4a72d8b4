# Source at the start of a device (GPU machine) command: installs carried wheels.
# Usage on the device:  source benchmarks/device_prelude.sh && python benchmarks/bench_x.py ...
set -o pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export TURBOPART_SHARED=${TURBOPART_SHARED:-$PWD/shared}
# Byte-code as a pip install leaves it: without it every fresh process recompiles turbopart
# (the checkout arrives without __pycache__, and the machine may not write .pyc files).
python3 -m compileall -q -j 0 turbopart benchmarks >/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
