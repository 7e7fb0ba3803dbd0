#!/usr/bin/env bash
# Session-7 GPU plan for issue 7 (the attribute gap: the shipped student is 0.9 points under the base at 50 steps),
# a 2 x 2 design on one 2 x H200 host, one lane per GPU, about 18 minutes in the background (setsid). Every student
# starts from session 6's v-tuned start (VT: the 20 % UNet after 3,086 feature-KD steps and 1,048 v steps; the
# shipped student is VT + 400 vanilla distillation steps, 22.5 % on the same 1,940 images) and is distilled 16 -> 8
# from the base at 16 steps, vanilla (p = 0), 400 steps, as the shipped one:
#   start:        VT  |  VT + KD_MIN minutes more of output + feature KD from the base (finetune-v --kd-unet)
#   distillation: plain  |  + feature KD from the teacher (distill --feature-weight FW)
#   lane B (GPU 1): KD continuation of VT -> plain distillation -> eval; the start's own 50-step eval.
#   lane A (GPU 0): VT -> distillation with feature KD -> eval; then (when lane B's start exists) the same on it.
# Each student: w 7.5 with 4 seeds per prompt (1,940 images, paired with session 6's base-50 run for
# scripts/compare_evals.py) and the sweep 1.5,4.5,10.5 with one seed. Output in $R/out: results.tar.gz (logs,
# JSON) and the UNets (weight-only int8: the KD start and the two students with the best 4-seed attribute
# accuracy), split at 15 MiB.
#
# Staging (a call copies at most 64 MiB): call 1 carries base/{unet,text_encoder,vae_encoder,model_index.json}:
#   bash scripts/gpu_session7.sh stash
# call 2 carries base/vae_decoder, parts/ and gpu_inputs/vt (untracked: .s6/vtune_int8):
#   bash scripts/gpu_session7.sh stash && cp -r gpu_inputs /root/stage/ && (setsid nohup bash \
#     /root/stage/repo/scripts/gpu_session7.sh run > /root/stage/s7.log 2>&1 < /dev/null &)
# later calls: cat /root/stage/s7.log; after "SESSION DONE" copy /root/stage/runs/s7/out/* to $OUT.
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st7 DEVICE=cpu SIZE=64 NIMG=2 K=1 POOL=8 DPOOL=8 KD_MIN=0.2 \
#   DIST_STEPS=2 VT=/path/to/vt bash scripts/gpu_session7.sh stash; ... run
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s7; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; HALF=$STAGE/models/parts/vae_decoder_half; VT=${VT:-$STAGE/gpu_inputs/vt}
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; K=${K:-4}; BATCH=${BATCH:-64}; W=${WORKERS:-8}
POOL=${POOL:-16384}; DPOOL=${DPOOL:-8192}; OFFSET=0.1; KD_MIN=${KD_MIN:-9.5}; DIST_STEPS=${DIST_STEPS:-400}
FW=${FW:-0.5}; LANE_S=${LANE_S:-1080}
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --num-workers "$W" --sample-every 0 --log-every 25)
EVAL_TIMEOUT=300
for part in text_encoder unet vae_encoder vae_decoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
test -f "$VT/config.json" || { stamp "missing the v-tuned start $VT"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

distill() {  # run dir, student init, feature weight: 16 -> 8 from the base at 16 steps, vanilla, as session 6's
  local run=$1 init=$2 fw=$3
  $SF distill --run-dir $R/$run --model "$BASE" --student-unet "$init" --student-steps 8 --cfg-prob 0 \
    --feature-weight "$fw" --offset-noise $OFFSET --latent-pool "$DPOOL" --batch-size 32 --lr 1e-4 \
    --warmup-steps 50 --ema-decay 0.995 --max-steps "$DIST_STEPS" --max-minutes 5 --checkpoint-every 1000000 \
    "${COMMON[@]}" > $R/$run.log 2>&1 || stamp "distill $run FAILED"
  tail -n 1 $R/$run.log
}
student_out() {  # run dir: w 7.5 with K seeds per prompt, then the sweep, with the shipped halved decoder
  [ -f $R/$1/final/config.json ] || { stamp "no $1"; return 1; }
  ev $1_k$K $R/$1/pipeline 8 ddim 7.5 --decoder "$HALF" --seeds-per-prompt $K
  ev $1_sweep $R/$1/pipeline 8 ddim 1.5,4.5,10.5 --decoder "$HALF"
}

lane_a() {
  stamp "A1 VT -> 16 -> 8 with feature KD (weight $FW)"
  distill vt_feat "$VT" "$FW" && student_out vt_feat
  stamp "A2 waiting for lane B's KD start"
  wait_for $R/kd.done 900 || { stamp "no KD start"; return 1; }
  stamp "A3 KD start -> 16 -> 8 with feature KD (weight $FW)"
  distill kd_feat $R/kd/final "$FW" && student_out kd_feat
  stamp "lane A done"
}

lane_b() {
  stamp "B1 VT + $KD_MIN min of output + feature KD from the base (finetune-v --kd-unet)"
  $SF finetune-v --run-dir $R/kd --model "$BASE" --teacher-unet "$VT" --kd-unet "$BASE/unet" \
    --kd-feature-weight 1 --offset-noise $OFFSET --latent-pool "$POOL" --batch-size $BATCH --lr 1e-4 \
    --warmup-steps 50 --ema-decay 0.998 --max-steps 1000000 --max-minutes "$KD_MIN" --checkpoint-every 1000 \
    "${COMMON[@]}" > $R/kd.log 2>&1 || stamp "KD continuation FAILED"
  tail -n 1 $R/kd.log
  [ -f $R/kd/final/config.json ] || { stamp "no KD start"; return 1; }
  touch $R/kd.done
  stamp "B2 KD start -> 16 -> 8, plain"
  distill kd_plain $R/kd/final 0 && student_out kd_plain
  stamp "B3 the KD start at 50 steps (and VT for comparison)"
  ev kd_50 "$BASE" 50 ddim 7.5 --unet $R/kd/final
  ev vt_50 "$BASE" 50 ddim 7.5 --unet "$VT"
  stamp "lane B done"
}

int8() {  # UNet folder, out folder
  [ -f $1/config.json ] && python3 -c "from snapfusion.models.unet import UNet; UNet.load('$1').save('$2', int8=True)"
}

export -f lane_a lane_b stamp wait_for latest ev distill student_out
export R BASE HALF VT DEV SIZE EMOJI NIMG K BATCH W POOL DPOOL OFFSET KD_MIN DIST_STEPS FW SF STAGE EVAL_TIMEOUT \
  LANE_GPUS
run_lanes
stamp "pack"
summarize_evals
BEST=$(python3 - "$R" "$K" <<'PY'
import json, sys
from pathlib import Path
r, k = Path(sys.argv[1]), sys.argv[2]
scores = {}
for f in (r / "eval").glob(f"*_k{k}/eval.json"):
    row = json.loads(f.read_text())["results"][0]
    scores[f.parent.name[: -len(f"_k{k}")]] = row["attributes"]["all"]
print(" ".join(sorted(scores, key=scores.get, reverse=True)[:2]))
PY
)
stamp "returning the UNets of: kd $BEST"
rm -f $R/eval/*/grid_*.png
tar czf $STAGE/results.tar.gz --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  -C "$STAGE/runs" s7
for s in kd $BEST; do int8 $R/$s/final $R/w/${s}_int8; done
[ -d $R/w ] && tar cf $STAGE/weights.tar -C $R w && split -b 15m -d $STAGE/weights.tar $R/out/weights.tar.
mv $STAGE/results.tar.gz $R/out/
ls -la $R/out
stamp "SESSION DONE"
