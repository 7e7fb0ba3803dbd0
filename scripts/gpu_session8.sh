#!/usr/bin/env bash
# Session-8 GPU plan (issue 4: the base becomes a v-prediction model, trained from its fp16 weights, as SnapFusion
# fine-tunes SD-v1.5 to v before step distillation; issue 7 must still hold, so the student is re-distilled from it).
# One 2 x H200 host, one lane per GPU, about 21 minutes in the background (setsid):
#   lane A (GPU 0): finetune-v of the shipped eps base, VMIN minutes, torch.compile'd (eager if compiling fails);
#     the v base at 50 steps, w 7.5, 4 seeds per prompt (1,940 images, paired with session 6's base50_k4) and the
#     sweep 1.5,4.5,10.5; then a second student (VT, DIST_LONG steps).
#   lane B (GPU 1): training throughput of the base UNet, eager vs compiled (finetune-v, 2,048 pooled scenes, while
#     lane A trains on the other GPU); when the v base exists, the student: session 6's v-tuned start (VT) distilled
#     16 -> 8 from the v base at 16 steps with feature KD (FW), DIST_STEPS steps; its evals; the v base's 8-step
#     DDIM and DPM-Solver++ baselines.
# Students: w 7.5 with 4 seeds per prompt and the sweep 1.5,4.5,10.5, with the shipped halved decoder.
# Output in $R/out: results.tar.gz (logs, metrics, JSON) and weights.tar.NN (15 MiB pieces): the v base in fp16 and
# both students as weight-only int8.
#
# Staging (a call copies at most 64 MiB): call 1 carries base/{unet,text_encoder,vae_encoder,model_index.json} and
# the code without the evaluators, and starts the run at once:
#   bash scripts/gpu_session8.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session8.sh run \
#     > /root/stage/s8.log 2>&1 < /dev/null &)
# call 2 carries base/vae_decoder, parts/, the evaluators and gpu_inputs/vt (untracked: .s6/vtune_int8):
#   bash scripts/gpu_session8.sh stash && cp -r gpu_inputs /root/stage/ && \
#     cp -r snapfusion/assets/evaluators /root/stage/repo/snapfusion/assets/ && touch /root/stage/call2.done
# later calls: cat /root/stage/s8.log; after "SESSION DONE" copy /root/stage/runs/s8/out/* to $OUT.
# As run on 2026-11-30: the compiled v fine-tune had not started training after 3.5 minutes (lane B was compiling
# too), so lane A was killed and re-run eagerly for 8 minutes by a copy of this script whose run_lanes line ran lane A
# alone on GPU 0 and then waited for lane B's "lane B done" (VMIN=8 COMPILE= bash gpu_session8a.sh run). Lane B ran
# as written. Afterwards, one more call measured 1 vs 2 GPUs (docs/base_model.md, session 8):
#   finetune-v --batch-size 128 ... on GPU 0, then accelerate launch --multi_gpu --num_processes 2 -m snapfusion.cli
#   finetune-v --batch-size 64 ..., both --latent-pool 2048 --max-steps 150 --log-every 10, eager.
# The compile time counts against --max-minutes: a compiled VMIN-minute run trains for VMIN minus the compile.
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st8 DEVICE=cpu SIZE=64 NIMG=2 K=1 POOL=8 DPOOL=8 VMIN=0.3 \
#   DIST_STEPS=2 DIST_LONG=3 BENCH_STEPS=3 COMPILE= VT=/path/to/vt bash scripts/gpu_session8.sh run (after stash and
#   call 2's copies)
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s8; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; HALF=$STAGE/models/parts/vae_decoder_half; VT=${VT:-$STAGE/gpu_inputs/vt}
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; K=${K:-4}; W=${WORKERS:-8}
POOL=${POOL:-16384}; DPOOL=${DPOOL:-8192}; OFFSET=0.1; VMIN=${VMIN:-10}; DIST_STEPS=${DIST_STEPS:-600}
DIST_LONG=${DIST_LONG:-1000}; FW=${FW:-0.5}; BENCH_STEPS=${BENCH_STEPS:-200}; LANE_S=${LANE_S:-1320}
COMPILE=${COMPILE---compile}  # COMPILE= (empty): eager (CPU dry runs; compiling the base UNet there takes minutes)
VBASE=$R/vbase/final
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --image-size "$SIZE" --sample-every 0)
EVAL_TIMEOUT=300
for part in text_encoder unet vae_encoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

vtune() {  # run dir, minutes, [extra flags]: the base's eps UNet fine-tuned to v (L_ori), from its fp16 weights
  local run=$1 minutes=$2; shift 2
  $SF finetune-v --run-dir "$run" --model "$BASE" --offset-noise $OFFSET --latent-pool "$POOL" --batch-size 64 \
    --lr 5e-5 --warmup-steps 50 --ema-decay 0.998 --max-steps 1000000 --max-minutes "$minutes" \
    --checkpoint-every 500 --num-workers "$W" --log-every 25 "${COMMON[@]}" "$@"
}
distill() {  # run dir, steps: VT 16 -> 8 from the v base at 16 steps, vanilla, feature KD FW
  $SF distill --run-dir $R/$1 --model "$BASE" --teacher-unet "$VBASE" --student-unet "$VT" --student-steps 8 \
    --cfg-prob 0 --feature-weight "$FW" --offset-noise $OFFSET --latent-pool "$DPOOL" --batch-size 32 --lr 1e-4 \
    --warmup-steps 50 --ema-decay 0.995 --max-steps "$2" --max-minutes 8 --checkpoint-every 1000000 \
    --num-workers "$W" --log-every 25 "${COMMON[@]}" > $R/$1.log 2>&1 || stamp "distill $1 FAILED"
  tail -n 1 $R/$1.log
}
student_out() {  # run dir: w 7.5 with K seeds per prompt, then the sweep, with the shipped halved decoder
  [ -f $R/$1/final/config.json ] || { stamp "no $1"; return 1; }
  ev $1_k$K $R/$1/pipeline 8 ddim 7.5 --decoder "$HALF" --seeds-per-prompt $K
  ev $1_sweep $R/$1/pipeline 8 ddim 1.5,4.5,10.5 --decoder "$HALF"
}
inputs() { wait_for $STAGE/call2.done 600 || { stamp "call 2's inputs never came"; return 1; }; }

