#!/usr/bin/env bash
# Train the tiny pair on one GPU: time the step first, then the four phases as two processes
# sharing the GPU (A = joint, then A' = post-hoc on A's target; B = target alone for as many
# steps as A, then B' = post-hoc on B's target). Seed 0; the corpus from a snapshot.
#
#   examples/tiny_pair/train_gpu.sh SNAPSHOT.tar.gz OUT_DIR [extra train.py arguments]
#
# BENCH_ARGS: extra bench_step.py arguments; PYTHON: the interpreter (python3). Make the
# snapshot on the machine whose stdlib defines the split (the GPU machine may run another
# Python): python -c "import sys; sys.path.insert(0, 'examples/tiny_pair');
# import corpus; corpus.load(None).make_snapshot('stdlib.tar.gz')"
set -euo pipefail
snap=$1 out=$2
shift 2
here=$(dirname "$0")
py=${PYTHON:-python3}
mkdir -p "$out/joint" "$out/alone"
"$py" "$here/bench_step.py" --out "$out/bench_step.json" ${BENCH_ARGS:-}
# the batch of the fastest training-ops variant
read -r batch < <("$py" - "$out/bench_step.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["variant"] != "reference ops"]
best = max(rows, key=lambda r: r["tokens_per_second"])
print(best["batch"])
PY
)
common=(--snapshot "$snap" --batch "$batch" "$@")
# stdout repeats train_log.jsonl: dropped; errors on stderr
"$py" "$here/train.py" --out "$out/joint" --phases "A,A'" "${common[@]}" > /dev/null &
joint=$!
"$py" "$here/train.py" --out "$out/alone" --phases "B,B'" \
    --match-steps "$out/joint/train_log.jsonl" "${common[@]}" > /dev/null
wait "$joint"
