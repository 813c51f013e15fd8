#!/usr/bin/env bash
# What docs/benchmarks.md lists as owed to a GPU, in order of value, in parts that each fit one 10-minute device
# call. Every command has its own time limit and writes its log under $OUT (default ./gpu_out), so a part that runs
# out of time still returns what finished.
#
#   bash benchmarks/gpu_session.sh 1     # correctness on the GPU, NF4 decode, RMSNorm, QLoRA step (3 paths + profile)
#   bash benchmarks/gpu_session.sh 2     # gpt-oss-20b shapes: the T4 recipe under a T4's cap, then 4k / 16k tokens
#   bash benchmarks/gpu_session.sh 3     # fused CE: frozen head (chunks vs tiles), trainable head, streamed head
#   bash benchmarks/gpu_session.sh 4     # rollouts, QAT
#   bash benchmarks/gpu_session.sh 5     # QLoRA with every offload, and with no layer recomputed; gpt-oss likewise
#   bash benchmarks/gpu_session.sh 6     # attention: the CUTLASS backward probe, the CUDA tests, Triton vs CUTLASS
#   bash benchmarks/gpu_session.sh 7     # gpt-oss-20b shapes at 64k and 131,072 tokens (the model's longest context)
#
# bitsandbytes is not in every image: a wheel under .whl/ is installed into /tmp/site first when present.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ! python -c "import bitsandbytes" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
# the repo is not pip-installed there: its root goes on the path, and `nbhelpers.kernels` (pyproject maps the
# top-level kernels/ folder to it) becomes a link inside the device's copy of the tree
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -e nbhelpers/kernels ] || ln -s ../kernels nbhelpers/kernels
python -c "import nbhelpers.kernels" || { echo "nbhelpers.kernels does not import" >&2; exit 2; }

step() {  # step NAME SECONDS COMMAND...: run, keep the log, never stop the part
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? ; tail:"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, \
transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"

case "${1:-1}" in
1)
    step cuda_checks 120 python benchmarks/cuda_checks.py
    step nf4_decode 60 python benchmarks/nf4_decode.py --json "$OUT/nf4_decode.json"
    step rms_norm 90 python benchmarks/rms_norm.py --json "$OUT/rms_norm.json"
    step qlora_step_2 260 python benchmarks/qlora_step.py --layers 2 --rounds 3 --profile \
        --paths plain nbhelpers-linear nbhelpers --json "$OUT/qlora_2.json"
    ;;
2)
    step gpt_oss_t4 300 python benchmarks/gpt_oss_step.py --t4 --skip check experts --json "$OUT/gpt_oss_t4.json"
    step gpt_oss_long 270 python benchmarks/gpt_oss_step.py --tokens 4096 16384 --attn nbhelpers --offload \
        --fused-ce --fused-norm --skip check experts --json "$OUT/gpt_oss_long.json"
    ;;
3)
    step fused_ce_frozen 180 python benchmarks/fused_ce.py --tokens 8192 16384 --reps 3 --json "$OUT/fused_ce.json"
    step fused_ce 120 python benchmarks/fused_ce.py --tokens 8192 --trainable-head --reps 3
    step fused_ce_streamed 100 python benchmarks/fused_ce.py --tokens 2048 8192 --stream-head --reps 3
    ;;
4)
    step rollout 250 python benchmarks/rollout.py --attn nbhelpers
    step qat 190 python benchmarks/qat.py
    ;;
5)
    step qlora_offload 290 python benchmarks/qlora_step.py --layers 4 --paths plain nbhelpers-offload \
        nbhelpers-layers nbhelpers-nockpt --json "$OUT/qlora_offload.json"
    step gpt_oss_nockpt 240 python benchmarks/gpt_oss_step.py --tokens 1024 4096 --attn nbhelpers --fused-ce \
        --fused-norm --checkpoint-layers 0 --skip check experts --json "$OUT/gpt_oss_nockpt.json"
    ;;
6)
    step cutlass_probe 60 python benchmarks/cutlass_backward_probe.py
    step attention_cuda 200 python -m pytest -q -s tests/test_attention_cuda.py
    step attention_backends 300 python benchmarks/attention.py --lengths 2048 8192 --methods triton efficient flex \
        --dtype float16 --rep 50 --json "$OUT/attention_backends.json"
    ;;
7)  # the planner predicts 31.4 GB at 64k and 47.2 GB at 131,072 tokens; one step each, its first (memory, not speed)
    step gpt_oss_longest 560 python benchmarks/gpt_oss_step.py --tokens 65536 131072 --steps 1 --warmup 0 \
        --attn nbhelpers --offload --fused-ce --fused-norm --skip check experts --json "$OUT/gpt_oss_longest.json"
    ;;
*)
    echo "expected part 1, 2, 3, 4, 5, 6 or 7, found '$1'" >&2
    exit 2
    ;;
esac
