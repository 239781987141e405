#!/usr/bin/env bash
# The GPU check, on a host whose JAX sees a GPU (jax[cuda]), from a source checkout (no install:
# PYTHONPATH=., so the host's own jax/flax are used):
#   1. the kernel tests compiled on the GPU (`-m gpu`: flash attention's Triton kernels forward and
#      backward against xla, `auto` picking them, the policy loss's `auto` = chunked, the tiny
#      Qwen2.5-VL's logits and gradients with `auto` vs `xla`);
#   2. bench/kernels.py (attention Pallas-GPU vs XLA at T = 1k..16k, policy loss chunked vs xla);
#   3. the other kernel tests on the GPU backend (interpreted kernels, XLA paths; CPU-host-only
#      assertions skip themselves), at most REST_S seconds (default 150).
# Logs go to $OUT (default runs/gpu_check): env.txt, pytest_gpu.log, bench.log, pytest_rest.log.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
pytest=("$py" -m pytest -q -p no:cacheprovider --durations=8)

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  "$py" -c 'import sys, jax, jaxlib, flax; print("python", sys.version.split()[0], "jax", jax.__version__,
"jaxlib", jaxlib.__version__, "flax", flax.__version__, jax.devices(), jax.devices()[0].device_kind)'
  "$py" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|triton|numpy|pytest) '
} 2>&1 | tee "$out/env.txt"

start=$SECONDS
"${pytest[@]}" -m gpu tests/test_attention_kernel.py tests/test_policy_loss.py 2>&1 | tee "$out/pytest_gpu.log"
rc_gpu=$?
echo "gpu tests: rc $rc_gpu, $((SECONDS - start)) s"

start=$SECONDS
"$py" bench/kernels.py --iters 20 2>&1 | tee "$out/bench.log"
rc_bench=$?
echo "bench: rc $rc_bench, $((SECONDS - start)) s"

start=$SECONDS
timeout "${REST_S:-150}" "${pytest[@]}" -m "not gpu and not multidevice" tests/test_attention_kernel.py \
  tests/test_blocked_attention.py tests/test_policy_loss.py 2>&1 | tee "$out/pytest_rest.log"
rc_rest=$?
echo "other kernel tests: rc $rc_rest, $((SECONDS - start)) s"
echo "rc: gpu tests $rc_gpu, bench $rc_bench, other kernel tests $rc_rest"
