#!/usr/bin/env bash
# The one command for a machine with a CUDA GPU: the GPU checks, then the recipe's iteration times and the cost of
# the paper's reproduction from them, each under a time limit so that both finish within 10 minutes.
#
#     bash benchmarks/gpu_session.sh            # from the repository root; logs go to $OUT, else ./gpu-session/
#
# Writes gpu_check.txt (the checks and their summary table), recipe_speed.txt (ms per iteration of the recipe's
# nets with --amp --channels-last, and the GPU-hours of he2016 and he2016-short) and nvidia-smi.txt. The exit
# status is gpu_check's (0: every check passed). Paste the two tables into docs/performance.md (GPU) and
# docs/recipe.md (Cost) with the GPU's name.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-gpu-session}"
mkdir -p "$out"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$out/nvidia-smi.txt"
# gpu_check skips the checks not started within --budget seconds and always prints its summary table
timeout 450 python "$here/gpu_check.py" --budget 330 2>&1 | tee "$out/gpu_check.txt"
status=${PIPESTATUS[0]}
timeout 120 python "$here/recipe_speed.py" --device cuda --amp --channels-last --iterations 30 --seeds 5 2>&1 \
    | tee "$out/recipe_speed.txt"
echo "gpu_check exit status: $status (124: killed by its time limit); logs in $out/"
exit "$status"
