#!/usr/bin/env bash
# Planned GPU run for issue 7 (written and dry-run on the CPU in session 5, not yet run on a GPU): a new SnapFusion
# student from the UNet that session 5 showed reaches the base at 50 steps. One H200, one lane (two UNet jobs
# sharing a GPU run at 2 x 220 images/s against 538 alone, so the stages run one after the other), about 17 minutes:
#   1. session 4's 20 % architecture replayed on the base UNet (evolve-apply) and fine-tuned with eps + output KD +
#      feature KD from the base UNet (session 5's recipe; 3,576 steps gave CLIP 77.51 / FID 0.826 / 26.4 % at 50 steps)
#   2. its 50-step evaluation (w 7.5): the check that the fine-tune reproduced session 5
#   3. v-prediction fine-tune (finetune-v), then step distillation 16 -> 8 from the base (mix loss, p = 0.1) for a
#      bounded number of steps (session 4: long distillation converges to the 16-step teacher's lower CLIP)
#   4. the student's 8-step sweep with the shipped halved decoder; its UNet saved int8 for scripts/assemble_student.py
#   5. with the time left (SECONDS < OPT_BEFORE): the paper's better teacher, a 16-step CFG-aware-distilled v-base
#      (32 -> 16, p = 1), its 16-step sweep, and a student distilled from it, evaluated the same way
# Output in $R/out: results.tar split at 15 MiB (logs, JSON) and the students' int8 UNets (tarred with it).
#
# Staging as scripts/gpu_session5.sh (call 1: base/{unet,text_encoder,vae_encoder} and gpu_inputs/evolve_0.2.jsonl, a
# copy of docs/img/s4_eval/evolve_0.2.jsonl; call 2: base/vae_decoder, parts/): bash scripts/gpu_session6.sh stash &&
#   (setsid nohup bash /root/stage/repo/scripts/gpu_session6.sh run > /root/stage/s6.log 2>&1 < /dev/null &)
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st6 DEVICE=cpu SIZE=64 NIMG=4 BATCH=2 POOL=8 FT_MIN=0.2 VT_MIN=0.1 \
#   DIST_STEPS=2 DIST16_STEPS=2 bash scripts/gpu_session6.sh stash; ... run
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s6; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; HALF=$STAGE/models/parts/vae_decoder_half
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; BATCH=${BATCH:-64}; W=${WORKERS:-8}
POOL=${POOL:-16384}; OFFSET=0.1; FT_MIN=${FT_MIN:-7}; VT_MIN=${VT_MIN:-2}; DIST_STEPS=${DIST_STEPS:-400}
DIST16_STEPS=${DIST16_STEPS:-300}; OPT_BEFORE=${OPT_BEFORE:-900}; SWEEP=1.5,4.5,7.5
EVO_LOG=${EVO_LOG:-$STAGE/repo/gpu_inputs/evolve_0.2.jsonl}
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --num-workers "$W" --sample-every 0 --log-every 25)
EVAL_TIMEOUT=300
for part in text_encoder unet vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

distill() {  # run dir, student init, student steps, cfg prob, max steps, [teacher UNet]: the loop's distill stage
  local run=$1 init=$2 n=$3 p=$4 steps=$5 teacher=${6:-}
  $SF distill --run-dir $R/$run --model "$BASE" ${teacher:+--teacher-unet "$teacher"} --student-unet "$init" \
    --student-steps $n --cfg-prob $p --offset-noise $OFFSET --latent-pool "$POOL" --batch-size 32 --lr 1e-4 \
    --warmup-steps 50 --ema-decay 0.995 --max-steps "$steps" --max-minutes 6 --checkpoint-every 1000000 \
    "${COMMON[@]}" > $R/$run.log 2>&1 || stamp "distill $run FAILED"
  tail -n 1 $R/$run.log
}
student_out() {  # run dir: its 8-step sweep with the shipped halved decoder, and its UNet as int8
  [ -f $R/$1/final/config.json ] || return 1
  ev $1_8 $R/$1/pipeline 8 ddim $SWEEP --decoder "$HALF"
  python3 -c "from snapfusion.models.unet import UNet; UNet.load('$R/$1/final').save('$R/$1_int8', int8=True)"
}

