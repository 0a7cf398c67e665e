#!/usr/bin/env bash
# tunenet across separate "hosts": one Linux network namespace per node, each with its own
# address on a bridge, links shaped with tc (netem: 50 ms delay, 1 % loss, 100 Mbit/s; where
# the kernel has no netem, tbf at 100 Mbit/s only, and the report says so). A bootstrap
# node, 2 validators and 6 miners, each in its own namespace, run a competition per
# validator over libp2p alone (no gRPC addresses configured). With --partition, one
# miner's link (rate-limited to 1 Mbit/s so that transfers take seconds) is taken down
# for PARTITION_SECS (15) while it fetches a job's model, and again over the deadline of a
# later job so that its upload meets the cut; then every job must end with every
# submission evaluated, each (job, miner) scored once.
#
#   sudo scripts/netns-net.sh [--bin target/debug/tunenet] [--shape] [--partition] [--out DIR]
#
# Needs root, `ip` and `tc` (iproute2 is installed with apt-get where missing). Exits 77,
# saying why, where namespaces cannot be made. Prints `netns-net: RESULT key=value ...`
# lines (timings in seconds) and exits non-zero if an invariant fails.
set -euo pipefail

bin=target/debug/tunenet
shape=0
partition=0
out=""
budget=${BUDGET_SECS:-80}
psecs=${PARTITION_SECS:-15}
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --shape) shape=1; shift ;;
    --partition) partition=1; shape=1; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "netns-net: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { echo "netns-net: $*" >&2; }
skip() { log "SKIP: $*"; exit 77; }

[ "$(id -u)" = 0 ] || skip "needs root (network namespaces)"
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  command -v apt-get >/dev/null || skip "no ip/tc and no apt-get to install iproute2"
  log "installing iproute2"
  apt-get install -y -q iproute2 >/dev/null 2>&1 || skip "could not install iproute2"
fi
bin=$(readlink -f "$bin")
[ -x "$bin" ] || { log "no binary at $bin (cargo build first)"; exit 2; }

id=$$
probe="tnprobe$id"
ip netns add "$probe" 2>/dev/null || skip "cannot create a network namespace (ip netns add failed)"
ip netns del "$probe"

# What the kernel can shape with.
netem=0
if [ "$shape" = 1 ]; then
  ip netns add "$probe"
  ip -n "$probe" link add tnq0 type veth peer name tnq1
  if tc -n "$probe" qdisc add dev tnq0 root netem delay 50ms loss 1% rate 100mbit 2>/dev/null; then
    netem=1
  fi
  ip netns del "$probe"
fi

work=${out:-$(mktemp -d /tmp/tunenet-netns.XXXXXX)}
mkdir -p "$work"
net=10.213.$((id % 200 + 20))
br="tnbr$((id % 100000))"
nodes=(boot v1 v2 m1 m2 m3 m4 m5 m6)
declare -A addr=([boot]=10 [v1]=11 [v2]=12 [m1]=21 [m2]=22 [m3]=23 [m4]=24 [m5]=25 [m6]=26)
pids=()
declare -a tokens
ns() { echo "tn$id-$1"; }
hostif() { echo "tnh$((id % 10000))$1"; }

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for n in "${nodes[@]}"; do ip netns del "$(ns "$n")" 2>/dev/null || true; done
  ip link del "$br" 2>/dev/null || true
}
trap cleanup EXIT

# The "hosts": a namespace per node, a veth into the bridge, its own address.
ip link add "$br" type bridge
ip addr add "$net.1/24" dev "$br"
ip link set "$br" up
for n in "${nodes[@]}"; do
  ip netns add "$(ns "$n")"
  ip link add "$(hostif "$n")" type veth peer name eth0 netns "$(ns "$n")"
  ip link set "$(hostif "$n")" master "$br" up
  ip -n "$(ns "$n")" addr add "$net.${addr[$n]}/24" dev eth0
  ip -n "$(ns "$n")" link set eth0 up
  ip -n "$(ns "$n")" link set lo up
