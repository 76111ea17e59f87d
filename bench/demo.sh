#!/usr/bin/env bash
# Time `mmrlhf demo` with its defaults on this machine (goal: under 10 minutes on a 2-core CPU), from a fresh run folder.
# The demo's own summary.json has the time of every stage; it is copied to bench/results/demo_<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)/demo}
/usr/bin/time -v .venv/bin/mmrlhf demo out="$OUT" "$@" 2> "$OUT.time" | tee "$OUT.log"
grep -E "Elapsed|Maximum resident" "$OUT.time"
mkdir -p bench/results
python3 -c "
import json, sys, platform, datetime
s = json.load(open('$OUT/summary.json'))
s['machine'] = open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].split('\n')[0].strip() + f', {__import__(\"os\").cpu_count()} cores'
s['date'] = datetime.date.today().isoformat()
json.dump(s, open(f'bench/results/demo_{s[\"date\"]}.json', 'w'), indent=1)
print('wrote', f'bench/results/demo_{s[\"date\"]}.json')"
