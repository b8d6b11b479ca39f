#!/usr/bin/env bash
# Follow the ladder run.sh started for at most $1 seconds, then pack what exists so far (the
# results folder, every rung's done/run/log records, the plan) into $OUT/gsm8k.tgz.
W=${W:-/tmp/w}
timeout "${1:-540}" tail --pid="$(cat "$W/runs/bench.pid")" -f /dev/null
tr '\r' '\n' < "$W/runs/bench.log" | grep -v '^\s*$' > "$W/runs/bench_clean.log"
tail -n 5 "$W/runs/bench_clean.log" | cut -c1-200
cd "$W" && tar czf "$OUT/gsm8k.tgz" --ignore-failed-read results runs/*.txt runs/*.log \
    $(ls runs/*/*/{done,run}.json runs/*/*/log.jsonl 2>/dev/null)
grep -h valid_accuracy runs/*/*/log.jsonl | tail -n 3
ls results/* 2>/dev/null
