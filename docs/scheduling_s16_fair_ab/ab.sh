#!/bin/bash
# A/B of fair's step cap at 1.25 x C (same arrivals as docs/scheduling_serve_s16_fair.json)
cd /work/main
run() {  # name, server args..., then -- bench extra
  name=$1; shift
  port=$((50000 + RANDOM % 10000))
  kvserve serve --no-access-log --max-num-seqs 16 --no-enable-prefix-caching --port $port "$@" > /tmp/ab/$name.server.log 2>&1 &
  spid=$!
  for i in $(seq 120); do curl -s http://127.0.0.1:$port/health >/dev/null && break; sleep 1; done
  kvserve bench serve --base-url http://127.0.0.1:$port --tokenizer smollm2-135m-instruct --length-scale 0.1 --seed 0 --no-plots --no-progress --result-file /tmp/ab/$name.json --dataset azure-conv --num-prompts 433 --request-rate 10.82 --tenants heavy:4,light:1 $BENCH_EXTRA > /tmp/ab/$name.bench.log 2>&1
  kill $spid; wait $spid 2>/dev/null
  echo "$name done $(date +%T)"
}
BENCH_EXTRA="" run fair-200c --scheduling-policy fair --fair-max-step-ms 200
BENCH_EXTRA="--only-tenant light" run alone-c --scheduling-policy fcfs
BENCH_EXTRA="" run fair-100c --scheduling-policy fair --fair-max-step-ms 100
BENCH_EXTRA="" run fair-off-c --scheduling-policy fair --fair-max-step-ms 0
