#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU (nothing else needs one): tests/test_cuda.py, then decode of the full
# OLMoE-1B-7B shape (eager, grouped_mm, moekit, compiled with CUDA graphs, against the GPU's bandwidth bound) and the
# experts bench (prefill/training shapes). Logs and JSON lines go to the folder given (default: cuda-check/).
#   bash scripts/cuda_check.sh OUT_DIR
# Time limits per step (seconds): TEST_TIMEOUT (240), DECODE_TIMEOUT (260), EXPERTS_TIMEOUT (100).
set -u
out=${1:-cuda-check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$out/env.txt" 2>&1
# the machine's torch/transformers may differ from the lock file's: their deprecation warnings are not failures here
timeout "${TEST_TIMEOUT:-240}" "$py" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
  -W ignore::DeprecationWarning -W ignore::FutureWarning >"$out/tests.log" 2>&1
echo "tests rc=$?" >>"$out/env.txt"
timeout "${DECODE_TIMEOUT:-260}" "$py" bench/bench_decode.py --device cuda --experts 64 --layers 16 --new-tokens 32 \
  --rounds 3 --prefill 2048 >"$out/decode.jsonl" 2>"$out/decode.err"
echo "decode rc=$?" >>"$out/env.txt"
timeout "${EXPERTS_TIMEOUT:-100}" "$py" bench/bench_experts.py --device cuda --shape olmoe-1b-7b-64 \
  --dtypes bfloat16 >"$out/experts.jsonl" 2>"$out/experts.err"
echo "experts rc=$?" >>"$out/env.txt"
tail -n 3 "$out/tests.log"; cat "$out/env.txt"
