#!/usr/bin/env bash
# The GPU benchmarks in one call on a lent GPU, within 8 minutes (bench/gpu.py does the measuring):
#   1. training gpt2 from scratch at 1024 context (bf16, torch.compile, fused AdamW, SDPA's flash
#      kernel) on tiny-shakespeare until a step's loss is below 0.1: seconds to that loss, tokens/s, MFU;
#   2. engine decode tokens/s at batch 1 and 32;
#   3. the serving sweep (concurrency 1, 4, 16, 32) against the service on the GPU.
#
#   bash bench/gpu.sh prepare              here, before each lent-GPU call: the data, the tokenizer cache,
#                                          the commit and the wheels the GPU image lacks, into .device/
#   bash bench/gpu.sh                      on the GPU (device tool: carry [".device"], timeout_s 540)
#   GPU_SH_DRY_RUN=1 bash bench/gpu.sh     the same plumbing here on the CPU, tiny shapes, about a minute
#
# Results: gpu_train.json, gpu_decode.json, gpu_serve.json and gpu.log in $OUT (the device tool brings
# them back), else bench/results/gpu (a dry run: .device/dry-run); a summary is printed last. Copy a real
# run's JSON into bench/results/gpu/ and run `python -m bench.plot && python -m bench.report`.
# Extra flags for a section: GPU_SH_TRAIN_ARGS, GPU_SH_DECODE_ARGS, GPU_SH_SERVE_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=$ROOT/.device
# The GPU image lacks these (its package list is in the device tool's KINDS.md); the versions are this
# checkout's, so the service runs there on what it is tested with here. typing-extensions and
# annotated-doc are in the image, but pydantic and fastapi want versions at least as new as these.
WHEELS="pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions
        python-dotenv litserve fastapi starlette annotated-doc uvicorn pyzmq opentelemetry-api"
GPU_PYTHON_VERSION=3.12 # the image's python3

prepare() {
    set -e
    local python=${PYTHON:-$ROOT/.venv/bin/python}
    mkdir -p "$STAGE"
    grep -qxF /.device/ "$ROOT/.git/info/exclude" 2>/dev/null || echo /.device/ >>"$ROOT/.git/info/exclude"
    # shared/ is read-only: the copies are made writable so that the next prepare can replace them.
    rm -rf "$STAGE/tinyshakespeare.txt" "$STAGE/tiktoken"
    cp "$ROOT/../shared/data/tinyshakespeare.txt" "$STAGE/"
    cp -r "${TIKTOKEN_CACHE_DIR:-$ROOT/../shared/tiktoken}" "$STAGE/tiktoken"
    chmod -R u+w "$STAGE/tinyshakespeare.txt" "$STAGE/tiktoken"
    git -C "$ROOT" rev-parse --short HEAD >"$STAGE/commit"
    [ -z "$(git -C "$ROOT" status --porcelain)" ] || sed -i 's/$/-dirty/' "$STAGE/commit"
    rm -rf "$STAGE/wheels"
    local pins=()
    for name in $WHEELS; do
        pins+=("$name==$("$python" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$name")")
    done
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version $GPU_PYTHON_VERSION \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_26_x86_64 -d "$STAGE/wheels" "${pins[@]}"
    check_stage
    echo "prepared $(du -sh "$STAGE" | cut -f1) in .device (commit $(cat "$STAGE/commit")): now the device call"
}

check_stage() {
    local missing=()
    [ -s "$STAGE/tinyshakespeare.txt" ] || missing+=(tinyshakespeare.txt)
    [ -d "$STAGE/tiktoken" ] || missing+=(tiktoken)
    [ -s "$STAGE/commit" ] || missing+=(commit)
    for name in $WHEELS; do
        compgen -G "$STAGE/wheels/$(echo "$name" | tr - _)-*.whl" >/dev/null || missing+=("wheel $name")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "gpu.sh: .device lacks ${missing[*]}: run 'bash bench/gpu.sh prepare' here first" >&2
        return 1
    fi
}

[ "${1:-}" = prepare ] && { prepare; exit; }
check_stage || exit 2

DRY=${GPU_SH_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    RESULTS=${OUT:-$STAGE/dry-run}
    # Tiny shapes on the CPU: every step of the real run, in about a minute.
    TRAIN=(--device cpu --preset tiny --seq-len 64 --batch-size 8 --dtype fp32 --no-compile --lr 1e-2
           --warmup-steps 5 --decay-steps 400 --target-loss 7 --time-limit 30 --log-every 10)
    DECODE=(--device cpu --preset tiny --batches 1 4 --new-tokens 16)
    SERVE=(--device cpu --preset tiny --dtype fp32 --concurrency 1 4 --requests 4 --output-len 16)
    LIMITS=(120 60 120)
else
    PY=${PYTHON:-python3}
    RESULTS=${OUT:-$ROOT/bench/results/gpu}
    # Installed outside the image's environment and put first on the path; a rerun reinstalls.
    SITE=/tmp/gpu-sh-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STAGE"/wheels/*.whl || exit 3
    export PYTHONPATH=$SITE
    TRAIN=(--device cuda --preset gpt2 --seq-len 1024 --batch-size 32 --dtype bf16 --compile
           --target-loss 0.1 --time-limit 180)
    DECODE=(--device cuda --preset gpt2 --batches 1 32 --new-tokens 128)
    SERVE=(--device cuda --preset gpt2 --dtype bf16 --concurrency 1 4 16 32 --requests 16)
    # Each section's ceiling in seconds, 445 together: the 8 minutes less the setup. Training gets
    # 180 s to reach the loss (its first step compiles) and the rest for starting and writing.
    LIMITS=(280 45 120)
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$STAGE/tiktoken
BENCH_COMMIT=$(cat "$STAGE/commit")
export BENCH_COMMIT
mkdir -p "$RESULTS"
rm -f "$RESULTS"/gpu_*.json

section() { # name, seconds, then the bench.gpu arguments; a failure is noted and the next one runs
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo -e "\n=== $name (at most ${limit}s)"
    timeout --kill-after=20 "$limit" "$PY" -m bench.gpu "$name" --results-dir "$RESULTS" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ $rc = 0 ] || failed+=("$name (exit $rc)")
}

run() {
    echo "gpu.sh $([ "$DRY" = 1 ] && echo "dry run ")at $(date -u +%FT%TZ), commit $BENCH_COMMIT, results in $RESULTS"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
    failed=()
    # shellcheck disable=SC2086 # the extra flags are meant to split
    section train "${LIMITS[0]}" --data "$STAGE/tinyshakespeare.txt" "${TRAIN[@]}" ${GPU_SH_TRAIN_ARGS:-}
    # shellcheck disable=SC2086
    section decode "${LIMITS[1]}" "${DECODE[@]}" ${GPU_SH_DECODE_ARGS:-}
    # shellcheck disable=SC2086
    section serve "${LIMITS[2]}" "${SERVE[@]}" ${GPU_SH_SERVE_ARGS:-}
    echo -e "\n=== summary after ${SECONDS}s"
    "$PY" -m bench.gpu summary --results-dir "$RESULTS"
    if [ ${#failed[@]} -gt 0 ]; then
        echo "failed: ${failed[*]}"
        return 1
    fi
}

run 2>&1 | tee "$RESULTS/gpu.log"
exit "${PIPESTATUS[0]}"