done

# Each node's outgoing link: netem, or tbf where there is no netem (both directions of a
# node-to-node path cross two such links).
shaping="none"
link_shape() { # node rate
  local q=(tbf rate "$2" burst 64kb latency 400ms)
  [ "$netem" = 1 ] && q=(netem delay 50ms loss 1% rate "$2")
  tc -n "$(ns "$1")" qdisc replace dev eth0 root "${q[@]}"
  tc qdisc replace dev "$(hostif "$1")" root "${q[@]}"
}
if [ "$shape" = 1 ]; then
  for n in "${nodes[@]}"; do link_shape "$n" 100mbit; done
  if [ "$netem" = 1 ]; then
    shaping="netem delay 50ms loss 1% rate 100mbit on every link, both ways"
  else
    shaping="tbf 100mbit on every link, both ways; NO delay or loss: this kernel has no netem (tc: 'Specified qdisc kind is unknown')"
  fi
fi
log "shaping: $shaping"

# Data, keys, configs.
"$bin" model init --preset tiny --out "$work/model" >/dev/null
"$bin" dataset demo --out "$work/data.jsonl" --records 1200 >/dev/null
mkdir -p "$work/boot/data"
boot_peer=$("$bin" keygen --out "$work/boot/data/identity.key")
bootstrap="/ip4/$net.${addr[boot]}/tcp/7200/p2p/$boot_peer"
p2p() { # node
  printf '\n[p2p]\nlisten = ["/ip4/%s/tcp/7200"]\nbootstrap = ["%s"]\nmdns = false\nadvert_interval_secs = 2\n' \
    "$net.${addr[$1]}" "$bootstrap"
}
cat >"$work/boot/validator.toml" <<EOF
data_dir = "$work/boot/data"
listen = "$net.${addr[boot]}:7100"
discover_miners = false
$(printf '\n[p2p]\nlisten = ["/ip4/%s/tcp/7200"]\nmdns = false\n' "$net.${addr[boot]}")
EOF
for v in v1 v2; do
  mkdir -p "$work/$v"
  cat >"$work/$v/validator.toml" <<EOF
data_dir = "$work/$v/data"
listen = "$net.${addr[$v]}:7100"
discover_miners = true
$(p2p "$v")

[[competitions]]
id = "net-$v"
base_model = "$work/model"
dataset = "$work/data.jsonl"
jobs = 2
miners_per_job = 6
min_miners = 6
concurrent_jobs = 1
time_budget_secs = $budget
test_fraction = 0.15
seed = ${addr[$v]}
reveal_window_secs = 120
offer_timeout_secs = 20
eval_max_seq_len = 64
synthetic_generator = "demo"
EOF
  tokens[${addr[$v]}]=$("$bin" validator --config "$work/$v/validator.toml" init | tail -n 1)
done
for m in m1 m2 m3 m4 m5 m6; do
  mkdir -p "$work/$m"
  cat >"$work/$m/miner.toml" <<EOF
data_dir = "$work/$m/data"
listen = "$net.${addr[$m]}:7101"

[policy]
max_concurrent_jobs = 2

[training]
method = "lora"
lora_rank = 4
lora_alpha = 8.0
max_steps = 20
batch_size = 4
max_seq_len = 64
commit_margin_secs = 3.0
$(p2p "$m")
EOF
done

start() { # node role
  local n=$1 role=$2
  ip netns exec "$(ns "$n")" env RAYON_NUM_THREADS=1 TUNENET_LOG=info \
    "$bin" "$role" --config "$work/$n/$role.toml" >"$work/$n.log" 2>&1 &
  pids+=($!)
}
t0=$(date +%s.%N)
start boot validator
sleep 1
for m in m1 m2 m3 m4 m5 m6; do start "$m" miner; done
for v in v1 v2; do start "$v" validator; done
now() { echo "$(date +%s.%N) - $t0" | bc; }

