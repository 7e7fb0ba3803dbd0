#!/usr/bin/env bash
# Session-3 GPU plan (as run on 2026-11-27, results in docs/; later fixed: the SD-scale step now gets its --out):
# one host with two GPUs, about 23 minutes, everything in the background (setsid) so that
# short device calls can stage inputs and collect outputs. Two lanes:
#   lane A (GPU 0): offset-noise fine-tune of the base UNet (the background fix of docs/base_model.md) -> assemble
#     base_new -> FID-CLIP sweeps of base_new at 50 DDIM, 8 DDIM and 8 DPM-Solver++ steps -> the main CFG-aware
#     step distillation (16 -> 8, p = 0.1) of the student below from base_new -> the student's sweep with the
#     halved decoder -> CUDA-graph benchmark row.
#   lane B (GPU 1): robust training of the base UNet (with offset noise) -> ΔCLIP of dropping each block, before
#     and after robust training -> evolution to BUDGET of the base UNet's CPU latency (2-core table) -> v-prediction
#     fine-tune of the evolved UNet (with offset noise) = the student's start -> the loss ablation (vanilla,
#     CFG-aware, mix; equal steps) and its sweeps -> SD-v1.5-scale robust step and decoder steps.
# Outputs in $R/out: base_new and student UNet shards (fp16) and results.tar (configs, logs, JSON, PNG).
#
# Staging (files carried by one call are deleted when the next call starts without them; the tree travels
# without snapfusion/assets/models, see docs/base_model.md):
#   call 1 carries base/{unet,text_encoder,vae_encoder}: bash scripts/gpu_session3.sh stash &&
#          (setsid nohup bash /root/stage/repo/scripts/gpu_session3.sh run > /root/stage/s3.log 2>&1 < /dev/null &)
#   call 2 carries base/vae_decoder and parts/:  bash scripts/gpu_session3.sh stash
#   later calls: cat /root/stage/s3.log; when it says "SESSION DONE", copy /root/stage/runs/s3/out/* to $OUT.
# CPU dry run (tiny, for the plumbing): STAGE=/tmp/st DEVICE=cpu DRY=1 bash scripts/gpu_session3.sh stash; ... run
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s3; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; BATCH=${BATCH:-64}; W=${WORKERS:-12}
POOL=${POOL:-32768}; OFFSET=${OFFSET:-0.1}; BUDGET=${BUDGET:-0.2}
SWEEP=${SWEEP:-1.5,3,4.5,7.5,10.5}; ABL_SWEEP=${ABL_SWEEP:-1.5,4.5,7.5}
TRAIN_MIN=${TRAIN_MIN:-7}; ROBUST_MIN=${ROBUST_MIN:-2.5}; EVO_MIN=${EVO_MIN:-4}; VTUNE_MIN=${VTUNE_MIN:-3.5}
DISTILL_MIN=${DISTILL_MIN:-6}; ABL_STEPS=${ABL_STEPS:-300}; ABL_MIN=${ABL_MIN:-1.5}; LANE_S=${LANE_S:-1440}
EVAL_PROMPTS=${EVAL_PROMPTS:-16}; EVAL_STEPS=${EVAL_STEPS:-10}; DRY=${DRY:-0}
TABLE=snapfusion/assets/latency/base_cpu_torch.json
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --num-workers "$W" --sample-every 0 --log-every 25)
EVAL_TIMEOUT=600  # seconds per eval run (ev, scripts/gpu_stage.sh)
for part in text_encoder unet vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

