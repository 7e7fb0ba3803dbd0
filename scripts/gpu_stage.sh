# Shared start of the background GPU session scripts (gpu_session3.sh, gpu_session4.sh); they source it with their
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