show() { # validator -> competition JSON
  "$bin" console --validator "http://$net.${addr[$1]}:7100" --token "${tokens[${addr[$1]}]}" \
    --json competition show "net-$1" 2>/dev/null || true
}
status() { # miner -> "job phase" lines
  "$bin" status --miner "http://$net.${addr[$1]}:7101" 2>/dev/null | awk 'NR > 1 {print $1, $2}' || true
}
done_jobs() { # validator -> number of jobs Done
  show "$1" | python3 -c 'import json,sys
try: d=json.load(sys.stdin)
except Exception: print(0); sys.exit()
print(sum(1 for j in d["jobs"] if "Done" in (j["phase"] if isinstance(j["phase"], dict) else {j["phase"]: 0})))'
}

# The partitions, driven by m1's own status and log.
cut() { # seconds
  ip link set "$(hostif m1)" down
  sleep "$1"
  ip link set "$(hostif m1)" up
}
result_fetch=""
result_upload=""
if [ "$partition" = 1 ]; then
  link_shape m1 1mbit
  (
    # During a model transfer: m1 has a job and has not logged "fetched model" for it.
    fetched() { grep "$1" "$work/m1.log" | grep -q "fetched model"; }
    for _ in $(seq 1 1200); do
      job=$(status m1 | awk '$2 == "training" {print $1; exit}')
      if [ -n "$job" ] && ! fetched "$job"; then
        t=$(now); cut "$psecs"; up=$(now)
        log "cut m1 for ${psecs}s at ${t}s during the model transfer of $job"
        for _ in $(seq 1 1200); do fetched "$job" && break; sleep 0.1; done
        echo "$job $t $up $(now)" >"$work/cut-fetch"
        break
      fi
      sleep 0.1
    done
    # During an upload: a job of a later round (another id suffix), cut 3 s before the
    # deadline its "assigned, N s to the deadline" line gives, so the upload at the
    # deadline meets the cut.
    first=$(awk '{print $1}' "$work/cut-fetch" 2>/dev/null || echo none)
    for _ in $(seq 1 3000); do
      hit=$(grep -E "job [^ ]+-[0-9]+: assigned, [0-9]+ s to the deadline" "$work/m1.log" |
        grep -v -- "-${first##*-}: assigned" | head -n 1 || true)
      if [ -n "$hit" ]; then
        job=$(echo "$hit" | sed -E 's/.*job ([^ ]+): assigned.*/\1/')
        secs=$(echo "$hit" | sed -E 's/.*assigned, ([0-9]+) s to the deadline.*/\1/')
        deadline=$(echo "$(date -d "$(echo "$hit" | awk '{print $1}')" +%s.%N) + $secs" | bc)
        wait_s=$(echo "$deadline - 3 - $(date +%s.%N)" | bc)
        [ "$(echo "$wait_s > 0" | bc)" = 1 ] && sleep "$wait_s"
        t=$(now); cut "$psecs"; up=$(now)
        log "cut m1 for ${psecs}s at ${t}s, 3 s before the deadline of $job (its upload)"
        for _ in $(seq 1 1200); do
          status m1 | grep -q "^$job uploaded" && break
          sleep 0.2
        done
        echo "$job $t $up $(now)" >"$work/cut-upload"
        break
      fi
      sleep 0.2
    done
  ) &
  pids+=($!)
fi

# Wait for both competitions.
limit=$((budget * 2 * 4 + 300))
declare -A finished
while :; do
  for v in v1 v2; do
    if [ -z "${finished[$v]:-}" ] && [ "$(done_jobs "$v")" = 2 ]; then
      finished[$v]=$(now)
      log "$v: both jobs done at ${finished[$v]}s"
    fi
  done
  [ -n "${finished[v1]:-}" ] && [ -n "${finished[v2]:-}" ] && break
  if [ "$(echo "$(now) > $limit" | bc)" = 1 ]; then
    log "FAIL: not finished after ${limit}s; logs in $work"
    trap - EXIT; cleanup; exit 1
  fi
  for p in "${pids[@]:0:9}"; do
    kill -0 "$p" 2>/dev/null || { log "FAIL: a daemon exited; logs in $work"; trap - EXIT; cleanup; exit 1; }
  done
  sleep 2
