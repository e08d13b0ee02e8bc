#!/usr/bin/env bash
# The project's one prepared GPU check, for a session that is lent a device machine: what only a
# GPU can show (mixed precision, torch.compile, throughput). An estimate, as it has not run on a
# GPU yet: about 5 minutes of an H200.
#
#   1. `oocid demo` on CUDA: precision auto (bf16 autocast), the exact softmax in core.
#   2. The demo's recipe streamed from shards (2 workers, pinned-memory prefetch) through a
#      partial cache (4 of its 5 MB) on CUDA, 3 epochs each: fp16 with a grad scaler and shared
#      negatives; bf16 + torch.compile with per-sample negatives. Each run's metrics.jsonl is
#      checked: finite losses, no skipped steps or bad samples, a kNN on the held-out split.
#   3. tools/bench_train.py on CUDA: small and cifar_resnet18 at 32 px, resnet50 at 224 px, both
#      kinds of negatives, precision auto: the GPU table in docs/benchmarks.md.
# A section that fails is recorded and the next one still runs; the exit status is 1 if any
# failed. Everything lands in $OUT (the device tool brings it back); copy it to tools/results/.
#
# The machine has torch (Python 3.12) but not zarr, numcodecs or webdataset: carry them, at the
# versions this project is tested with, as wheels in .whl/ (ignored by git; ~10 MB), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 webdataset==1.0.2 \
#     donfig==0.8.1.post1 braceexpand==0.1.7 typer==0.29.2
# then run the device tool with carry [".whl"], timeout_s 540 and the command
#   bash tools/gpu_check.sh
# On a machine without CUDA (to try the script itself) it runs the same steps on the CPU at a
# toy size: GPU_CHECK_SMALL=1 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/oocid-gpu-check}
WORK=${WORK:-/tmp/oocid-gpu-work}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/oocid-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/oocid-site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
oocid() { python3 -m oocid "$@"; }
small=${GPU_CHECK_SMALL:-0}
device=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, zarr, webdataset; print('torch', torch.__version__, 'zarr',
zarr.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
  git log -1 --format='commit %h %s' 2>/dev/null; } 2>&1 | tee "$OUT/env.txt"

demo() {
    local epochs
    epochs=$([ "$small" = 1 ] && echo 1 || echo 45)
    oocid demo --out "$WORK/demo" --epochs "$epochs" --no-progress 2>&1 | tee "$OUT/demo.txt" \
        || return 1
    cp "$WORK/demo/demo.json" "$OUT/demo.json"
}

train_run() {  # name precision negatives [extra train options]
    local name=$1 precision=$2 negatives=$3 epochs
    shift 3
    epochs=$([ "$small" = 1 ] && echo 1 || echo 3)
    oocid train --shards "$WORK/shards250" --val "$WORK/demo/shards/val" \
        --config configs/demo.toml --set data.in_memory=no --set data.workers=2 \
        --set data.shuffle_buffer=256 --bank "$WORK/$name.zarr" --out "$WORK/$name" \
        --device "$device" --precision "$precision" --loss infonce --negatives "$negatives" \
        --cache-mb 4 --epochs "$epochs" --no-progress "$@" 2>&1 | tee "$OUT/train_$name.txt" \
        || return 1
    cp "$WORK/$name/metrics.jsonl" "$OUT/metrics_$name.jsonl" || return 1
    # a step with a non-finite loss is skipped and left out of the epoch's loss: count them too
    python3 - "$OUT/metrics_$name.jsonl" <<'PY'
import json, math, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
assert recs, f"{sys.argv[1]}: no epoch finished"
for r in recs:
    assert math.isfinite(r["loss"]) and r["skipped_steps"] == 0 and r["bad_samples"] == 0, r
assert recs[-1].get("knn_top1") is not None, "no kNN check on the held-out split"
print(sys.argv[1], "epochs", len(recs), "last",
      {k: recs[-1].get(k) for k in ("loss", "knn_top1", "images_per_s")})
PY
}

streamed() {  # needs the demo's held-out shards
    [ -d "$WORK/demo/shards/val" ] || return 1
    oocid shard oocid/data/fashion_mnist_demo.npz "$WORK/shards250" --shard-size 250 \
        --no-progress || return 1
    local failed=0
    train_run fp16_shared 16 shared || failed=1
    train_run bf16_compile bf16 per-sample --set train.compile=true || failed=1
    return $failed
}

bench() {
    if [ "$small" = 1 ]; then
        python3 tools/bench_train.py --model small --rows 200000 --steps 4 --warmup 1 \
            --rounds 2 --batch 32 --k 64 --stream-images 256 --workdir "$WORK/bench" 2>&1 \
            | tee "$OUT/bench_train.txt"
    else
        python3 tools/bench_train.py --workdir "$WORK/bench" 2>&1 | tee "$OUT/bench_train.txt"
    fi
}

failed=""
echo "== 1. oocid demo on $device (precision auto)"
demo || failed="$failed demo"
echo "== 2. streamed from shards, partial cache on $device: fp16 + shared, bf16 + compile"
streamed || failed="$failed streamed"
echo "== 3. tools/bench_train.py on $device"
bench || failed="$failed bench"
if [ -n "$failed" ]; then
    echo "== FAILED:$failed (what ran is in $OUT)" | tee -a "$OUT/env.txt"
    exit 1
fi
echo "== done: results in $OUT"
