#!/usr/bin/env bash
# Session-6 GPU plan for issue 7: a new SnapFusion student from the UNet that session 5 showed reaches the base at
# 50 steps, on one 2 x H200 host (one lane per GPU), about 19 minutes in the background (setsid).
#   lane A (GPU 0): session 4's 20 % architecture replayed on the base UNet (evolve-apply) and fine-tuned with eps +
#     output KD + feature KD from the base UNet (session 5's recipe: 3,576 steps gave CLIP 77.51 / FID 0.826 / 26.4 %
#     at 50 steps) -> v-prediction fine-tune (finetune-v) -> 16 -> 8 distillation from the base at 16 steps, mix loss
#     p = 0.1, DIST_STEPS steps (session 4: long distillation converges to the 16-step teacher) -> its 8-step sweep
#     with the shipped halved decoder -> the vanilla arm (p = 0) of the loss ablation, same start, steps and teacher.
#   lane B (GPU 1): the paper's better teacher, a 16-step CFG-aware-distilled base: the base v fine-tuned, then
#     32 -> 16 with p = T16_P -> its 16-step sweep -> the fine-tune's 50-step check (when lane A has it) -> a student
#     from the 16-step teacher (lane A's v-tuned start, p = 0.1) -> its sweep -> the CFG-aware arm (p = 1) of the
#     ablation, from the base at 16 steps as the vanilla and mix arms.
# The optional arms run only if their lane has time left (SECONDS < ARM_BEFORE). Output in $R/out: results.tar split
# at 15 MiB (logs, JSON, the two students' UNets and the v-tuned start as weight-only int8).
#
# Staging as scripts/gpu_session5.sh (a call copies at most 64 MiB): call 1 carries base/{unet,text_encoder,
# vae_encoder,model_index.json} and gpu_inputs/evolve_0.2.jsonl (untracked, a copy of
# docs/img/s4_eval/evolve_0.2.jsonl):
#   bash scripts/gpu_session6.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session6.sh run \
#     > /root/stage/s6.log 2>&1 < /dev/null &)
# call 2 carries base/vae_decoder and parts/: bash scripts/gpu_session6.sh stash
# later calls: cat /root/stage/s6.log; after "SESSION DONE" copy /root/stage/runs/s6/out/* to $OUT.
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st6 DEVICE=cpu SIZE=64 NIMG=4 BATCH=2 POOL=8 DPOOL=8 FT_MIN=0.2 \
#   VT_MIN=0.1 DIST_STEPS=2 DIST16_STEPS=2 bash scripts/gpu_session6.sh stash; ... run
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s6; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; HALF=$STAGE/models/parts/vae_decoder_half
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; BATCH=${BATCH:-64}; W=${WORKERS:-8}
POOL=${POOL:-16384}; OFFSET=0.1; FT_MIN=${FT_MIN:-7.5}; VT_MIN=${VT_MIN:-2}; DIST_STEPS=${DIST_STEPS:-400}
DIST16_STEPS=${DIST16_STEPS:-400}; DPOOL=${DPOOL:-8192}; T16_P=${T16_P:-0.5}; ARM_BEFORE=${ARM_BEFORE:-900}
LANE_S=${LANE_S:-1140}
SWEEP=1.5,4.5,7.5,10.5; ARM_SWEEP=1.5,4.5,7.5
EVO_LOG=${EVO_LOG:-$STAGE/repo/gpu_inputs/evolve_0.2.jsonl}
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --num-workers "$W" --sample-every 0 --log-every 25)
EVAL_TIMEOUT=300
LANE_GPUS=${LANE_GPUS:-0 1}
for part in text_encoder unet vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

distill() {  # run dir, student init, student steps, cfg prob, max steps, [teacher UNet]: the loop's distill stage
  local run=$1 init=$2 n=$3 p=$4 steps=$5 teacher=${6:-}
  $SF distill --run-dir $R/$run --model "$BASE" ${teacher:+--teacher-unet "$teacher"} --student-unet "$init" \
    --student-steps $n --cfg-prob $p --offset-noise $OFFSET --latent-pool "$DPOOL" --batch-size 32 --lr 1e-4 \
    --warmup-steps 50 --ema-decay 0.995 --max-steps "$steps" --max-minutes 5 --checkpoint-every 1000000 \
    "${COMMON[@]}" > $R/$run.log 2>&1 || stamp "distill $run FAILED"
  tail -n 1 $R/$run.log
}
student_out() {  # run dir, sweep: its 8-step sweep with the shipped halved decoder
  [ -f $R/$1/final/config.json ] || { stamp "no $1"; return 1; }
  ev $1_8 $R/$1/pipeline 8 ddim $2 --decoder "$HALF"
}
arm() {  # run dir, cfg prob, label: an ablation arm from the v-tuned start (the base at 16 steps teaches), and its
  # sweep, if the lane has time left
  if [ $SECONDS -lt "$ARM_BEFORE" ]; then
    stamp "$3"
    distill $1 $R/vtune/final 8 $2 "$DIST_STEPS" && student_out $1 $ARM_SWEEP
  else
    stamp "$3: skipped, $SECONDS s gone"
  fi
}
int8() {  # UNet folder, out folder
  [ -f $1/config.json ] && python3 -c "from snapfusion.models.unet import UNet; UNet.load('$1').save('$2', int8=True)"
}

