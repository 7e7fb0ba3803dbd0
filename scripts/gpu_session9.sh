#!/usr/bin/env bash
# Session-9 GPU plan (issue 4: can the eps base reach far more images per GPU-minute?). SD-v1.5 itself was trained at
# 256² before 512²; at 256² the UNet sees 32×32 latents, a quarter of the pixels, so a GPU-minute trains several times
# more images. One 2 x H200 host, one lane per GPU, in the background (setsid):
#   lane A (GPU 0), "scratch": a new eps UNet of the base's design from random weights on the shipped text tower and
#     autoencoder: A_MIN minutes at 256² (batch 384, lr 3e-4), then A2_MIN minutes at 512² (batch 128, lr 1e-4);
#     its evaluation at 50 DDIM steps, w 7.5, 4 seeds per prompt (1,940 images, paired with session 6's base50_k4),
#     and on the seen-composition prompts (train200).
#   lane B (GPU 1), "continued": the shipped base continued B_MIN minutes at 256², then B2_MIN at 512² (46 + B_MIN +
#     B2_MIN GPU-minutes in all); its evaluation as lane A's; the shipped base on train200; the autoencoder's ceiling
#     (scripts/ae_ceiling.py); the sweep 1.5,4.5,10.5 of both new models.
# Output: $R/out/results.tar.gz (logs, metrics, JSON) and $STAGE/{scratch,cont}.tar.NN (15 MiB pieces of each UNet in
# fp16; one call can return the results and one model's pieces, a second call the other model's).
#
# Staging (a call copies at most 64 MiB): call 1 carries the code, the evaluators and base/{text_encoder,vae_encoder,
# vae_decoder,model_index.json} (not base/unet, parts/ or the student) and starts the run at once:
#   bash scripts/gpu_session9.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session9.sh run \
#     > /root/stage/s9.log 2>&1 < /dev/null &)
# call 2 carries base/unet (and the code, without the evaluators):
#   bash scripts/gpu_session9.sh stash && touch /root/stage/call2.done
# later calls: cat /root/stage/s9.log; after "SESSION DONE" copy /root/stage/runs/s9/out/* and /root/stage/cont.tar.*
# to $OUT (then, in another call, /root/stage/scratch.tar.*).
# Known limit: `timeout` puts its command in a new process group, so an evaluation still running when a lane's
# LANE_S runs out is not killed with the lane and may write while the results are packed.
# As run on 2026-11-30 (2 x H200, 28.8 of the session's 30 device-minutes held in all): both lanes as written,
# except that the three train200 evaluations failed (the script passed --num-images 485 to a set of 103 prompts;
# fixed since: TRAIN200). Three short calls on the same warm machine followed, with /root/stage/repo as the working
# directory:
#   1. both train200 runs again, and the continued model's 8-step baselines (eval --unet runs/s9/cont/final --steps 8
#      --sampler ddim|dpmpp_2m --guidance-sweep 1.5,4.5,7.5,10.5), one GPU each;
#   2. the two 256² stages' EMA weights evaluated at 256² (--size 256) and the continued one at 512², one seed;
#   3. the scratch run's 512² stage resumed for 1.2 more minutes (train-unet --resume, same flags; 143 steps after
#      its latent pool was built again) and evaluated at 512², one seed.
# Fetched: results.tar.gz, both UNets in fp16 (cont.tar.NN and scratch.tar.NN, one call each) and those calls' JSON.
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st9 DEVICE=cpu LOW=64 SIZE=128 NIMG=2 K=1 POOL=8 POOL2=8 A_MIN=0.2
#   A2_MIN=0.2 B_MIN=0.2 B2_MIN=0.2 BATCH=4 BATCH2=2 W=1 TRAIN200=2 bash scripts/gpu_session9.sh run
#   (after stash + touch)
. "$(dirname "$0")/gpu_stage.sh" "$@"  # stash (and exit) or move into the staged copy; helpers
R=$STAGE/runs/s9; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; LOW=${LOW:-256}; EMOJI=40; NIMG=${NIMG:-485}; K=${K:-4}; W=${W:-8}
POOL=${POOL:-131072}; POOL2=${POOL2:-16384}; BATCH=${BATCH:-384}; BATCH2=${BATCH2:-128}
TRAIN200=${TRAIN200:-103}  # the train200 prompts with the 40 emoji
A_MIN=${A_MIN:-14}; A2_MIN=${A2_MIN:-3.5}; B_MIN=${B_MIN:-9}; B2_MIN=${B2_MIN:-4}; LANE_S=${LANE_S:-1290}
SF="python3 -m snapfusion.cli"
COMMON=(--num-emoji $EMOJI --sample-every 0 --offset-noise 0.1 --max-steps 1000000 --num-workers "$W" --log-every 25)
EVAL_TIMEOUT=${EVAL_TIMEOUT:-300}
for part in text_encoder vae_encoder vae_decoder; do
  test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

