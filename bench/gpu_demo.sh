#!/usr/bin/env bash
# The demo's training stages on a GPU: `pathor1 demo --stages $STAGES [--steps $STEPS]` (default
# cpt,sft,grpo at their configs' steps (80 / 250 / 16): the real trainer, grain pipeline, orbax
# checkpoints, metrics, the GRPO rollouts and held-out MCQ numbers) on a host whose JAX sees a GPU
# (jax[cuda]), from a source checkout (no install: PYTHONPATH=., so the host's own
# jax/flax/optax/orbax are used). On a CPU host it runs the same stages on CPU, to compare with.
#   bash bench/gpu_demo.sh
#   STEPS=10 bash bench/gpu_demo.sh
#   WHEELS=.whl bash bench/gpu_demo.sh   # first install the wheels in .whl into $SITE (default
#                                        # /tmp/site): the project's other dependencies, for a host
#                                        # without network (see the README's GPU paragraph)
# Each stage's trainer prints where it ran and which kernels it traced (`cpt: ran on 1 × NVIDIA
# H100 80GB HBM3 (gpu); kernels traced: attention pallas_gpu`). Logs go to $OUT (default
# runs/gpu_demo): env.txt, demo.log (the demo's table: per-stage wall time and first/last metric),
# steps.txt (per stage: first/last loss and reward, the compiling first step's time and the median
# of the others) and each stage's <stage>.metrics.jsonl; the runs themselves to $DEMO_OUT (default
# $OUT/demo). The demo is stopped (SIGTERM: a checkpoint, then exit 143) after DEMO_S seconds
# (default 1800).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_demo}
demo_out=${DEMO_OUT:-$out/demo}
stages=${STAGES:-cpt,sft,grpo}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  site=${SITE:-/tmp/site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS"/*.whl || exit
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  nproc
  "$py" -c 'import sys, jax, jaxlib, flax; print("python", sys.version.split()[0], "jax", jax.__version__,
"jaxlib", jaxlib.__version__, "flax", flax.__version__, "backend", jax.default_backend(), jax.devices())'
  "$py" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|orbax-checkpoint|grain|tensorflow-datasets|numpy|protobuf|etils) '
} 2>&1 | tee "$out/env.txt"

start=$SECONDS
timeout -s TERM "${DEMO_S:-1800}" "$py" -m pathor1_jax.cli demo --debug --out "$demo_out" \
  --stages "$stages" ${STEPS:+--steps "$STEPS"} 2>&1 | tee "$out/demo.log"
rc=$?
echo "demo: rc $rc, $((SECONDS - start)) s" | tee -a "$out/demo.log"

for stage in ${stages//,/ }; do
  [ -f "$demo_out/$stage/metrics.jsonl" ] && cp "$demo_out/$stage/metrics.jsonl" "$out/$stage.metrics.jsonl"
done
"$py" - "$demo_out" "${stages//,/ }" <<'EOF' 2>&1 | tee "$out/steps.txt"
import json, statistics, sys
from pathlib import Path

root = Path(sys.argv[1])
print(f"{'stage':<6} {'steps':>5} {'loss first -> last':>20} {'reward first -> last':>20} {'step 1 (s)':>10} {'median after (s)':>16}")
for stage in sys.argv[2].split():
    path = root / stage / "metrics.jsonl"
    if not path.exists():
        print(f"{stage:<6} no metrics")
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ends = {
        key: f"{rows[0][key]:.4f} -> {rows[-1][key]:.4f}" if key in rows[0] else "-"
        for key in ("loss", "reward/mean")
    }
    times = [r["step_time_s"] for r in rows]
    after = statistics.median(times[1:]) if len(times) > 1 else float("nan")
    print(
        f"{stage:<6} {rows[-1]['step']:>5} {ends['loss']:>20} {ends['reward/mean']:>20} "
        f"{times[0]:>10.2f} {after:>16.3f}"
    )
EOF
exit "$rc"