lane_a() {
  stamp "A1 evolved 20 % UNet on the base weights, fine-tuned with output + feature KD, $FT_MIN min"
  $SF evolve-apply --log "$EVO_LOG" --init "$BASE/unet" --out $R/evo20 || { stamp "evolve-apply FAILED"; return 1; }
  $SF robust-train --run-dir $R/ft --model "$BASE" --init $R/evo20 --p-res 1 --p-attn 1 --kd-unet "$BASE/unet" \
    --kd-feature-weight 1 --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 \
    --warmup-steps 50 --ema-decay 0.998 --max-steps 100000 --max-minutes "$FT_MIN" --checkpoint-every 1000 \
    "${COMMON[@]}" > $R/ft.log 2>&1 || stamp "fine-tune FAILED"
  tail -n 1 $R/ft.log
  local ft; ft=$(latest $R/ft); [ -n "$ft" ] || { stamp "no fine-tune checkpoint"; return 1; }
  echo "$ft/ema" > $R/ft.done
  stamp "A2 v fine-tune of it, $VT_MIN min"
  $SF finetune-v --run-dir $R/vtune --model "$BASE" --teacher-unet "$ft/ema" --offset-noise $OFFSET \
    --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 --warmup-steps 50 --ema-decay 0.995 --max-steps 1000000 \
    --max-minutes "$VT_MIN" --checkpoint-every 1000000 "${COMMON[@]}" > $R/vtune.log 2>&1 || stamp "v fine-tune FAILED"
  tail -n 1 $R/vtune.log
  [ -f $R/vtune/final/config.json ] || { stamp "no v-tuned start"; return 1; }
  stamp "A3 16 -> 8 from the base at 16 steps, mix p = 0.1, $DIST_STEPS steps"
  distill student $R/vtune/final 8 0.1 "$DIST_STEPS"
  wait_for "$BASE/vae_decoder/config.json" 60 || stamp "no decoder staged: evaluations will fail"
  student_out student $SWEEP
  arm arm_vanilla 0 "A4 ablation: vanilla only (p = 0)"
  stamp "lane A done"
}

lane_b() {
  stamp "B1 v fine-tune of the base, $VT_MIN min"
  $SF finetune-v --run-dir $R/vbase --model "$BASE" --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH \
    --lr 5e-5 --warmup-steps 50 --ema-decay 0.995 --max-steps 1000000 --max-minutes "$VT_MIN" \
    --checkpoint-every 1000000 "${COMMON[@]}" > $R/vbase.log 2>&1 || stamp "v fine-tune of the base FAILED"
  tail -n 1 $R/vbase.log
  if [ -f $R/vbase/final/config.json ]; then
    stamp "B2 CFG-aware-distilled 16-step teacher: 32 -> 16 from the v base, p = $T16_P, $DIST16_STEPS steps"
    distill teacher16 $R/vbase/final 16 "$T16_P" "$DIST16_STEPS" $R/vbase/final
    wait_for "$BASE/vae_decoder/config.json" 60 || stamp "no decoder staged: evaluations will fail"
    [ -f $R/teacher16/final/config.json ] && ev teacher16_16 $R/teacher16/pipeline 16 ddim $SWEEP
  fi
  stamp "B3 the fine-tune's 50-step check (waiting for lane A)"
  wait_for $R/ft.done 900 && ev ft_50 "$BASE" 50 ddim 7.5 --unet "$(cat $R/ft.done)"
  wait_for $R/vtune/final/config.json 300 || { stamp "no v-tuned start from lane A"; return 1; }
  sleep 5
  if [ -f $R/teacher16/final/config.json ]; then
    stamp "B4 student from the 16-step CFG-aware teacher, mix p = 0.1, $DIST_STEPS steps"
    distill student_t16 $R/vtune/final 8 0.1 "$DIST_STEPS" $R/teacher16/final && student_out student_t16 $SWEEP
  fi
  arm arm_cfg 1 "B5 ablation: CFG-aware only (p = 1), from the base at 16 steps"
  stamp "lane B done"
}

export -f lane_a lane_b stamp wait_for latest ev distill student_out arm
export R BASE HALF DEV SIZE EMOJI NIMG BATCH W POOL DPOOL OFFSET FT_MIN VT_MIN DIST_STEPS DIST16_STEPS T16_P \
  ARM_BEFORE \
  SWEEP ARM_SWEEP EVO_LOG SF STAGE EVAL_TIMEOUT LANE_GPUS
run_lanes
stamp "pack"
summarize_evals
for s in student student_t16 vtune; do int8 $R/$s/final $R/${s}_int8; done
tar cf $R/results.tar --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  --exclude=evo20 --exclude='results.tar' -C "$STAGE/runs" s6
for w in student_int8 student_t16_int8 vtune_int8; do [ -d $R/$w ] && tar rf $R/results.tar -C "$STAGE/runs" s6/$w; done
split -b 15m -d $R/results.tar $R/out/results.tar.
ls -la $R/out
stamp "SESSION DONE"
