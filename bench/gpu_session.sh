#!/usr/bin/env bash
# One session on a GPU machine, from the repository root:
#   1. the MM-DPO step benchmark against TRL at the anchor shape and at any-resolution lengths (bench/dpo_step.py);
#   2. the commands end to end in bf16 on test-bed models: reward model, δ, reference log-probs, MM-DPO;
#   3. MM-DPO under DeepSpeed ZeRO-2 and ZeRO-3 (accelerate launch, one process).
# Figures and logs go to $OUT (default runs/gpu). `CHECK=1` runs a CPU rehearsal of parts 2-3 without bf16 or DeepSpeed.
# Needs the wheels of ../shared/gpu/fetch-wheels.sh in .whl/ on a machine that lacks trl/deepspeed.
set -u
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ "${CHECK:-0}" = 1 ]; then BF16=false; STEPS=4; else BF16=true; STEPS=30; fi
if [ -d .whl ] && ! $PY -c "import trl, deepspeed" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-0.19.8.tar.gz
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; $PY -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)"; } > "$OUT/machine.txt" 2>&1
step() { local name=$1; shift; local t0=$EPOCHREALTIME; "$@" > "$OUT/$name.log" 2>&1; local rc=$?; printf '%-14s rc=%s %6.1f s\n' "$name" "$rc" "$(awk "BEGIN{print $EPOCHREALTIME - $t0}")" >> "$OUT/steps.txt"; }

if [ "${CHECK:-0}" != 1 ]; then
  step bench timeout 330 $PY bench/dpo_step.py --preset gpu --out "$OUT/dpo_step_gpu.json"
  step bench-anyres timeout 330 $PY bench/dpo_step.py --preset gpu-anyres --grad-checkpointing --out "$OUT/dpo_step_gpu_anyres.json"
fi

W=$OUT/work; rm -rf "$W"
M="$PY -m mmrlhf.cli"
step synth $M synth --out "$W/world" --n-queries 48 seed=0
step pairs $M pairs input="$W/world/queries.jsonl" out="$W/pairs" oracle=true groups=false
step train-reward $M train-reward data="$W/pairs/queries.jsonl" image_root="$W/world" base=small:qwen2_vl out="$W/rm" steps=$STEPS save_steps=$STEPS bf16=$BF16
step score $M score data="$W/pairs/queries.jsonl" image_root="$W/world" model="$W/rm/final" out="$W/scored" critiques=given
step ref-logps $M ref-logps data="$W/scored/queries.jsonl" image_root="$W/world" model=small:qwen2_vl out="$W/ref" bf16=$BF16
step train-dpo $M train-dpo data="$W/ref/queries.jsonl" image_root="$W/world" base=small:qwen2_vl out="$W/dpo" steps=$STEPS save_steps=$STEPS logging_steps=5 bf16=$BF16
if [ "${CHECK:-0}" != 1 ]; then
  for z in 2 3; do
    step zero$z timeout 150 $PY -m accelerate.commands.launch --config_file configs/accelerate/zero$z.yaml --num_processes 1 -m mmrlhf.cli train-dpo \
      data="$W/ref/queries.jsonl" image_root="$W/world" base=small:qwen2_vl out="$W/dpo-zero$z" steps=$STEPS save_steps=$STEPS logging_steps=5 \
      bf16=true deepspeed=configs/deepspeed/zero$z.json
  done
fi
grep -h "mmdpo/beta_mean\|MM-DPO policy trained\|reward model trained" "$W"/../*.log 2>/dev/null | tail -12 > "$OUT/summary.txt"
cat "$OUT/steps.txt"
