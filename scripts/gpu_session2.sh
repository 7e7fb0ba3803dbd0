#!/usr/bin/env bash
# Session-2 GPU plan on one host with two GPUs (~22 minutes; docs/base_model.md, docs/benchmarks.md,
# docs/efficient_decoder.md). Started in the background (setsid) by the first call; later calls watch runs/s2.log.
#  1. DDP check (#4): the same 300 steps from the shipped base UNet at global batch 128, on one GPU (batch 128) and
#     on two (64 each, accelerate launch): loss curves and images/s.
#  2. Main run (#4): the two-GPU run resumed for TRAIN_MIN more minutes; its EMA replaces the base UNet.
#  3. Two lanes: GPU 0 runs the export benchmark (#8, scripts/gpu_bench.sh) then GPU latency tables (#5);
#     GPU 1 evaluates old and new base (50 DDIM steps, guidance 7.5, 485 test prompts) then distills the efficient
#     decoder from the new base (#6, scripts/gpu_decoder_base.sh).
#  4. runs/s2/out/: the new UNet (3 shards) and results.tar; the collecting call copies them to $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R=runs/s2; mkdir -p "$R/out"
BASE=${BASE:-snapfusion/assets/models/base}
TRAIN_MIN=${TRAIN_MIN:-8}
CHECK_STEPS=${CHECK_STEPS:-300}
DEADLINE=${DEADLINE:-1350}     # seconds from start: optional steps are skipped past it
EMOJI=40
left() { echo $((DEADLINE - SECONDS)); }
stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }
COMMON="--from-pipeline $BASE --num-emoji $EMOJI --lr 2e-4 --warmup-steps 100 --ema-decay 0.999 --log-every 10"
LAUNCH2="accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no -m"

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"

stamp "1. DDP check: one GPU"
CUDA_VISIBLE_DEVICES=0 python3 -m snapfusion.cli train-unet --run-dir $R/gpu1 $COMMON --batch-size 128 \
  --max-steps "$CHECK_STEPS" --latent-pool 8192 --num-workers 12 --checkpoint-every 100000 --sample-every 0 \
  > $R/gpu1.log 2>&1 || stamp "gpu1 FAILED"
tail -n 2 $R/gpu1.log
stamp "1. DDP check: two GPUs"
$LAUNCH2 snapfusion.cli train-unet --run-dir $R/main $COMMON --batch-size 64 --max-steps "$CHECK_STEPS" \
  --latent-pool 8192 --num-workers 12 --checkpoint-every 100000 --sample-every 0 > $R/gpu2.log 2>&1 || stamp "gpu2 FAILED"
tail -n 2 $R/gpu2.log
cp $R/main/metrics.jsonl $R/gpu2_check.jsonl 2>/dev/null

stamp "2. main run, two GPUs, $TRAIN_MIN min"
$LAUNCH2 snapfusion.cli train-unet --run-dir $R/main --resume $COMMON --batch-size 64 --max-steps 200000 \
  --max-minutes "$TRAIN_MIN" --latent-pool 32768 --num-workers 12 --checkpoint-every 1000 --sample-every 2000 \
  > $R/main.log 2>&1 || stamp "main FAILED"
tail -n 3 $R/main.log
python3 - <<PY || stamp "assemble FAILED"
import torch
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
p = Pipeline.load("$BASE")
p.unet = UNet.load("$R/main/final")
p.save("$R/base_new", dtype=torch.float16)
print("assembled $R/base_new")
PY
cp -r $R/base_new/unet $R/out/unet

stamp "3. lanes"
(
  export CUDA_VISIBLE_DEVICES=0
  OUT=$R/bench_out bash scripts/gpu_bench.sh > $R/bench.log 2>&1
  stamp "bench done"
  mkdir -p $R/lat
  for p in sd15 snapfusion base; do
    [ "$(left)" -gt 100 ] || break
    timeout 100 python3 -m snapfusion.cli bench-blocks --preset $p --device cuda --dtype fp16 --repeats 20 \
      --out $R/lat/${p}_cuda_torch_fp16.json > $R/lat/$p.log 2>&1; tail -n 1 $R/lat/$p.log
  done
  [ "$(left)" -gt 100 ] && timeout 100 python3 -m snapfusion.cli bench-blocks --model $R/base_new --device cuda \
    --dtype fp16 --repeats 20 --out $R/lat/base_trained_cuda_torch_fp16.json > $R/lat/base_trained.log 2>&1
  stamp "lane 0 done"
) > $R/lane0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  for m in new old; do
    model=$R/base_new; [ $m = old ] && model=$BASE
    timeout 240 python3 -m snapfusion.cli eval --model $model --num-emoji $EMOJI --num-images 485 --steps 50 \
      --guidance 7.5 --batch-size 64 --device cuda --out $R/eval_$m > $R/eval_$m.log 2>&1
    tail -n 4 $R/eval_$m.log; stamp "eval $m done"
  done
  MODEL=$R/base_new OUT=$R/dec_out ABL_STEPS=250 MAIN_MIN=2.5 TINY_MIN=1.2 NUM_EMOJI=$EMOJI \
    bash scripts/gpu_decoder_base.sh > $R/decoder.log 2>&1
  stamp "lane 1 done"
) > $R/lane1.log 2>&1 &
wait
cat $R/lane0.log $R/lane1.log

stamp "4. pack"
tar cf $R/out/results.tar --exclude='*.safetensors' --exclude='checkpoints' $R/*.log $R/*.jsonl \
  $R/gpu1/metrics.jsonl $R/main/metrics.jsonl $R/main/samples $R/main/final/step.json $R/eval_* $R/lat \
  $R/bench_out $R/dec_out/decoder_base.tar 2>/dev/null
for f in dec_half_final dec_tiny_final; do cp $R/dec_out/$f.tar $R/out/ 2>/dev/null; done
ls -la $R/out $R/out/unet
stamp "SESSION DONE"
