#!/usr/bin/env bash
# Session 6, last call: the vanilla-arm student (shipped as the default) against the base at 50 steps with 4 seeds per
# prompt (1,940 images: the attribute accuracy's standard error halves, and the comparison is paired by prompt and
# seed). Carried in gpu_inputs/ (untracked): base_i8 (the base pipeline with its UNet stored weight-only int8 to fit
# the 64 MiB transfer), sf (the student pipeline), parts/vae_decoder_half. Two GPUs, one lane each.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
G=gpu_inputs; O=${OUT:-/tmp/out}; mkdir -p $O
e() {  # gpu, name, model, steps, sweep, seeds per prompt, [extra]
  local gpu=$1 name=$2 model=$3 steps=$4 sweep=$5 k=$6; shift 6
  CUDA_VISIBLE_DEVICES=$gpu timeout 200 python3 -m snapfusion.cli eval --model $model --num-emoji 40 \
    --num-images $((485 * k)) --seeds-per-prompt $k --steps $steps --sampler ddim --guidance-sweep $sweep \
    --batch-size 64 --device cuda --dtype bf16 --out $O/$name "$@" > $O/$name.log 2>&1 \
    && echo "$name done $SECONDS s" || echo "$name FAILED $SECONDS s"
}
( e 0 base50_k4 $G/base_i8 50 7.5 4
  e 0 base50_half_k4 $G/base_i8 50 7.5 4 --decoder $G/parts/vae_decoder_half ) &
( e 1 student_k4 $G/sf 8 7.5,10.5 4
  e 1 student_full_k4 $G/sf 8 7.5 4 --decoder $G/base_i8/vae_decoder
  e 1 base50_k1 $G/base_i8 50 7.5 1 ) &
wait
rm -f $O/*/grid_*.png
tail -n 3 $O/*.log | grep -v "^$" | cut -c1-200
