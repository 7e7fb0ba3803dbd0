#!/usr/bin/env bash
# Session-4 GPU plan: one host with two GPUs, about 23 minutes in the background (setsid), two lanes.
#   lane A (GPU 0), issue 5: GPU latency tables of base (eager and CUDA graphs) and of the sd15 / snapfusion presets
#     (CUDA graphs) -> robust training of the shipped base -> evolution to 20 % of the CPU latency and to the BK-SDM
#     rule's 62.1 % -> fine-tune both (eps + output KD from the base UNet, no skips) -> 50-step evaluation of both
#     -> SD-v1.5-scale robust steps and one evolution action.
#   lane B (GPU 1), issues 6 and 7: 2,048 teacher latents -> the halved decoder trained on from the shipped one and
#     the TAESD-style baseline from scratch, side by side for the same minutes -> PSNR on 64 held-out latents and
#     the full base pipeline (485 prompts, 50 DDIM steps, w 7.5) with each decoder -> BK-SDM rule on the robust
#     UNet, fine-tuned as lane A's and evaluated at 50 steps -> the shipped student distilled on at a 5x lower
#     learning rate (does longer distillation still degrade?) and its 8-step sweep -> SD-v1.5-scale decoder
#     distillation steps.
# Output in $R/out: results.tar split at 15 MiB (logs, JSON, PNG, the new decoders, the continued student int8).
#
# Staging (a call copies at most 64 MiB; files carried by one call are deleted when the next starts without them):
#   call 1 carries base/{unet,text_encoder,vae_encoder,model_index.json}:
#     bash scripts/gpu_session4.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session4.sh run \
#       > /root/stage/s4.log 2>&1 < /dev/null &)
#   call 2 carries base/vae_decoder, parts/, snapfusion/: bash scripts/gpu_session4.sh stash
#   later calls: cat /root/stage/s4.log; after "SESSION DONE" copy /root/stage/runs/s4/out/* to $OUT.
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st4 DEVICE=cpu SIZE=64 NIMG=8 BATCH=4 POOL=16 ROBUST_MIN=0.1 ... \
#   bash scripts/gpu_session4.sh stash; ... run   (every *_MIN, DLAT, DCOUNT, EVAL_* and EVO_TRAIN can be set)
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s4; mkdir -p "$R/out" "$R/eval" "$R/tables"
BASE=$STAGE/models/base
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; BATCH=${BATCH:-64}; W=${WORKERS:-12}
POOL=${POOL:-16384}; OFFSET=0.1
ROBUST_MIN=${ROBUST_MIN:-2}; EVO_MIN=${EVO_MIN:-3}; EVO62_MIN=${EVO62_MIN:-1.5}; FT_MIN=${FT_MIN:-2}
DEC_MIN=${DEC_MIN:-4.5}; DLAT=${DLAT:-2048}; DCOUNT=${DCOUNT:-64}; CONT_MIN=${CONT_MIN:-3}; LANE_S=${LANE_S:-1320}
EVAL_PROMPTS=${EVAL_PROMPTS:-16}; EVAL_STEPS=${EVAL_STEPS:-10}; EVO_TRAIN=${EVO_TRAIN:-60}
TABLE=snapfusion/assets/latency/base_cpu_torch.json
BK_BUDGET=0.621  # the BK-SDM rule's share of the base UNet's latency in $TABLE (996.9 / 1,604.9 ms)
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --num-workers "$W" --sample-every 0 --log-every 25)
EVAL_TIMEOUT=420  # seconds per eval run (ev, scripts/gpu_stage.sh)
finetune() {  # name, init UNet folder: eps loss + output KD from the base UNet, no skips; then 50-step eval
  local name=$1 init=$2
  stamp "fine-tune $name from $init, $FT_MIN min"
  $SF robust-train --run-dir $R/ft_$name --model "$BASE" --init "$init" --p-res 1 --p-attn 1 --kd-unet "$BASE/unet" \
    --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 --warmup-steps 50 --ema-decay 0 \
    --max-steps 100000 --max-minutes "$FT_MIN" --checkpoint-every 100000 "${COMMON[@]}" > $R/ft_$name.log 2>&1 \
    || stamp "fine-tune $name FAILED"
  local ck; ck=$(latest $R/ft_$name)
  [ -n "$ck" ] || { stamp "no checkpoint for $name"; return 1; }
  python3 -c "from snapfusion.models.unet import UNet, num_parameters as n; u = UNet.load('$ck/model'); \
print('$name', n(u), 'parameters')"
  ev ${name}_50 "$BASE" 50 ddim 7.5 --unet "$ck/model"
}
for part in text_encoder unet vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