lane_a() {
  stamp "A1 offset-noise fine-tune of the base UNet, $TRAIN_MIN min"
  $SF train-unet --run-dir $R/base_ft --from-pipeline "$BASE" --offset-noise "$OFFSET" --batch-size $BATCH \
    --lr 1e-4 --warmup-steps 100 --ema-decay 0.999 --max-steps 200000 --max-minutes "$TRAIN_MIN" \
    --latent-pool "$POOL" --checkpoint-every 1000 "${COMMON[@]}" > $R/base_ft.log 2>&1 \
    || stamp "A1 FAILED (the last checkpoint is used)"
  wait_for "$BASE/vae_decoder/config.json" 300 || { stamp "no decoder staged"; return 1; }
  local ck; ck=$(latest $R/base_ft)
  if [ -n "$ck" ]; then
    python3 - "$BASE" "$ck" "$R/base_new" <<'PY' || stamp "assemble FAILED"
import sys, torch
from pathlib import Path
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
base, ck, out = sys.argv[1:4]
p = Pipeline.load(base, with_encoder=True)  # the distillation runs encode scenes with it
p.unet = UNet.load(Path(ck) / "ema")
p.save(out, dtype=torch.float16)
print("assembled", out, "from", ck)
PY
  fi
  [ -f $R/base_new/model_index.json ] || { stamp "no base_new; lane A uses the old base"; cp -r "$BASE" $R/base_new; }
  cp -r $R/base_new/unet $R/out/base_unet && touch $R/base_new.ready
  stamp "A2 sweeps of base_new"
  ev base50 $R/base_new 50 ddim "$SWEEP"
  ev base8_ddim $R/base_new 8 ddim "$SWEEP"
  ev base8_dpm $R/base_new 8 dpmpp_2m "$SWEEP"
  stamp "A3 main distillation: waits for the student init of lane B"
  wait_for $R/student_init.done 900
  local init=$R/student_init; [ -f $init/config.json ] || { stamp "no student init: starting from base_new"; init=$R/base_new/unet; }
  $SF distill --run-dir $R/distill_main --model $R/base_new --student-unet "$init" --student-steps 8 --cfg-prob 0.1 \
    --offset-noise "$OFFSET" --latent-pool "$POOL" --batch-size 32 --lr 1e-4 --warmup-steps 100 --ema-decay 0.995 \
    --max-steps 1000000 --max-minutes "$DISTILL_MIN" --checkpoint-every 1000000 "${COMMON[@]}" \
    > $R/distill_main.log 2>&1 || stamp "A3 FAILED"
  tail -n 2 $R/distill_main.log
  if [ -f $R/distill_main/pipeline/model_index.json ]; then
    python3 -c "import torch; from snapfusion.models.unet import UNet; \
UNet.load('$R/distill_main/final').save('$R/out/student_unet', dtype=torch.float16)"
    ev student8_half $R/distill_main/pipeline 8 ddim "$SWEEP" --decoder half
  fi
  [ "$DRY" = 1 ] || timeout 200 $SF bench --preset snapfusion --device cuda --dtype fp16 --size 512 --steps 8 \
    --guidance 7.5 --runs 10 --warmup 3 --compile --compile-mode reduce-overhead --compile-all \
    --json $R/bench_cudagraphs.json > $R/bench_cudagraphs.log 2>&1
  stamp "lane A done"
}

