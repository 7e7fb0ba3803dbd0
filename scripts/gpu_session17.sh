#!/usr/bin/env bash
# Session-17 GPU plan (issue 4's default model): should the SnapFusion student sample with a layout prior of its own?
# Two priors trained on this CPU (snapfusion/prior.py): session 16's (3,000 steps, its last weights) and session 17's
# (early stopping, train-prior's new default), carried in s17_priors/{student_s16,student_es} (untracked, with the
# tree). Lane A: the validation prompts (485 x 4 seeds, 8 steps, w 7.5), where the choice is made: the student with
# either prior and from plain noise, paired. Lane B: the same three on the test prompts, for the report only. One
# H200, both lanes on it, about 5 minutes; one staging call (the student needs no base UNet):
#   bash scripts/gpu_session17.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session17.sh run \
#     > /root/stage/s17.log 2>&1 < /dev/null &)
# after "SESSION DONE" copy /root/stage/runs/s17p/out/* to $OUT.
. "$(dirname "$0")/gpu_stage.sh" "$@"
R=$STAGE/runs/${RUN:-s17p}; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; STUDENT=$STAGE/models/snapfusion; P=$STAGE/repo/s17_priors
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; K=${K:-4}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-240}; SF="python3 -m snapfusion.cli"
require_base_parts text_encoder vae_encoder vae_decoder
with_prior() {  # name, pipeline folder, prior folder: a copy of the pipeline beside the shipped ones, with that prior
  local dst=$STAGE/models/$1
  rm -rf "$dst" && cp -r "$2" "$dst" && rm -rf "$dst/prior" && cp -r "$3" "$dst/prior"
}
three() {  # suffix, [extra eval args]: the student from plain noise and with each prior
  local suffix=$1; shift
  ev student_noprior_$suffix $STUDENT 8 ddim 7.5 --seeds-per-prompt $K "$@"
  ev student_s16_$suffix $STAGE/models/student_s16 8 ddim 7.5 --seeds-per-prompt $K "$@"
  ev student_es_$suffix $STAGE/models/student_es 8 ddim 7.5 --seeds-per-prompt $K "$@"
}
lane_a() { three val_k$K --prompts val; stamp "lane A done"; }
lane_b() { three test_k$K; stamp "lane B done"; }
with_prior student_s16 $STUDENT $P/student_s16 && with_prior student_es $STUDENT $P/student_es || exit 1
COMMON=()
export -f lane_a lane_b three stamp ev
export R BASE STUDENT P DEV SIZE EMOJI NIMG K SF STAGE EVAL_TIMEOUT
LANE_GPUS=${LANE_GPUS:-0 0} LANE_S=${LANE_S:-400} run_lanes
finish_session
