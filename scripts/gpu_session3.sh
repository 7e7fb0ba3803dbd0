#!/usr/bin/env bash
# Next GPU plan (written after session 2; not yet run) for one host with two GPUs, ~22 minutes:
#  1. Offset-noise fine-tune of the base UNet on both GPUs (the background-color fix of docs/base_model.md).
#  2. Two lanes: GPU 0 evaluates the new base (50 DDIM steps, guidance 7.5, 485 prompts), then times the
#     CUDA-graph benchmark row (scripts/gpu_bench.sh's snapfusion_cudagraphs); GPU 1 runs the SD-scale decoder
#     steps (scripts/gpu_decoder_sd.sh).
#  3. runs/s3/out/: the new UNet (3 shards + 2 JSON) and results.tar, for the collecting call to copy to $OUT.
#
# Staging (the lesson of session 2: files carried by one call are deleted when the next call starts without
# them). Take the models out of the copied tree here (docs/base_model.md), then:
#   call 1: carry snapfusion/assets/models/base/unet;        command: bash scripts/gpu_session3.sh stash
#   call 2: carry the rest of snapfusion/assets/models/base;  command: bash scripts/gpu_session3.sh stash &&
#           (setsid nohup bash scripts/gpu_session3.sh run > runs/s3.log 2>&1 < /dev/null &); sleep 560; ...
#   later calls: watch runs/s3.log for "SESSION DONE", then copy runs/s3/out/* to $OUT.
# Every step reads the staged copy in /root/stage, never the carried paths.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGE=/root/stage/models
if [ "${1:-}" = stash ]; then  # merge whatever model files this call carried into the stage
  mkdir -p "$STAGE" && cp -r snapfusion/assets/models/. "$STAGE"/ && find "$STAGE" -name '*.json' | sort
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 stash|run"; exit 2; }
R=runs/s3; mkdir -p "$R/out"
BASE=$STAGE/base
TRAIN_MIN=${TRAIN_MIN:-11}
OFFSET=${OFFSET:-0.1}
stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }
for part in text_encoder unet vae_decoder vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash both calls first"; exit 1; }
done
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

stamp "1. offset-noise fine-tune, two GPUs, $TRAIN_MIN min"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  -m snapfusion.cli train-unet --run-dir $R/main --from-pipeline "$BASE" --offset-noise "$OFFSET" --num-emoji 40 \
  --batch-size 64 --lr 2e-4 --warmup-steps 100 --ema-decay 0.999 --log-every 10 --max-steps 200000 \
  --max-minutes "$TRAIN_MIN" --latent-pool 32768 --num-workers 12 --checkpoint-every 500 --sample-every 2000 \
  > $R/main.log 2>&1 || stamp "main FAILED (the last checkpoint is used)"
python3 - <<PY || { stamp "assemble FAILED"; exit 1; }
import pathlib, torch
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.train import state
ckpt = state.latest_checkpoint(pathlib.Path("$R/main"))
p = Pipeline.load("$BASE")
p.unet = UNet.load(ckpt / "ema")
p.save("$R/base_new", dtype=torch.float16)
print("assembled $R/base_new from", ckpt)
PY
cp -r $R/base_new/unet/. $R/out/

stamp "2. lanes"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 240 python3 -m snapfusion.cli eval --model $R/base_new --num-emoji 40 --num-images 485 --steps 50 \
    --guidance 7.5 --batch-size 64 --device cuda --out $R/eval_new > $R/eval_new.log 2>&1
  stamp "eval done"
  timeout 240 python3 -m snapfusion.cli bench --preset snapfusion --device cuda --dtype fp16 --size 512 --steps 8 \
    --guidance 7.5 --runs 10 --warmup 3 --compile --compile-mode reduce-overhead --compile-all \
    --json $R/bench_cudagraphs.json > $R/bench_cudagraphs.log 2>&1
  stamp "lane 0 done"
) > $R/lane0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  OUT=$R/dec_sd timeout 420 bash scripts/gpu_decoder_sd.sh > $R/decoder_sd.log 2>&1
  stamp "lane 1 done"
) > $R/lane1.log 2>&1 &
wait
cat $R/lane0.log $R/lane1.log

stamp "3. pack"
tar cf $R/out/results.tar --exclude='*.safetensors' --exclude=checkpoints $R/*.log $R/*.json $R/main/metrics.jsonl \
  $R/main/samples $R/eval_new $R/dec_sd 2>/dev/null
ls -la $R/out
stamp "SESSION DONE"