lane_b() {
  stamp "B1 robust training (p = 0.9 per sample, offset noise), $ROBUST_MIN min"
  $SF robust-train --run-dir $R/robust --model "$BASE" --offset-noise "$OFFSET" --latent-pool "${POOL_SMALL:-16384}" \
    --batch-size $BATCH --lr 5e-5 --warmup-steps 50 --ema-decay 0 --max-steps 100000 --max-minutes "$ROBUST_MIN" \
    --checkpoint-every 100000 "${COMMON[@]}" > $R/robust.log 2>&1 || stamp "B1 FAILED"
  local rob; rob=$(latest $R/robust); rob=${rob:+$rob/model}; [ -n "$rob" ] || rob=$BASE/unet
  wait_for "$BASE/vae_decoder/config.json" 300 || { stamp "no decoder staged"; touch $R/student_init.done; return 1; }
  stamp "B2 block importance before / after robust training"
  for which in base robust; do
    local init=$BASE/unet; [ $which = robust ] && init=$rob
    timeout 240 $SF block-importance --model "$BASE" --init "$init" --label "$which" --table $TABLE \
      --out $R/importance_$which.json --num-prompts "$EVAL_PROMPTS" --eval-steps "$EVAL_STEPS" --eval-batch 32 \
      --num-emoji $EMOJI --image-size "$SIZE" --device "$DEV" > $R/importance_$which.log 2>&1 \
      || stamp "importance $which FAILED"
  done
  stamp "B3 evolution to $BUDGET of the CPU latency"
  timeout $(( ${EVO_MIN%.*} * 60 + 240 )) $SF evolve --run-dir $R/evo --table $TABLE --budget "$BUDGET" \
    --model "$BASE" --init "$rob" --device "$DEV" --iterations 12 --actions-per-step 4 \
    --num-prompts 16 --eval-steps "$EVAL_STEPS" --eval-batch 16 --train-steps 60 --batch-size 32 --num-workers "$W" \
    --num-emoji $EMOJI --image-size "$SIZE" --offset-noise "$OFFSET" --max-minutes "$EVO_MIN" \
    > $R/evo.log 2>&1 || stamp "B3 FAILED"
  tail -n 2 $R/evo.log
  local evo=$R/evo/final; [ -f $evo/config.json ] || evo=$(ls -d $R/evo/iter_*/unet 2>/dev/null | tail -1)
  [ -n "$evo" ] || evo=$rob
  stamp "B4 v-prediction fine-tune of $evo, $VTUNE_MIN min"
  $SF finetune-v --run-dir $R/vtune --model "$BASE" --teacher-unet "$evo" --offset-noise "$OFFSET" \
    --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 --warmup-steps 50 --ema-decay 0.995 --max-steps 1000000 \
    --max-minutes "$VTUNE_MIN" --checkpoint-every 1000000 "${COMMON[@]}" > $R/vtune.log 2>&1 || stamp "B4 FAILED"
  [ -f $R/vtune/final/config.json ] && cp -r $R/vtune/final $R/student_init
  touch $R/student_init.done
  stamp "B5 ablation: vanilla / CFG-aware / mix, $ABL_STEPS steps each"
  wait_for $R/base_new.ready 600
  local init=$R/student_init; [ -f $init/config.json ] || init=$R/base_new/unet
  for p in 0 1 0.1; do
    $SF distill --run-dir $R/abl_$p --model $R/base_new --student-unet "$init" --student-steps 8 --cfg-prob $p \
      --offset-noise "$OFFSET" --latent-pool "${POOL_SMALL:-8192}" --batch-size 32 --lr 1e-4 --warmup-steps 50 --ema-decay 0.995 \
      --max-steps "$ABL_STEPS" --max-minutes "$ABL_MIN" --checkpoint-every 1000000 "${COMMON[@]}" \
      > $R/abl_$p.log 2>&1 || stamp "ablation $p FAILED"
  done
  for p in 0 1 0.1; do
    [ -f $R/abl_$p/pipeline/model_index.json ] && ev abl_$p $R/abl_$p/pipeline 8 ddim "$ABL_SWEEP"
  done
  if [ "$DRY" != 1 ] && [ $SECONDS -lt 1260 ]; then
    stamp "B6 SD-v1.5 scale: robust step + one action, decoder distillation steps"
    timeout 150 python3 scripts/bench_blocks_sd15_scale.py --out $R/sd15_scale.json > $R/sd15_scale.log 2>&1 || stamp "sd15 scale FAILED/timeout"
    OUT=$R/dec_sd STEPS=6 timeout 150 bash scripts/gpu_decoder_sd.sh > $R/decoder_sd.log 2>&1 || stamp "decoder sd FAILED/timeout"
  fi
  stamp "lane B done"
}

export -f lane_a lane_b stamp wait_for latest ev
export R BASE DEV SIZE EMOJI NIMG BATCH W POOL OFFSET BUDGET SWEEP ABL_SWEEP TRAIN_MIN ROBUST_MIN EVO_MIN VTUNE_MIN \
  DISTILL_MIN ABL_STEPS ABL_MIN EVAL_PROMPTS EVAL_STEPS DRY TABLE SF STAGE EVAL_TIMEOUT POOL_SMALL=${POOL_SMALL:-}
run_lanes
stamp "pack"
summarize_evals
# out/ holds only the UNet shards (at most 8 files come back): their JSON goes into the results tar, which is split
# at 15 MiB; of the sweep grids only guidance 4.5 and 7.5 are kept
(cd $R/out && for d in base_unet student_unet; do [ -d $d ] && mkdir -p ../unet_json/$d && mv $d/*.json ../unet_json/$d/; done)
tar cf $R/results.tar --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='abl_*/samples' \
  --exclude='grid_w1.5.png' --exclude='grid_w3.png' --exclude='grid_w10.5.png' --exclude='results.tar' \
  -C "$STAGE/runs" s3 2>/dev/null
split -b 15m -d $R/results.tar $R/out/results.tar.
ls -la $R/out $R/out/*
stamp "SESSION DONE"
