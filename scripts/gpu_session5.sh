#!/usr/bin/env bash
# Session-5 GPU plan: one H200 shared by two lanes, about 17 minutes in the background (setsid).
#   lane A, issue 6: 2,048 teacher latents -> the halved decoder with 8 GroupNorm groups (the reduced_config default
#     since session 4; the shipped one has 16, one channel per group, and draws frames and halos) distilled from the
#     l1 init at lr 5e-4, then on from it at a lower 1.5e-4 (the 16-group decoder went on at 2e-4) -> PSNR on 64
#     held-out latents and the full base pipeline (485 prompts, 50 DDIM steps, w 7.5) with each halved decoder ->
#     the shipped student's 8-step sweep with the old and the new halved decoder.
#   lane B, issue 5: session 4's 20 % evolved architecture (its evolve.jsonl, replayed on the base UNet's weights
#     with evolve-apply) fine-tuned twice side by side for the same minutes: output-level KD from the base UNet (as
#     session 4, 2 minutes there), and output + feature-level KD (BK-SDM: stage outputs, weight 1) -> both at 50 DDIM
#     steps, w 7.5, 485 prompts.
# Output in $R/out: results.tar split at 15 MiB (logs, JSON, the new decoders in fp32).
#
# Staging (a call copies at most 64 MiB; files carried by one call are deleted when the next starts without them):
#   call 1 carries base/{unet,text_encoder,vae_encoder,model_index.json} and gpu_inputs/evo_0.2/evolve.jsonl
#     (untracked: a copy of docs/img/s4_eval/evolve_0.2.jsonl, as docs/ is not sent): bash scripts/gpu_session5.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session5.sh \
#     run > /root/stage/s5.log 2>&1 < /dev/null &)
#   call 2 carries base/vae_decoder, parts/, snapfusion/: bash scripts/gpu_session5.sh stash
#   later calls: cat /root/stage/s5.log; after "SESSION DONE" copy /root/stage/runs/s5/out/* to $OUT.
#   What session 5 ran after it, in one more call (the feature-KD fine-tune resumed alone, then evaluated):
#     robust-train --run-dir $R/ft_feat --resume <the same options as finetune> --kd-feature-weight 1 \
#       --max-minutes 4.6 --num-workers 8; eval --model $BASE --unet <its last checkpoint>/ema ... (as ev)
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st5 DEVICE=cpu SIZE=64 NIMG=8 BATCH=4 POOL=16 DLAT=8 DCOUNT=4
#   FT_MIN=0.2 DEC1_MIN=0.2 DEC2_MIN=0.1 bash scripts/gpu_session5.sh stash; ... run
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s5; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; HALF=$STAGE/models/parts/vae_decoder_half
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; BATCH=${BATCH:-64}; W=${WORKERS:-4}
POOL=${POOL:-16384}; OFFSET=0.1; DLAT=${DLAT:-2048}; DCOUNT=${DCOUNT:-64}; DBATCH=${DBATCH:-16}
DEC1_MIN=${DEC1_MIN:-6}; DEC2_MIN=${DEC2_MIN:-3}; FT_MIN=${FT_MIN:-10}; LANE_S=${LANE_S:-1140}
EVO_LOG=${EVO_LOG:-$STAGE/repo/gpu_inputs/evo_0.2}
TABLE=snapfusion/assets/latency/base_cpu_torch.json
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --num-workers "$W" --sample-every 0 --log-every 25)
EVAL_TIMEOUT=420  # seconds per eval run (ev, scripts/gpu_stage.sh)
LANE_GPUS="0 0"   # one GPU: both lanes share it (each is bound by kernel launches, not arithmetic)
for part in text_encoder unet vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

