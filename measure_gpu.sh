#!/usr/bin/env bash
# The GPU figures behind the README's speed and planner tables, measured on the machine it runs
# on (CUDA; cut-cross-entropy installed: pip install -e ".[cuda]"). Writes OUT_DIR/bench and
# OUT_DIR/plans; each part can run alone.
#
#   ./measure_gpu.sh OUT_DIR [bench] [plans]     # both when no part is named
#
# bench  gpt2 and gpt2-medium at 12 x 1024: the whole-model compile reference, our fastest plain
#        step, the lean loss, block checkpointing with the lean loss, HF eager;
#        3 interleaved repeats of 20 timed steps each
# plans  the recommended batch (--batch_size auto, 3 steps) per preset and plan, and
#        --memory_budget_gb 3/6/10/20 at 124M against the fastest fitting bench row
set -euo pipefail
out=${1:?usage: ./measure_gpu.sh OUT_DIR [bench] [plans]}
shift
parts=${*:-bench plans}
export PYTHONUNBUFFERED=1
if [[ " $parts " == *" bench "* ]]; then
  python3 bench.py --presets gpt2,gpt2-medium --repeat 3 --steps 20 --out_dir "$out/bench" --exact \
    --only "HF eager,reference,compiled none,compiled none +lean,compiled block +lean"
fi
if [[ " $parts " == *" plans "* ]]; then
  bench=()
  [[ -f "$out/bench/bench.json" ]] && bench=(--bench "$out/bench/bench.json")
  python3 check_plans.py "${bench[@]}" --out_dir "$out/plans" --batch_presets shakespeare_char,gpt2 \
    --budget_presets gpt2
fi