done

# Invariants: every job done, every submission evaluated, one score per (job, miner).
fail=0
for v in v1 v2; do
  show "$v" >"$work/$v-show.json"
  python3 - "$work/$v-show.json" "$v" <<'PY' || fail=1
import json, sys
d = json.load(open(sys.argv[1])); v = sys.argv[2]
bad, evaluated = [], 0
def variant(x): return next(iter(x)) if isinstance(x, dict) else x
for j in d["jobs"]:
    jid = j["plan"]["job_id"]
    if variant(j["phase"]) != "Done":
        bad.append(f"{jid}: still {variant(j['phase'])}")
    for miner, slot in (j.get("slots") or {}).items():
        s = variant(slot["submission"])
        if s == "Evaluated":
            evaluated += 1
        else:
            bad.append(f"{jid}: {miner[:16]} submission {s}: {json.dumps(slot['submission'])[:200]}")
    scored = [s["miner"] for s in j.get("scores") or []]
    if len(scored) != len(set(scored)):
        bad.append(f"{jid}: a miner scored twice")
print(f"netns-net: {v}: {len(d['jobs'])} jobs, {evaluated} submissions evaluated", file=sys.stderr)
for b in bad: print(f"netns-net: FAIL {v} {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
done

# Each miner's model transfers: from "assigned" to "fetched model and shard", per job.
fetch_times() { # -> "miner job seconds" lines
  for m in m1 m2 m3 m4 m5 m6; do
    python3 - "$work/$m.log" "$m" <<'PY'
import re, sys
from datetime import datetime
def ts(line): return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
assigned, fetched = {}, {}
for line in open(sys.argv[1], errors="replace"):
    if m := re.search(r"job (\S+): assigned", line): assigned[m.group(1)] = ts(line)
    if m := re.search(r"fetched model and shard job_id=(\S+)", line): fetched[m.group(1)] = ts(line)
for j in sorted(fetched):
    if j in assigned: print(sys.argv[2], j, f"{fetched[j] - assigned[j]:.1f}")
PY
  done
}
fetch_times >"$work/fetch-times"
slowest() { # jobs-regex miners-regex -> the longest transfer among them
  awk -v j="$1" -v m="$2" '$2 ~ j && $1 ~ m && $3 > x {x = $3} END {printf "%.1f", x}' "$work/fetch-times"
}

line="RESULT shape=$([ "$shape" = 1 ] && { [ "$netem" = 1 ] && echo netem || echo tbf-only; } || echo none)"
line+=" budget_s=$budget v1_done_s=$(printf %.1f "${finished[v1]}") v2_done_s=$(printf %.1f "${finished[v2]}")"
line+=" fetch_max_s=$(slowest . .)"
if [ "$partition" = 1 ]; then
  cutjob=$(awk '{print $1}' "$work/cut-fetch" 2>/dev/null || echo none)
  # The other miners' transfers of the round the cut fell in (-0: both validators' first
  # jobs), against their later ones: what one dark miner costs the rest of the network.
  round=${cutjob##*-}
  line+=" others_fetch_max_s_in_cut_round=$(slowest "-$round\$" 'm[2-6]')"
  line+=" others_fetch_max_s_other_rounds=$(slowest "-[^$round]\$" 'm[2-6]')"
  for kind in fetch upload; do
    if [ -f "$work/cut-$kind" ]; then
      read -r job t up past <"$work/cut-$kind"
      line+=" cut_${kind}_at_s=$(printf %.1f "$t") ${kind}_done_after_link_up_s=$(echo "$past - $up" | bc | xargs printf %.1f)"
    else
      log "FAIL: the $kind partition never happened"
      fail=1
    fi
  done
fi
log "$line"
echo "netns-net: $line"
if [ "$fail" = 1 ]; then log "FAIL: logs in $work"; exit 1; fi
log "PASS (logs in $work)"