lane_a() {
  wait_for "$BASE/vae_decoder/config.json" 400 || { stamp "no decoder staged"; return 1; }
  stamp "A1 $DLAT teacher latents (DPM-Solver++ 12 steps, w ~ U[1, 10.5])"
  $SF decoder-latents --teacher "$BASE" --latent-pool $DLAT --num-emoji $EMOJI --batch-size 128 --device "$DEV" \
    --out $R/lat.safetensors > $R/lat.log 2>&1 || stamp "A1 FAILED"
  local d=(--teacher "$BASE" --latent-pool $DLAT --latent-cache $R/lat.safetensors --num-emoji $EMOJI
           --batch-size $DBATCH --ema-decay 0.99 --mixed-precision no --max-steps 100000 --checkpoint-every 500
           --sample-every 0 --log-every 50 --num-workers 2)
  stamp "A2 halved decoder, 8 groups, from the l1 init at lr 5e-4, $DEC1_MIN min"
  $SF distill-decoder --run-dir $R/dec8 "${d[@]}" --max-minutes "$DEC1_MIN" --lr 5e-4 --warmup-steps 100 \
    > $R/dec8.log 2>&1 || stamp "A2 FAILED"
  tail -n 1 $R/dec8.log
  stamp "A3 on from it at lr 1.5e-4, $DEC2_MIN min"
  $SF distill-decoder --run-dir $R/dec8b "${d[@]}" --max-minutes "$DEC2_MIN" --start-from $R/dec8/final \
    --lr 1.5e-4 --warmup-steps 20 > $R/dec8b.log 2>&1 || stamp "A3 FAILED"
  tail -n 1 $R/dec8b.log
  stamp "A4 decoders: PSNR on $DCOUNT held-out latents, full pipeline with each decoder"
  local students=()
  for s in $R/dec8b/final $R/dec8/final "$HALF"; do [ -f $s/config.json ] && students+=("$s"); done
  timeout 400 $SF eval-decoder "${students[@]}" --teacher "$BASE" --count $DCOUNT --batch-size 32 --num-emoji $EMOJI \
    --pipeline-metrics "$NIMG" --pipeline-steps 50 --pipeline-guidance 7.5 --device "$DEV" \
    --out $R/eval_decoder.json > $R/eval_decoder.log 2>&1 || stamp "A4 FAILED"
  grep -A3 psnr_mean $R/eval_decoder.json | head -20
  stamp "A5 the shipped student's 8-step sweep with the new and the old halved decoder"
  [ -f $R/dec8b/final/config.json ] && ev student_dec8 $STAGE/models/snapfusion 8 ddim 1.5,4.5,7.5 --decoder $R/dec8b/final
  ev student_dec16 $STAGE/models/snapfusion 8 ddim 1.5,4.5,7.5 --decoder "$HALF"
  stamp "lane A done"
}

finetune() {  # name, init UNet folder, extra robust-train args: eps + KD from the base UNet, no skips; 50-step eval
  local name=$1 init=$2; shift 2
  $SF robust-train --run-dir $R/ft_$name --model "$BASE" --init "$init" --p-res 1 --p-attn 1 --kd-unet "$BASE/unet" \
    --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 --warmup-steps 50 --ema-decay 0.998 \
    --max-steps 100000 --max-minutes "$FT_MIN" --checkpoint-every 1000 "${COMMON[@]}" "$@" > $R/ft_$name.log 2>&1 \
    || stamp "fine-tune $name FAILED"
  tail -n 1 $R/ft_$name.log
}

lane_b() {
  stamp "B1 session 4's 20 % evolution replayed on the base UNet"
  $SF evolve-apply --log "$EVO_LOG" --init "$BASE/unet" --out $R/evo20 --table $TABLE || { stamp "B1 FAILED"; return 1; }
  stamp "B2 fine-tunes side by side, $FT_MIN min: output KD | output + feature KD"
  finetune out $R/evo20 &
  finetune feat $R/evo20 --kd-feature-weight 1 &
  wait
  wait_for "$BASE/vae_decoder/config.json" 60 || { stamp "no decoder staged"; return 1; }
  for name in out feat; do
    local ck; ck=$(latest $R/ft_$name)
    [ -n "$ck" ] && ev ft_${name}_50 "$BASE" 50 ddim 7.5 --unet "$ck/ema"
  done
  stamp "lane B done"
}

export -f lane_a lane_b stamp wait_for latest ev finetune
export R BASE HALF DEV SIZE EMOJI NIMG BATCH W POOL OFFSET DLAT DCOUNT DBATCH DEC1_MIN DEC2_MIN FT_MIN EVO_LOG TABLE \
  SF STAGE EVAL_TIMEOUT LANE_GPUS
run_lanes
stamp "pack"
summarize_evals
tar cf $R/results.tar --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  --exclude=evo20 --exclude='results.tar' -C "$STAGE/runs" s5
for w in dec8/final dec8b/final; do
  [ -d $R/$w ] && tar rf $R/results.tar -C "$STAGE/runs" s5/$w
done
split -b 15m -d $R/results.tar $R/out/results.tar.
ls -la $R/out
stamp "SESSION DONE"
