#!/usr/bin/env bash
# Launch one jaxserve process per host (or several on one host) as a jax.distributed group.
# Process 0 serves HTTP on --port; the others follow its steps. Extra arguments go to every process.
# Every process must hold the same cluster secret: the file given as --cluster-secret-file, or
# $JAXSERVE_CLUSTER_SECRET; launching all processes on this host without either makes a random one.
#
#   One host, 3 processes, one CPU device each, SmolLM2 split 3 ways:
#     scripts/launch_multihost.sh --num-processes 3 -- --tensor-parallel-size 3
#   Several hosts: copy one secret file to each (openssl rand -hex 32 > secret; chmod 600 secret),
#   then run on each host with its own --process-id and the same coordinator:
#     scripts/launch_multihost.sh --coordinator 10.0.0.1:7100 --num-processes 2 --process-id 1 \
#       --cluster-secret-file secret -- --tensor-parallel-size 16
set -euo pipefail

coordinator="127.0.0.1:7100"
num_processes=1
process_id=""  # empty: launch all processes on this host
secret_file=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) coordinator="$2"; shift 2 ;;
    --num-processes) num_processes="$2"; shift 2 ;;
    --process-id) process_id="$2"; shift 2 ;;
    --cluster-secret-file) secret_file="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch_multihost.sh: unknown option $1 (extra jaxserve options go after --)" >&2; exit 2 ;;
  esac
done

jaxserve="${JAXSERVE:-jaxserve}"
if [[ -n "$secret_file" ]]; then
  set -- --cluster-secret-file "$secret_file" "$@"
fi

if [[ -n "$process_id" ]]; then
  exec "$jaxserve" serve --coordinator-address "$coordinator" --num-processes "$num_processes" --process-id "$process_id" "$@"
fi
if [[ -z "$secret_file" && -z "${JAXSERVE_CLUSTER_SECRET:-}" ]]; then  # all on this host: a fresh secret for this group
  JAXSERVE_CLUSTER_SECRET="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export JAXSERVE_CLUSTER_SECRET
fi

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = num_processes - 1; i >= 0; i--)); do
  "$jaxserve" serve --coordinator-address "$coordinator" --num-processes "$num_processes" --process-id "$i" "$@" &
  pids+=($!)
done
# The group lives and dies together: when any process exits, stop the rest.
wait -n "${pids[@]}"
status=$?
exit "$status"
