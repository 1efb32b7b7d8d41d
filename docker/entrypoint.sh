#!/bin/bash
# llmforge container entrypoint: forwards to the launchers.
#   train CONFIG [k=v ...]         python -m llmforge.train (one process; WORLD_SIZE/RANK from the env if set)
#   torchrun [launch.torchrun options] CONFIG [k=v ...]   python -m launch.torchrun (single/multi node)
#   deepspeed [deepspeed launcher options] CONFIG [k=v ...]  deepspeed --no_local_rank --module llmforge.train ... engine=deepspeed
#   data CONFIG [k=v ...]          python -m data_pipeline run CONFIG ...
#   eval RUN_DIR [k=v ...]         python -m llmforge.eval
#   shell [cmd ...]                bash
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOME_DIR=${LLMFORGE_HOME:-$(cd "$HERE/.." && pwd)}
export PYTHONPATH="$HOME_DIR${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

usage() {
  cat <<USAGE
usage: entrypoint.sh COMMAND [args...]
  train CONFIG [k=v ...]                     one process (or under an outer launcher): python -m llmforge.train
  torchrun [--nnodes N --node-rank R --nproc-per-node P --rdzv-endpoint HOST:PORT] CONFIG [k=v ...]
  deepspeed [--num_gpus N | --hostfile F ...] CONFIG [k=v ...]     engine=deepspeed via the deepspeed launcher
  data CONFIG [k=v ...]                      data pipeline: python -m data_pipeline run
  eval RUN_DIR [k=v ...]                     python -m llmforge.eval
  shell [cmd ...]                            a shell
USAGE
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train)     exec "$PYTHON" -m llmforge.train "$@" ;;
  torchrun)  exec "$PYTHON" -m launch.torchrun "$@" ;;
  deepspeed)
    opts=()
    while [ $# -gt 0 ] && [[ "$1" == --* ]]; do
      opts+=("$1"); shift
      if [ $# -gt 0 ] && [[ "$1" != --* ]] && [[ "$1" != *.yaml ]] && [[ "$1" != *.yml ]]; then opts+=("$1"); shift; fi
    done
    [ $# -ge 1 ] || { echo "error: deepspeed needs CONFIG.yaml" >&2; usage >&2; exit 2; }
    cfg=$1; shift
    exec deepspeed "${opts[@]}" --no_local_rank --module llmforge.train "$cfg" engine=deepspeed "$@" ;;
  data)      exec "$PYTHON" -m data_pipeline run "$@" ;;
  eval)      exec "$PYTHON" -m llmforge.eval "$@" ;;
  shell)     if [ $# -gt 0 ]; then exec bash -c "$*"; else exec bash; fi ;;
  -h|--help|help) usage; exit 0 ;;
  "")        echo "error: missing command" >&2; usage >&2; exit 2 ;;
  *)         echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
