#!/usr/bin/env bash
# The project's one prepared GPU check: one call of the device tool, about 7 minutes of one H200
# (an estimate; each part has its own timeout and together they stay under 10 minutes). The
# parts live in tools/gpu_check.py (read its docstrings); this script installs the carried
# wheels, runs each part under `timeout`, and ends with the table:
#
#   preflight    imports (oocid, zarr, numcodecs, google_crc32c, webdataset, yaml, tqdm, PIL,
#                torchvision, torch; the CLI's typer is filed under pipeline),
#                versions, CUDA device and capability, /dev/shm; a failure stops the check here
#   parity       every custom autograd Function against float64 on the CPU, forward and gradient,
#                under fp32, bf16 and fp16 autocast
#   cache        ChunkCache stress: small chunks, 3,000 gather/draw/update/end_step steps between
#                large matmuls, flush, exact equality with a host mirror
#   demo         the demo (in-memory exact softmax, bf16, 90 epochs): kNN above the untrained
#                net and within 0.03 of the CPU's 0.827
#   fp16_shared  5 epochs streamed through a partial cache, fp16 + grad scaler, shared negatives
#                (the scale, scaler skips); short runs: kNN above a collapse floor of 0.5
#   compile_nce  bf16 + torch.compile, per-sample NCE with EMA Z, accumulate 2 (graph breaks)
#   resume       stop after 5 steps, then resume to the end (fp16: the scaler's state)
#   bench        tools/bench_train.py, ResNet-50 224 px bf16 B 256 K 4096 N 1.28 M: model alone,
#                full bank (InfoNCE both negatives, NCE, softmax), 10 % cache with a real window,
#                peak memory, syncs and launches of one profiled step
#   pipeline     tools/bench_pipeline.py at 8 and 16 workers against the model's img/s
# Every part appends JSON lines to $OUT/results.jsonl and its log to $OUT/<part>.log; the exit
# status is 1 if a part failed, and the table's last line (JSON) names them.
#
# The device machine has torch (Python 3.12) but not zarr and the rest: carry them, at the
# versions this project is tested with, as wheels in .whl/ (ignored by git; ~10 MB), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 webdataset==1.0.2 \
#     donfig==0.8.1.post1 braceexpand==0.1.7 typer==0.29.2 google-crc32c==1.9.0 \
#     pyyaml==6.0.3 tqdm==4.70.1 annotated-doc==0.0.7 shellingham==1.5.4
# (zarr 3 imports google_crc32c when it is imported, webdataset yaml, the shard writer tqdm,
# typer annotated_doc and shellingham), then run the device tool with carry
# [".whl"], timeout_s 600 and the command
#   bash tools/gpu_check.sh
# Without CUDA, or with GPU_CHECK_SMALL=1, it is a dry run: the same parts at a toy size on the
# CPU, what needs CUDA skipped with its reason (tests/tools/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT=${OUT:-/tmp/oocid-gpu-check}
export WORK=${WORK:-/tmp/oocid-gpu-work}
mkdir -p "$OUT"
rm -rf "$WORK" "$OUT/results.jsonl" && mkdir -p "$WORK"
small=0
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || small=1
[ "${GPU_CHECK_SMALL:-0}" = 1 ] && small=1
[ "$small" = 1 ] && export GPU_CHECK_SMALL=1
# the wheels are for the device machine's Python 3.12; a dry run uses what this machine has
if [ "$small" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/oocid-site .whl/*.whl || { echo "== preflight: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/oocid-site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  git log -1 --format='commit %h %s' 2>/dev/null; } > "$OUT/env.txt" 2>&1

part() {  # name seconds (GPU) seconds (dry run)
    local limit=$2
    [ "$small" = 1 ] && limit=$3
    echo "== $1 (timeout ${limit} s)"
    timeout -k 10 "$limit" python3 tools/gpu_check.py "$1" > "$OUT/$1.log" 2>&1
    local rc=$?
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "{\"part\": \"$1\", \"check\": \"timeout\", \"status\": \"fail\", \"seconds\": $limit}" \
            >> "$OUT/results.jsonl"
    fi
    tail -n 3 "$OUT/$1.log"
    return $rc
}

# GPU timeouts sum to 585 s (under the device tool's 600 with the wheels' install)
part preflight 30 60 || { echo "== preflight failed: nothing else runs"; cat "$OUT/preflight.log"
                          python3 tools/gpu_check.py table; exit 1; }
part parity 40 60
part cache 50 60
part demo 70 60
part fp16_shared 55 60
part compile_nce 85 120
part resume 45 60
part bench 140 120
part pipeline 70 60
python3 tools/gpu_check.py table | tee "$OUT/table.txt"
exit "${PIPESTATUS[0]}"