lane_a() {
  local t0=$SECONDS
  stamp "A1 v fine-tune of the base, $VMIN min ${COMPILE:-eager}"
  vtune $R/vbase "$VMIN" $COMPILE > $R/vbase.log 2>&1 || stamp "v fine-tune (${COMPILE:-eager}) FAILED"
  if [ ! -f $VBASE/config.json ]; then  # compiling failed: go on eagerly for the rest of the minutes
    local left; left=$(python3 -c "print(max(1.0, round($VMIN - ($SECONDS - $t0) / 60, 2)))")
    stamp "A1b eager for $left min"
    if [ -n "$(latest $R/vbase)" ]; then vtune $R/vbase "$left" --resume > $R/vbase_eager.log 2>&1
    else rm -rf $R/vbase; vtune $R/vbase "$left" > $R/vbase_eager.log 2>&1; fi
    tail -n 1 $R/vbase_eager.log
  fi
  tail -n 1 $R/vbase.log
  [ -f $VBASE/config.json ] || { stamp "no v base"; return 1; }
  touch $R/vbase.done
  inputs || return 1
  stamp "A2 the v base at 50 steps"
  ev vbase_50_k$K "$BASE" 50 ddim 7.5 --unet "$VBASE" --seeds-per-prompt $K
  ev vbase_50_sweep "$BASE" 50 ddim 1.5,4.5,10.5 --unet "$VBASE"
  stamp "A3 second student: VT, $DIST_LONG steps"
  distill st_long "$DIST_LONG" && student_out st_long
  stamp "lane A done"
}

lane_b() {
  stamp "B1 training throughput, eager vs compiled"
  local c=compile; [ -n "$COMPILE" ] || c=eager_again  # COMPILE= (dry runs): all three runs are eager
  for spec in "eager64 64" "${c}64 64 $COMPILE" "${c}128 128 $COMPILE"; do
    set -- $spec; local name=$1 batch=$2; shift 2
    $SF finetune-v --run-dir $R/bench_$name --model "$BASE" --offset-noise $OFFSET --latent-pool 2048 \
      --batch-size "$batch" --lr 5e-5 --warmup-steps 50 --max-steps "$BENCH_STEPS" --checkpoint-every 1000000 \
      --num-workers 4 --log-every 10 "${COMMON[@]}" "$@" > $R/bench_$name.log 2>&1 || stamp "bench $name FAILED"
    stamp "bench $name done"
  done
  wait_for $R/vbase.done 1200 || { stamp "no v base"; return 1; }
  inputs || return 1
  stamp "B2 student: VT, $DIST_STEPS steps from the v base with feature KD"
  distill st "$DIST_STEPS" && student_out st
  stamp "B3 the v base's 8-step baselines"
  ev vbase8_ddim "$BASE" 8 ddim 1.5,4.5,7.5,10.5 --unet "$VBASE"
  ev vbase8_dpm "$BASE" 8 dpmpp_2m 1.5,4.5,7.5,10.5 --unet "$VBASE"
  stamp "lane B done"
}

export -f lane_a lane_b stamp wait_for latest ev vtune distill student_out inputs
export R BASE HALF VT VBASE DEV SIZE EMOJI NIMG K W POOL DPOOL OFFSET VMIN DIST_STEPS DIST_LONG FW BENCH_STEPS SF \
  STAGE EVAL_TIMEOUT LANE_GPUS COMPILE
run_lanes
stamp "pack"
summarize_evals
python3 - "$R" <<'PY'
import json, statistics, sys
from pathlib import Path
r = Path(sys.argv[1])
for f in sorted(r.glob("bench_*/metrics.jsonl")):  # images/s after the first 50 steps (warm-up, compile)
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    rates = [x["samples_per_s"] for x in rows if x["step"] > 50]
    print(f.parent.name, "median images/s after step 50:", round(statistics.median(rates), 1) if rates else None)
PY
rm -f $R/eval/*/grid_*.png
tar czf $STAGE/results.tar.gz --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
  --exclude=w -C "$STAGE/runs" s8
mkdir -p $R/w
[ -f $VBASE/config.json ] && python3 -c "import torch; from snapfusion.models.unet import UNet; \
UNet.load('$VBASE').save('$R/w/vbase_fp16', dtype=torch.float16)"
for s in st st_long; do
  [ -f $R/$s/final/config.json ] && python3 -c "from snapfusion.models.unet import UNet; \
UNet.load('$R/$s/final').save('$R/w/${s}_int8', int8=True)"
done
tar cf $STAGE/weights.tar -C $R w && split -b 15m -d $STAGE/weights.tar $R/out/weights.tar.
mv $STAGE/results.tar.gz $R/out/
ls -la $R/out
stamp "SESSION DONE"