lane_a() {
  if [ "$DEV" = cuda ]; then
    stamp "A0 GPU latency tables"
    local t=(--device cuda --dtype fp16 --repeats 20)
    timeout 150 $SF bench-blocks --model "$BASE" "${t[@]}" --out $R/tables/base_cuda_torch_fp16.json
    timeout 150 $SF bench-blocks --model "$BASE" "${t[@]}" --cuda-graphs --out $R/tables/base_cuda_graphs_fp16.json
    for p in sd15 snapfusion; do
      timeout 150 $SF bench-blocks --preset $p "${t[@]}" --cuda-graphs --out $R/tables/${p}_cuda_graphs_fp16.json
    done
  fi
  stamp "A1 robust training of the shipped base (p = 0.9 per sample, offset noise), $ROBUST_MIN min"
  $SF robust-train --run-dir $R/robust --model "$BASE" --offset-noise $OFFSET --latent-pool "$POOL" \
    --batch-size $BATCH --lr 5e-5 --warmup-steps 50 --ema-decay 0 --max-steps 100000 --max-minutes "$ROBUST_MIN" \
    --checkpoint-every 100000 "${COMMON[@]}" > $R/robust.log 2>&1 || stamp "A1 FAILED"
  local rob; rob=$(latest $R/robust); rob=${rob:+$rob/model}; [ -n "$rob" ] || rob=$BASE/unet
  echo "$rob" > $R/robust.path
  wait_for "$BASE/vae_decoder/config.json" 300 || { stamp "no decoder staged"; return 1; }
  for b in 0.2 $BK_BUDGET; do
    local m=$EVO_MIN; [ $b = 0.2 ] || m=$EVO62_MIN  # the timeout below rounds m down; its 200 s cover the rest
    stamp "A2 evolution to $b of the CPU latency, $m min"
    timeout $(( ${m%.*} * 60 + 200 )) $SF evolve --run-dir $R/evo_$b --table $TABLE --budget $b --model "$BASE" \
      --init "$rob" --device "$DEV" --iterations 12 --actions-per-step 4 --num-prompts "$EVAL_PROMPTS" \
      --eval-steps "$EVAL_STEPS" --eval-batch 16 --train-steps "$EVO_TRAIN" --batch-size 32 --num-workers "$W" \
      --num-emoji $EMOJI --image-size "$SIZE" --offset-noise $OFFSET --max-minutes "$m" > $R/evo_$b.log 2>&1 \
      || stamp "evolution $b FAILED"
    tail -n 2 $R/evo_$b.log
  done
  for b in 0.2 $BK_BUDGET; do
    local evo=$R/evo_$b/final; [ -f $evo/config.json ] || evo=$(ls -d $R/evo_$b/iter_*/unet 2>/dev/null | tail -1)
    [ -n "$evo" ] && finetune evo_$b "$evo"
  done
  if [ "$DEV" = cuda ]; then
    stamp "A5 SD-v1.5 scale: robust steps + one evolution action"
    timeout 240 python3 scripts/bench_blocks_sd15_scale.py --out $R/sd15_scale.json > $R/sd15_scale.log 2>&1 \
      || stamp "sd15 scale FAILED/timeout"
  fi
  stamp "lane A done"
}

