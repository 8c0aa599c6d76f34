#!/bin/sh
# A/B of tools/perfprobe.py: alternates runs of tree A and tree B (PYTHONPATH), N times each.
# usage: tools/perfab.sh A_DIR B_DIR N CALLS OUTPREFIX
PY=/work/main/.venv/bin/python
PROBE=$(dirname "$0")/perfprobe.py
if [ "$1" = "--summary" ]; then  # (perfab_parallel.sh: only the summary of runs made)
  OUT=$2; N=$3
else
A=$1; B=$2; N=${3:-3}; CALLS=${4:-3000}; OUT=${5:-/tmp/ab}
i=1
while [ $i -le "$N" ]; do
  for side in A B; do
    if [ $side = A ]; then T=$A; else T=$B; fi
    PYTHONPATH=$T $PY "$PROBE" --calls "$CALLS" --rounds 3 --json "$OUT.$side.$i.json" > /dev/null || exit 1
  done
  i=$((i+1))
done
fi
$PY - "$OUT" "$N" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
for side in "AB":
    runs = [json.load(open(f"{out}.{side}.{i}.json"))["median"] for i in range(1, n + 1)]
    def med(kind, m):
        return statistics.median(r[kind][m] for r in runs)
    ratio = statistics.median(r["compute"]["p50_us"] / r["ping"]["p50_us"] for r in runs)
    print(f"{side}: compute p50 {med('compute','p50_us'):6.0f} us, CPU/call client "
          f"{med('compute','client_us'):5.0f} server {med('compute','server_us'):5.0f} "
          f"workers {med('compute','workers_us'):5.0f} | ping p50 {med('ping','p50_us'):5.0f} "
          f"client {med('ping','client_us'):4.0f} server {med('ping','server_us'):4.0f} | "
          f"ratio {ratio:.2f}x (runs: " + ", ".join(
              f"{r['compute']['p50_us'] / r['ping']['p50_us']:.2f}" for r in runs) + ")")
PY