stamp "1 evolved 20 % UNet on the base weights, fine-tuned with output + feature KD, $FT_MIN min"
$SF evolve-apply --log "$EVO_LOG" --init "$BASE/unet" --out $R/evo20 || { stamp "evolve-apply FAILED"; exit 1; }
$SF robust-train --run-dir $R/ft --model "$BASE" --init $R/evo20 --p-res 1 --p-attn 1 --kd-unet "$BASE/unet" \
  --kd-feature-weight 1 --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 --warmup-steps 50 \
  --ema-decay 0.998 --max-steps 100000 --max-minutes "$FT_MIN" --checkpoint-every 1000 "${COMMON[@]}" \
  > $R/ft.log 2>&1 || stamp "fine-tune FAILED"
tail -n 1 $R/ft.log
FT=$(latest $R/ft); [ -n "$FT" ] || { stamp "no fine-tune checkpoint"; exit 1; }
FT=$FT/ema
wait_for "$BASE/vae_decoder/config.json" 60 || stamp "no decoder staged: evaluations will fail"
stamp "2 its 50-step evaluation"
ev ft_50 "$BASE" 50 ddim 7.5 --unet "$FT"
stamp "3 v fine-tune, then 16 -> 8 distillation from the base, at most $DIST_STEPS steps"
$SF finetune-v --run-dir $R/vtune --model "$BASE" --teacher-unet "$FT" --offset-noise $OFFSET --latent-pool "$POOL" \
  --batch-size $BATCH --lr 1e-4 --warmup-steps 50 --ema-decay 0.995 --max-steps 1000000 --max-minutes "$VT_MIN" \
  --checkpoint-every 1000000 "${COMMON[@]}" > $R/vtune.log 2>&1 || stamp "v fine-tune FAILED"
tail -n 1 $R/vtune.log
[ -f $R/vtune/final/config.json ] && distill student $R/vtune/final 8 0.1 "$DIST_STEPS"
stamp "4 the student's 8-step sweep"
student_out student || stamp "no student"
if [ $SECONDS -lt "$OPT_BEFORE" ]; then
  stamp "5 CFG-aware-distilled 16-step teacher (v fine-tuned base, 32 -> 16, p = 1) and a student from it"
  $SF finetune-v --run-dir $R/vbase --model "$BASE" --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH \
    --lr 5e-5 --warmup-steps 50 --ema-decay 0.995 --max-steps 1000000 --max-minutes "$VT_MIN" \
    --checkpoint-every 1000000 "${COMMON[@]}" > $R/vbase.log 2>&1 || stamp "v fine-tune of the base FAILED"
  if [ -f $R/vbase/final/config.json ]; then
    distill teacher16 $R/vbase/final 16 1 "$DIST16_STEPS" $R/vbase/final
    [ -f $R/teacher16/final/config.json ] && ev teacher16_16 $R/teacher16/pipeline 16 ddim $SWEEP
    [ -f $R/teacher16/final/config.json ] && [ -f $R/vtune/final/config.json ] && \
      distill student_t16 $R/vtune/final 8 0.1 "$DIST_STEPS" $R/teacher16/final && student_out student_t16
  fi
else
  stamp "5 skipped: $SECONDS s gone"
fi
stamp "pack"
summarize_evals
tar cf $R/results.tar --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  --exclude=evo20 --exclude='results.tar' -C "$STAGE/runs" s6
for w in student_int8 student_t16_int8; do [ -d $R/$w ] && tar rf $R/results.tar -C "$STAGE/runs" s6/$w; done
split -b 15m -d $R/results.tar $R/out/results.tar.
ls -la $R/out
stamp "SESSION DONE"
