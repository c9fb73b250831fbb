#!/usr/bin/env bash
# Every GPU check and benchmark of docs/benchmarks.md's GPU section in one go (each step bounded in
# time, so one slow step does not hide the others). Run from the repository root on a CUDA machine
# with distil installed (pip install -e ".[dev,gpu]"; mamba_ssm / causal_conv1d optional).
# Logs go to ${OUT:-gpu-logs}/.
set -u
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -m distil info | tee -a "$out/device.txt"
timeout 420 python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" | tail -15
timeout 240 python3 benchmarks/kd_loss.py --kind jsd --vocab 128256 --dtype bfloat16 2>&1 | tee "$out/kd_jsd.log" | grep "^|"
timeout 240 python3 benchmarks/decode.py --d-model 2048 --layers 24 --heads 16 --dtype bfloat16 \
  --contexts 1024 4096 16384 2>&1 | tee "$out/decode.log" | grep "^|"
timeout 240 python3 benchmarks/train_step.py --vocab 128256 --dtype bfloat16 --d-model 1024 --layers 4 \
  --teacher-d-model 2048 --teacher-layers 8 --batch 4 --seq 1024 2>&1 | tee "$out/train_step.log" | grep "^|"
