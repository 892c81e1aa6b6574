#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU and the Python packages already installed
# (torch, diffusers, transformers, omegaconf, pytest): the CUDA-only tests, then the speed bench with
# our UNet's CUDA graphs on (the default) and off, then the fp16/bf16 image fidelity.
#
#     bench/gpu_check.sh [LOG_DIR] [PYTHON]
#
# Each stage's log goes to LOG_DIR (default: gpu-check-logs); a failing stage does not stop the rest.
set -u
logs=${1:-gpu-check-logs}
python=${2:-python3}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
status=0

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$seconds" "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$logs/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || status=1
}

nvidia-smi -L
"$python" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
stage graph-tests 60 "$python" -m pytest -p no:cacheprovider -q tests/test_cuda_graphs.py
stage bench-graphs 150 "$python" -m ldm bench --device cuda --rounds 20 --parts unet vae text default
stage bench-no-graphs 90 "$python" -m ldm bench --device cuda --rounds 20 --parts unet default --dtypes fp16 --no-cuda-graphs
stage family-tests 120 "$python" -m pytest -p no:cacheprovider -q -s tests/test_cuda_families.py
stage fidelity 90 "$python" -m ldm bench --device cuda --parts fidelity --fidelity-images 4
exit $status