low() {  # run dir, minutes, lr, [extra flags]: 256² stage
  local run=$1 minutes=$2 lr=$3; shift 3
  $SF train-unet --run-dir "$run" --image-size "$LOW" --latent-pool "$POOL" --batch-size "$BATCH" --lr "$lr" \
    --ema-decay 0.999 --max-minutes "$minutes" --checkpoint-every 2000 "${COMMON[@]}" "$@"
}
high() {  # run dir, init UNet, minutes: 512² stage from the 256² stage's EMA
  $SF train-unet --run-dir "$1" --vae "$BASE/vae_encoder" --text-encoder "$BASE/text_encoder" --init-unet "$2" \
    --image-size "$SIZE" --latent-pool "$POOL2" --batch-size "$BATCH2" --lr 1e-4 --warmup-steps 100 \
    --ema-decay 0.998 --max-minutes "$3" --checkpoint-every 1000000 "${COMMON[@]}"
}
evals() {  # name, UNet folder: w 7.5 with K seeds per prompt (paired with session 6's base50_k4), then train200
  ev $1_50_k$K "$BASE" 50 ddim 7.5 --unet "$2" --seeds-per-prompt $K
  NIMG=$TRAIN200 ev $1_train200 "$BASE" 50 ddim 7.5 --unet "$2" --prompts train200 --seeds-per-prompt 2
}

lane_a() {
  stamp "A1 scratch at ${LOW}², $A_MIN min"
  low $R/scratch_low "$A_MIN" 3e-4 --warmup-steps 300 --vae "$BASE/vae_encoder" \
    --text-encoder "$BASE/text_encoder" > $R/scratch_low.log 2>&1 || stamp "scratch_low FAILED"
  tail -n 1 $R/scratch_low.log
  stamp "A2 scratch at ${SIZE}², $A2_MIN min"
  high $R/scratch $R/scratch_low/final "$A2_MIN" > $R/scratch.log 2>&1 || stamp "scratch FAILED"
  tail -n 1 $R/scratch.log
  [ -f $R/scratch/final/config.json ] || { stamp "no scratch model"; touch $R/scratch.done; return 1; }
  touch $R/scratch.done  # also on failure: lane B waits for it
  evals scratch $R/scratch/final
  stamp "lane A done"
}

lane_b() {
  wait_for $STAGE/call2.done 600 || { stamp "call 2 (base/unet) never came"; return 1; }
  stamp "B1 the shipped base continued at ${LOW}², $B_MIN min"
  low $R/cont_low "$B_MIN" 1e-4 --warmup-steps 100 --from-pipeline "$BASE" > $R/cont_low.log 2>&1 \
    || stamp "cont_low FAILED"
  tail -n 1 $R/cont_low.log
  stamp "B2 continued at ${SIZE}², $B2_MIN min"
  high $R/cont $R/cont_low/final "$B2_MIN" > $R/cont.log 2>&1 || stamp "cont FAILED"
  tail -n 1 $R/cont.log
  [ -f $R/cont/final/config.json ] && evals cont $R/cont/final
  stamp "B3 diagnostics"
  NIMG=$TRAIN200 ev base_train200 "$BASE" 50 ddim 7.5 --prompts train200 --seeds-per-prompt 2
  timeout "$EVAL_TIMEOUT" python3 scripts/ae_ceiling.py --model "$BASE" --num-emoji $EMOJI --num-images "$NIMG" \
    --size "$SIZE" --batch-size 32 --device "$DEV" --out $R/eval/ae_ceiling.json > $R/eval/ae_ceiling.log 2>&1 \
    && stamp "ae ceiling done" || stamp "ae ceiling FAILED"
  [ -f $R/cont/final/config.json ] && ev cont_50_sweep "$BASE" 50 ddim 1.5,4.5,10.5 --unet $R/cont/final
  wait_for $R/scratch.done 900 && [ -f $R/scratch/final/config.json ] \
    && ev scratch_50_sweep "$BASE" 50 ddim 1.5,4.5,10.5 --unet $R/scratch/final
  stamp "lane B done"
}

export -f lane_a lane_b stamp wait_for latest ev low high evals
export R BASE DEV SIZE LOW EMOJI NIMG TRAIN200 K W POOL POOL2 BATCH BATCH2 A_MIN A2_MIN B_MIN B2_MIN SF STAGE \
  EVAL_TIMEOUT LANE_GPUS
run_lanes
stamp "pack"
pack_results
unets_fp16 scratch cont
for r in scratch cont; do  # one tar per model, so that a call can fetch one model's pieces
  [ -d $R/w/${r}_fp16 ] && tar cf $STAGE/$r.tar -C $R/w ${r}_fp16 && split -b 15m -d $STAGE/$r.tar $STAGE/$r.tar.
done
ls -la $R/out $STAGE/*.tar.*
stamp "SESSION DONE"
