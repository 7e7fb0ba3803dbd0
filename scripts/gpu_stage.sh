# Shared start of the background GPU session scripts (gpu_session3.sh to gpu_session5.sh); they source it with their
# own arguments. "stash" merges the model files a device call carried into $STAGE/models and copies the code once
# (files carried by one call are deleted when the next call starts without them), then exits; "run" moves into the
# staged copy. Also the helpers every lane uses (the caller exports them to its lane shells).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGE=${STAGE:-/root/stage}
if [ "${1:-}" = stash ]; then
  mkdir -p "$STAGE/models" && cp -r snapfusion/assets/models/. "$STAGE/models"/
  if [ ! -d "$STAGE/repo" ]; then
    mkdir -p "$STAGE/repo" && tar cf - --exclude=./snapfusion/assets/models --exclude=./.git --exclude='./.venv*' \
      --exclude=./runs . | tar xf - -C "$STAGE/repo"
    ln -s "$STAGE/models" "$STAGE/repo/snapfusion/assets/models"
  fi
  find "$STAGE/models" -name config.json | sort
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 stash|run"; exit 2; }
cd "$STAGE/repo" || exit 1
export PYTHONPATH=$PWD

stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }
wait_for() {  # file, seconds
  local n=0; while [ ! -e "$1" ] && [ $n -lt "$2" ]; do sleep 5; n=$((n + 5)); done; [ -e "$1" ]
}
latest() { python3 -c "from pathlib import Path; from snapfusion.train.state import latest_checkpoint as l; \
c = l(Path('$1')); print(c if c else '')"; }
ev() {  # name, model, steps, sampler, sweep, [extra args]: snapfusion eval into $R/eval/name, bf16 on the GPU
  local name=$1 model=$2 steps=$3 sampler=$4 sweep=$5; shift 5
  local dt=bf16; [ "$DEV" = cpu ] && dt=fp32
  timeout "${EVAL_TIMEOUT:-600}" $SF eval --model "$model" --num-emoji $EMOJI --num-images "$NIMG" --steps "$steps" \
    --sampler "$sampler" --guidance-sweep "$sweep" --batch-size 64 --device "$DEV" --dtype $dt --size "$SIZE" \
    --out "$R/eval/$name" "$@" > "$R/eval/$name.log" 2>&1 && stamp "eval $name done" || stamp "eval $name FAILED"
}

require_base_parts() {  # parts..: each must be staged in $BASE (else exit); then the GPU and torch versions
  local part
  for part in "$@"; do
    test -f "$BASE/$part/config.json" || { stamp "missing $BASE/$part: stash first"; exit 1; }
  done
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
}
base_with_unet() {  # folder, UNet folder: the shipped base ($BASE) with that UNet
  mkdir -p "$1" && cp -r "$BASE"/{model_index.json,text_encoder,vae_encoder,vae_decoder} "$1"/ && cp -r "$2" "$1/unet"
}

trajectory_val() {  # name, pipeline, [extra args, e.g. --prior]: diagnose_mean_leak.py's first-step / trajectory
  # diagnostic on the validation gradient prompts (the first TRAJ of them, fp32 on $DEV) into $R/eval/trajectory_<name>.json
  local name=$1 model=$2; shift 2
  timeout 240 python3 scripts/diagnose_mean_leak.py --model "$model" --prompts val --count "${TRAJ:-1000}" \
    --leak-count 32 --steps 20 --trajectory --device "$DEV" --out "$R/eval/trajectory_$name.json" "$@" \
    > "$R/eval/trajectory_$name.log" 2>&1 \
    && stamp "trajectory $name done" || stamp "trajectory $name FAILED"
}

run_lanes() {  # lane_a and lane_b on the GPUs of LANE_GPUS (default "0 1"; "0 0" shares one GPU; unpinned on a
  # CPU run), each under LANE_S seconds so that packing happens in time whatever hangs; the caller exports the lane
  # functions and their variables
  COMMON_STR="${COMMON[*]}"; export COMMON_STR
  local gpus=(${LANE_GPUS:-0 1}); local a=${gpus[0]} b=${gpus[1]:-${gpus[0]}}; [ "$DEV" = cuda ] || { a=; b=; }
  CUDA_VISIBLE_DEVICES=$a timeout -k 10 "$LANE_S" bash -c 'COMMON=($COMMON_STR); lane_a' > "$R/lane_a.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=$b timeout -k 10 "$LANE_S" bash -c 'COMMON=($COMMON_STR); lane_b' > "$R/lane_b.log" 2>&1 &
  wait
  cat "$R/lane_a.log" "$R/lane_b.log"
}

summarize_evals() {  # $R/summary.json: per eval run, its rows without per-image lists (attributes: "all" only)
  python3 - "$R" <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
summary = {}
for f in sorted((r / "eval").glob("*/eval.json")):
    rows = json.loads(f.read_text())["results"]
    summary[f.parent.name] = [{k: v for k, v in x.items() if not isinstance(v, (list, dict)) and k != "all_per_image"}
                              | {"attributes": x["attributes"].get("all") if isinstance(x.get("attributes"), dict)
                                 else None} for x in rows]
(r / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary)[:3000])
PY
}

pack_results() {  # [extra tar excludes]: $R's logs, metrics and eval JSON (no weights, checkpoints or grids) into
  # $R/out/results.tar.gz, after summarize_evals
  summarize_evals
  rm -f $R/eval/*/grid_*.png $R/eval/*/fid_clip_curve.png
  local tmp=$STAGE/$(basename "$R")_results.tar.gz  # one per run: two runs may finish side by side
  tar czf "$tmp" --exclude='*.safetensors' --exclude=checkpoints --exclude=out --exclude='*/samples' \
    --exclude=w "$@" -C "$STAGE/runs" "$(basename "$R")" && mv "$tmp" $R/out/results.tar.gz
}

unets_fp16() {  # run names: each run's final UNet (its EMA) saved in fp16 as $R/w/<name>_fp16
  local r; mkdir -p $R/w
  for r in "$@"; do
    [ -f $R/$r/final/config.json ] && python3 -c "import torch; from snapfusion.models.unet import UNet; \
UNet.load('$R/$r/final').save('$R/w/${r}_fp16', dtype=torch.float16)"
  done
}

ship_unets() {  # run names: their final UNets (EMA) in fp16 as 15 MiB pieces $R/out/unets.tar.NN, once (a script
  # ships them before its evaluations, so an evaluation that overruns the device's time cannot lose them)
  ls $R/out/unets.tar.* >/dev/null 2>&1 && return 0
  local tmp=$STAGE/$(basename "$R")_unets.tar
  unets_fp16 "$@" && tar cf "$tmp" -C $R w && split -b 15m -d "$tmp" $R/out/unets.tar. &&
    stamp "weights in $R/out"
}

finish_session() {  # [run names]: pack $R's results (not the pipeline copies), the named runs' EMA UNets in fp16 as
  # 15 MiB pieces in $R/out (ship_unets, unless shipped already), then "SESSION DONE" (what monitoring calls wait for)
  stamp "pack"
  pack_results --exclude='pipe*'
  [ $# -eq 0 ] || ship_unets "$@"
  ls -la $R/out
  stamp "SESSION DONE"
}
