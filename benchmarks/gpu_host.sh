#!/usr/bin/env bash
# The GPU run: the device checks and benchmarks of docs/training-scale.md ("The device run") in
# one prepared script, for a GPU host that has its own Python, torch, numpy, pyarrow and pyyaml
# but no network and none of the project's other needs.
#
#   bash benchmarks/gpu_host.sh prepare      # here, with the package registry: fills .gpu-host/
#   bash benchmarks/gpu_host.sh run OUT      # there, from the project root; results under OUT
#
# prepare: downloads the wheels piarec's training, scoring and quality code needs beyond what
#   the host has (pydantic and its four dependencies, the versions installed here) for the
#   host's Python (GPU_HOST_PYTHON, default 3.12, x86-64 manylinux), and copies the two quality
#   datasets from ../shared/data. .gpu-host/ is ignored by git and must travel with the working
#   tree (about 7 MB).
# run: installs the wheels into /tmp/gpu-host-site, records the machine, then runs each step
#   under its own time limit, writing what it measured to OUT as it goes, so a step that runs
#   out of time keeps the steps before it:
#   1. tests/test_cuda.py: the GPU paths against the CPU's (before any timing);
#   2. benchmarks/train_scale.py on 2M users, 300 updates per arm after 20 warm-up ones: fp32
#      (today's trainer), bf16, batch 2,000, bf16 + batch 2,000, TF32, pinned transfers on a
#      side stream, the compiled decoder; the weekly projection;
#   3. benchmarks/score.py: the local engine on the CPU's cores and on the GPU;
#   4. benchmarks/quality.py on MovieLens-100K (3 folds, 1 seed): fp32 against the levers on
#      the GPU, a cross-check of the CPU's full measurement (docs/training-scale.md).
# The whole run is sized for about 6 minutes of an H100 (GPU_HOST_SCALE=small: seconds, for a
# check of the script itself on any machine). It exits non-zero when any step failed; without
# a CUDA GPU it stops before the steps (unless GPU_HOST_SCALE=small).
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_HOST_KIT:-.gpu-host}

prepare() {
    set -e
    local py=${GPU_HOST_PYTHON:-3.12} python=${PYTHON:-.venv/bin/python}
    rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/data/ml-100k" "$KIT/data/hetrec2011-lastfm-2k"
    local pins
    pins=$("$python" -c "import importlib.metadata as m; print(' '.join(f'{d}=={m.version(d)}' for d in
        ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'typing-extensions')))")
    # shellcheck disable=SC2086
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$KIT/wheels" $pins
    cp ../shared/data/ml-100k/u.data "$KIT/data/ml-100k/"
    cp ../shared/data/hetrec2011-lastfm-2k/user_artists.dat "$KIT/data/hetrec2011-lastfm-2k/"
    echo "$py" > "$KIT/python-version"
    du -sh "$KIT"
    ls "$KIT/wheels"
}

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log its status and time
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    rc=$?
    echo "=== $name: rc $rc, $(($(date +%s) - start)) s"
    echo "$name rc=$rc seconds=$(($(date +%s) - start))" >> "$OUT/steps.txt"
    [ "$rc" = 0 ] || FAILED=1
}

run() {
    OUT=${1:?usage: gpu_host.sh run OUT}
    mkdir -p "$OUT"
    exec 3>&1 4>&2 > >(tee "$OUT/log.txt") 2>&1
    TEE_PID=$!
    trap 'exec 1>&3 2>&4; wait "$TEE_PID"' EXIT  # the log is whole before the script returns, on any exit
    local small=${GPU_HOST_SCALE:-full}
    FAILED=0
    [ -f "$KIT/data/ml-100k/u.data" ] || { echo "no $KIT: run 'bash benchmarks/gpu_host.sh prepare' first and carry $KIT"; exit 2; }
    export PYTHONPATH=/tmp/gpu-host-site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    if ! python3 -c 'import pydantic' 2>/dev/null; then  # the host lacks it: install the carried wheels
        local want have
        want=$(cat "$KIT/python-version")
        have=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        [ "$want" = "$have" ] || { echo "the wheels are for Python $want, this host runs $have: GPU_HOST_PYTHON=$have bash benchmarks/gpu_host.sh prepare"; exit 2; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu-host-site "$KIT"/wheels/*.whl || exit 2
    fi
    python3 -c 'import piarec.config, piarec.train.trainer, piarec.scoring.scorer' || { echo "piarec does not import here"; exit 2; }
    : > "$OUT/steps.txt"
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/machine.txt"
    python3 -c 'import os, platform, sys, torch; print(platform.node(), sys.version.split()[0], "torch", torch.__version__,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", os.cpu_count(), "cores")' | tee -a "$OUT/machine.txt"
    if [ "$small" != small ] && ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "torch sees no CUDA GPU here: nothing to measure"; exit 2
    fi

    local users=2000000 score_users=300000 updates=300 warmup=20 epochs=200
    if [ "$small" = small ]; then users=3000 score_users=5000 updates=2 warmup=1 epochs=2; fi
    step cuda-tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
    step train-scale 210 python3 benchmarks/train_scale.py --users "$users" --updates "$updates" \
        --warmup "$warmup" --arms fp32,bf16,batch2000,bf16+batch2000,tf32,pinned,compiled --json "$OUT/train_scale.json"
    step score 80 python3 benchmarks/score.py --users "$score_users" --skip spark,cluster,als,memory \
        --workdir /tmp/gpu-host-score --out "$OUT/score.md"
    step quality-ml-100k 120 python3 benchmarks/quality.py --data "$KIT/data/ml-100k/u.data" --folds 3 \
        --seeds 1 --epochs "$epochs" --lambda-grid 0.1 --json "$OUT/quality-ml-100k.json" \
        --models multivae+pia,multivae+pia@levers-batch2000,multivae+pia@levers-bf16,multivae+pia@levers-bf16-batch2000
    cat "$OUT/steps.txt"
    return "$FAILED"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/gpu_host.sh prepare | run OUT"; exit 2 ;;
esac