lane_b() {
  wait_for "$BASE/vae_decoder/config.json" 300 || { stamp "no decoder staged"; return 1; }
  stamp "B1 $DLAT teacher latents (DPM-Solver++ 12 steps, w ~ U[1, 10.5])"
  $SF decoder-latents --teacher "$BASE" --latent-pool $DLAT --num-emoji $EMOJI --batch-size 128 --device "$DEV" \
    --out $R/lat.safetensors > $R/lat.log 2>&1 || stamp "B1 FAILED"
  stamp "B2 halved decoder (on from the shipped one) and TAESD-style baseline (from scratch), $DEC_MIN min side by side"
  local d=(--teacher "$BASE" --latent-pool $DLAT --latent-cache $R/lat.safetensors --num-emoji $EMOJI --batch-size 16
           --ema-decay 0.99 --mixed-precision no --max-steps 100000 --max-minutes "$DEC_MIN" --checkpoint-every 100000
           --sample-every 0 --log-every 50 --num-workers 2)
  $SF distill-decoder --run-dir $R/dec_half "${d[@]}" --start-from "$STAGE/models/parts/vae_decoder_half" \
    --lr 2e-4 --warmup-steps 50 > $R/dec_half.log 2>&1 &
  $SF distill-decoder --run-dir $R/dec_tiny "${d[@]}" --student tiny --lr 5e-4 --warmup-steps 100 \
    > $R/dec_tiny.log 2>&1 &
  wait
  tail -n 1 $R/dec_half.log $R/dec_tiny.log
  stamp "B3 decoders: PSNR on $DCOUNT held-out latents, full pipeline with each decoder"
  local students=()
  for s in $R/dec_half/final $R/dec_tiny/final "$STAGE/models/parts/vae_decoder_half"; do
    [ -f $s/config.json ] && students+=("$s")
  done
  timeout 400 $SF eval-decoder "${students[@]}" --teacher "$BASE" --count $DCOUNT --batch-size 32 --num-emoji $EMOJI \
    --pipeline-metrics "$NIMG" --pipeline-steps 50 --pipeline-guidance 7.5 --device "$DEV" \
    --out $R/eval_decoder.json > $R/eval_decoder.log 2>&1 || stamp "B3 FAILED"
  stamp "B4 BK-SDM rule on the robust UNet"
  wait_for $R/robust.path 600
  $SF bk-sdm --init "$(cat $R/robust.path)" --out $R/bk/unet --table $TABLE > $R/bk.log 2>&1 && cat $R/bk.log
  [ -f $R/bk/unet/config.json ] && finetune bk $R/bk/unet
  stamp "B5 the shipped student distilled on at lr 2e-5 (5x lower), $CONT_MIN min"
  $SF distill --run-dir $R/cont --model "$BASE" --student-unet "$STAGE/models/snapfusion/unet" --student-steps 8 \
    --cfg-prob 0.1 --offset-noise $OFFSET --latent-pool 8192 --batch-size 32 --lr 2e-5 --warmup-steps 20 \
    --ema-decay 0.995 --max-steps 1000000 --max-minutes "$CONT_MIN" --checkpoint-every 1000000 "${COMMON[@]}" \
    > $R/cont.log 2>&1 || stamp "B5 FAILED"
  tail -n 2 $R/cont.log
  if [ -f $R/cont/final/config.json ]; then
    ev student_cont $STAGE/models/snapfusion 8 ddim 1.5,4.5,7.5 --unet $R/cont/final --decoder "$BASE/vae_decoder"
    python3 -c "from snapfusion.models.unet import UNet; UNet.load('$R/cont/final').save('$R/student_cont_int8', int8=True)"
  fi
  if [ "$DEV" = cuda ]; then
    stamp "B6 SD-v1.5 scale decoder: reduce, latency, distillation steps"
    (cd $R && mkdir -p dec_sd && cd dec_sd && cp -r $STAGE/repo/scripts . && ln -sf $STAGE/repo/snapfusion .)
    (cd $R/dec_sd && OUT=$R/dec_sd/out STEPS=6 BATCH=2 timeout 330 bash scripts/gpu_decoder_sd.sh > $R/decoder_sd.log 2>&1) \
      || stamp "decoder sd FAILED/timeout"
  fi
  stamp "lane B done"
}

export -f lane_a lane_b stamp wait_for latest ev finetune
export R BASE DEV SIZE EMOJI NIMG BATCH W POOL OFFSET ROBUST_MIN EVO_MIN EVO62_MIN FT_MIN DEC_MIN DLAT DCOUNT \
  CONT_MIN EVAL_PROMPTS EVAL_STEPS EVO_TRAIN TABLE BK_BUDGET SF STAGE EVAL_TIMEOUT
run_lanes
stamp "pack"
summarize_evals
# no weights but the new decoders and the continued student (int8): a run's checkpoints and fp32 UNets stay there
tar cf $R/results.tar --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  --exclude='iter_*' --exclude=train_init --exclude='grid_w1.5.png' --exclude='results.tar' -C "$STAGE/runs" s4
for w in dec_half/final dec_tiny/final student_cont_int8; do
  [ -d $R/$w ] && tar rf $R/results.tar -C "$STAGE/runs" s4/$w
done
split -b 15m -d $R/results.tar $R/out/results.tar.
ls -la $R/out
stamp "SESSION DONE"
