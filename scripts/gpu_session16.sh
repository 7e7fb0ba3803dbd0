#!/usr/bin/env bash
# Session-16 GPU plan (issue 4), for the next GPU time: the shipped base with its terminal layout prior (prior/,
# snapfusion/prior.py, trained on this CPU) on the test prompts, as issue 4 scores it, against the same base from plain
# noise in the same run; the trajectory diagnostic with the prior; the sweep and 8-step baselines; the SnapFusion
# student with and without its own prior. One H200 (both lanes share it), about 9 minutes:
#   bash scripts/gpu_session16.sh stash && (setsid nohup bash /root/stage/repo/scripts/gpu_session16.sh run \
#     > /root/stage/s16.log 2>&1 < /dev/null &)
# staging: one call carries the code, the evaluators and the shipped models (base/ with prior/, parts/, snapfusion/)
# but not docs/; later calls: cat /root/stage/s16.log; after "SESSION DONE" copy /root/stage/runs/s16p/out/* to $OUT.
# CPU dry run (tiny, plumbing only): STAGE=/tmp/st16 DEVICE=cpu NIMG=2 K=1 NVAL=2 TRAJ=2 SIZE=64 \
#   bash scripts/gpu_session16.sh run (after stash with STAGE=/tmp/st16)
. "$(dirname "$0")/gpu_stage.sh" "$@"
R=$STAGE/runs/${RUN:-s16p}; mkdir -p "$R/out" "$R/eval"
BASE=$STAGE/models/base; STUDENT=$STAGE/models/snapfusion
DEV=${DEVICE:-cuda}; SIZE=${SIZE:-512}; EMOJI=40; NIMG=${NIMG:-485}; K=${K:-4}; TRAJ=${TRAJ:-1000}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-300}; SF="python3 -m snapfusion.cli"
require_base_parts text_encoder unet vae_encoder vae_decoder prior
lane_a() {  # the issue's measurement, with and without the prior, paired (same seeds, same run)
  ev prior_50_k$K $BASE 50 ddim 7.5 --seeds-per-prompt $K
  ev noprior_50_k$K $BASE 50 ddim 7.5 --seeds-per-prompt $K --no-prior
  trajectory_val prior $BASE --prior
  stamp "lane A done"
}
lane_b() {
  ev prior_50_sweep $BASE 50 ddim 1.5,4.5,10.5
  ev prior_8_ddim $BASE 8 ddim 7.5 && ev prior_8_dpm $BASE 8 dpmpp_2m 7.5
  [ -d $STUDENT/prior ] && ev student_prior_k$K $STUDENT 8 ddim 7.5 --seeds-per-prompt $K
  ev student_noprior_k$K $STUDENT 8 ddim 7.5 --seeds-per-prompt $K --no-prior
  stamp "lane B done"
}
COMMON=()
export -f lane_a lane_b stamp ev trajectory_val
export R BASE STUDENT DEV SIZE EMOJI NIMG K SF STAGE EVAL_TIMEOUT TRAJ
LANE_GPUS=${LANE_GPUS:-0 0} LANE_S=${LANE_S:-560} run_lanes
finish_session
