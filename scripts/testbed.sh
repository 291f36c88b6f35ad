#!/usr/bin/env bash
# The multi-server test bed: N "servers" as network namespaces, each running its own nfmgr on
# AF_PACKET ports, joined by a bridge for the cluster link, plus client and server namespaces
# on either side of server 1 (a bump in the wire).
#
#   client (10.77.0.1) --cin-- [ server 1 ] --sin-- server (10.77.0.2)
#                                  | ctl 10.99.0.1
#   bridge in <prefix>-net  ======+====== ctl 10.99.0.2 [ server 2 ] ... [ server N ]
#
# Server 1 is the coordinator (TCP 10.99.0.1:7700); the others join it (with --etcd, every
# server listens at 10.99.0.N:7700 and the one a three-member etcd in namespace <prefix>-x
# elects is the coordinator: client URLs http://10.99.0.99:2379, :22379, :32379). Every server runs a
# vswitch and RUNTIMES runtimes of one chain (firewall -> flow monitor by default); traffic
# enters server 1's vswitch, which dispatches flows to runtimes on every server.
#
# Usage (as root):
#   scripts/testbed.sh up   [--servers N] [--runtimes K] [--prefix P] [--chain NFS]
#                           [--bin DIR] [--no-start] [--mtu M] [--cluster-mtu M]
#                           [--impair loss=10,duplicate=5,reorder=25,delay_ms=1]
#                           [--cluster-set 'KEY = VALUE']...  (extra [cluster] settings)
#                           [--runtime-set 'KEY = VALUE']...  (extra settings of every runtime)
#                           [--vswitch-set 'KEY = VALUE']...  (extra settings of every vswitch)
#                           [--migration-set 'KEY = VALUE']...  (a [migration] section)
#                           [--chain-set 'KEY = VALUE']...  (extra settings of the chain)
#                           [--region-set 'KEY = VALUE']...  (extra [region] settings)
#                           [--manager-set 'KEY = VALUE']...  (extra [manager] settings)
#                           [--pin-runtimes]  (runtime N of all servers on core N mod CPUs)
#                           [--scope local]   (server 1's vswitch keeps new flows local)
#                           [--gen FLOWS,PPS_PER_FLOW,MS[,START_AFTER_MS]]  (a generator -> sink
#                                                          on server 1)
#                           [--sink-record FILE]  (the sink also writes what it gets to FILE)
#                           [--etcd]  (cluster state and coordinator election in etcd)
#   scripts/testbed.sh down [--prefix P]
# With --chain, `nat` gets external address 10.77.0.100 and translates the client's flows
# (--nat-internal PREFIX: the flows from PREFIX instead, 10.0.0.0/8 for the generator's).
#   scripts/testbed.sh status [--prefix P]        # nfmgr status on the coordinator
#   scripts/testbed.sh exec SERVER CMD... [--prefix P]  # run CMD in server SERVER's namespace
#
# State (configs, cluster key, logs, pids) lives in /tmp/nf-testbed-<prefix>/; each server's
# region directory there, s<N>, links to /dev/shm/nf-testbed-<prefix>/s<N> (the shared packet
# buffers belong in memory: on /tmp's disk file system the kernel would write them back to
# disk and fault on every write after a writeback). Namespaces are
# <prefix>-s1.. <prefix>-sN, <prefix>-client, <prefix>-server, <prefix>-net, <prefix>-x (a
# spare station on the bridge, for tests that inject frames). `up` returns once the cluster
# has formed (every server alive in the coordinator's view).
#
# --impair puts an impaired link between each server but the first and the bridge: frames
# are lost, duplicated and reordered in both directions, with tc netem when the kernel has
# it, else with scripts/linkem.py (same parameters) in namespace <prefix>-link<i>. A
# user-space forwarder on a busy machine stalls for tens of milliseconds at times, so an
# impaired test bed watches the cluster link over a longer window (link_misses = 30, not 4:
# 300 ms), unless --cluster-set says otherwise.
set -euo pipefail

cmd=${1:-}
shift || true
PREFIX=nftb
SERVERS=2
RUNTIMES=2
CHAIN="firewall,flow_monitor"
BIN=""
START=1
ETCD=""
ETCD_PORTS="2379 22379 32379"
MTU=9000
# The platform's frames on the cluster link (its `cluster.mtu`); jumbo ones also need
# buffers that hold them (`--region-set 'buffer_size = 8448'` for 8192).
CLUSTER_MTU=1500
EXEC_SERVER=""
EXEC_ARGS=()
IMPAIR=
CLUSTER_SET=
RUNTIME_SET=
VSWITCH_SET=
MIGRATION_SET=
CHAIN_SET=
NAT_INTERNAL=10.77.0.1/32
SINK_RECORD=
REGION_SET=
MANAGER_SET=
PIN_RUNTIMES=
SCOPE=
GEN=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --runtimes) RUNTIMES=$2; shift 2 ;;
        --chain) CHAIN=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --mtu) MTU=$2; shift 2 ;;
        --cluster-mtu) CLUSTER_MTU=$2; shift 2 ;;
        --impair) IMPAIR=$2; shift 2 ;;
        --cluster-set) CLUSTER_SET+=$2$'\n'; shift 2 ;;
        --runtime-set) RUNTIME_SET+=$2$'\n'; shift 2 ;;
        --vswitch-set) VSWITCH_SET+=$2$'\n'; shift 2 ;;
        --migration-set) MIGRATION_SET+=$2$'\n'; shift 2 ;;
        --chain-set) CHAIN_SET+=$2$'\n'; shift 2 ;;
        --nat-internal) NAT_INTERNAL=$2; shift 2 ;;
        --region-set) REGION_SET+=$2$'\n'; shift 2 ;;
        --manager-set) MANAGER_SET+=$2$'\n'; shift 2 ;;
        --pin-runtimes) PIN_RUNTIMES=1; shift ;;
        --scope) SCOPE=$2; shift 2 ;;
        --gen) GEN=$2; shift 2 ;;
        --sink-record) SINK_RECORD=$2; shift 2 ;;
        --no-start) START=0; shift ;;
        --etcd) ETCD=1; shift ;;
        *)
            if [ "$cmd" = exec ]; then
                if [ -z "$EXEC_SERVER" ]; then EXEC_SERVER=$1; else EXEC_ARGS+=("$1"); fi
                shift
            else
                echo "testbed: unknown argument $1" >&2; exit 2
            fi ;;
    esac
done

STATE=/tmp/nf-testbed-$PREFIX
SHM=/dev/shm/nf-testbed-$PREFIX
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$BIN" ]; then BIN=$ROOT/target/release; fi
NFMGR=$BIN/nfmgr

die() { echo "testbed: $*" >&2; exit 1; }
ns() { echo "$PREFIX-$1"; }
nsx() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }
quiet_offloads() {  # AF_PACKET ports need whole frames: no segmentation offloads.
    ip netns exec "$1" ethtool -K "$2" tso off gso off gro off tx off rx off >/dev/null 2>&1 || true
}

down() {
    if [ -d "$STATE" ]; then
        for f in "$STATE"/s*.pid; do
            [ -e "$f" ] || continue
            pid=$(cat "$f")
            kill -TERM "$pid" 2>/dev/null || true
        done
        for _ in $(seq 50); do
            alive=0
            for f in "$STATE"/s*.pid; do
                [ -e "$f" ] || continue
                kill -0 "$(cat "$f")" 2>/dev/null && alive=1
            done
            [ $alive = 0 ] && break
            sleep 0.1
        done
        for f in "$STATE"/s*.pid; do
            [ -e "$f" ] || continue
            kill -KILL "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        done
        for f in "$STATE"/linkem*.pid "$STATE"/etcd*.pid; do
            [ -e "$f" ] || continue
            kill -TERM "$(cat "$f")" 2>/dev/null || true
            rm -f "$f"
        done
    fi
    for n in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
        ip netns del "$n" 2>/dev/null || true
    done
}

config() {  # config SERVER
    local i=$1
    local role
    if [ -n "$ETCD" ]; then
        role="listen = \"10.99.0.$i:7700\"
store = \"etcd\"
etcd = [$(for p in $ETCD_PORTS; do printf '"http://10.99.0.99:%s", ' "$p"; done)]"
    elif [ "$i" = 1 ]; then role='listen = "10.99.0.1:7700"'; else role='coordinator = "10.99.0.1:7700"'; fi
    cat <<EOF
# Test bed server $i of $SERVERS (written by scripts/testbed.sh).
instance = "$PREFIX-s$i"

[region]
hugepages = "off"
dir = "$STATE/s$i"
$REGION_SET

[manager]
bin_dir = "$BIN"
control_socket = "$STATE/s$i.sock"
run_dir = "$SHM/s$i"
$(case "$MANAGER_SET" in *report*) ;; *) echo "report = \"$STATE/s$i-report.json\"" ;; esac)
$MANAGER_SET

[cluster]
server_id = $i
name = "s$i"
$role
key_file = "cluster.key"
port = "ctl"
mtu = $CLUSTER_MTU
$(if [ -n "$IMPAIR" ] && [[ "$CLUSTER_SET" != *link_misses* ]]; then echo "link_misses = 30"; fi)
$CLUSTER_SET

[[vswitch]]
name = "vs0"
EOF
    if [ -n "$SCOPE" ] && [ "$i" = 1 ]; then printf 'scope = "%s"\n' "$SCOPE"; fi
    printf '%s' "$VSWITCH_SET"
    echo
    for r in $(seq 0 $((RUNTIMES - 1))); do
        printf '[[runtime]]\nname = "rt%s"\n%s' "$r" "$RUNTIME_SET"
        if [ -n "$PIN_RUNTIMES" ]; then
            printf 'core = %s\n' $(( ((i - 1) * RUNTIMES + r) % $(nproc) ))
        fi
    done
    if [ -n "$MIGRATION_SET" ]; then printf '\n[migration]\n%s' "$MIGRATION_SET"; fi
    printf '\n[[chain]]\nname = "main"\n%s' "$CHAIN_SET"
    IFS=, read -ra kinds <<< "$CHAIN"
    for k in "${kinds[@]}"; do
        printf '[[chain.nf]]\nkind = "%s"\n' "$k"
        if [ "$k" = firewall ]; then printf 'default = "allow"\n'; fi
        if [ "$k" = nat ]; then
            printf 'external_ip = "10.77.0.100"\nexternal_mac = "02:4e:41:54:00:01"\n'
            printf 'internal = "%s"\n' "$NAT_INTERNAL"
        fi
    done
    printf '\n[[port]]\nname = "ctl"\nspec = "afpacket:ctl"\n'
    if [ "$i" = 1 ]; then
        printf '\n[[port]]\nname = "cin"\nspec = "afpacket:cin"\nto = "sin"\n'
        printf '\n[[port]]\nname = "sin"\nspec = "afpacket:sin"\nto = "cin"\n'
        if [ -n "$GEN" ]; then
            IFS=, read -r gflows grate gms gstart <<< "$GEN"
            printf '\n[[port]]\nname = "gen0"\nspec = "gen:"\nto = "sink0"\nflows = %s\n' "$gflows"
            printf 'rate_pps = %s\npacket_size = 64\nduration_ms = %s\n' "$grate" "$gms"
            if [ -n "$gstart" ]; then printf 'start_after_ms = %s\n' "$gstart"; fi
            printf '\n[[port]]\nname = "sink0"\nspec = "sink:"\n'
            if [ -n "$SINK_RECORD" ]; then printf 'record = "%s"\n' "$SINK_RECORD"; fi
        fi
    fi
}

start_server() {  # start_server I
    NFMGR_LOG=${NFMGR_LOG:-info} ip netns exec "$(ns "s$1")" "$NFMGR" start --config "$STATE/s$1.toml" \
        > "$STATE/s$1.log" 2>&1 &
    echo $! > "$STATE/s$1.pid"
}

# Three etcd members in namespace <prefix>-x (peers on its loopback), waited for until they
# answer as one cluster.
start_etcd() {
    command -v etcd >/dev/null || die "--etcd: etcd is not installed (apt-get install etcd-server)"
    local n=0 peers="" p
    ip -n "$(ns x)" link set lo up
    for p in $ETCD_PORTS; do
        peers+="e$n=http://127.0.0.1:$((p + 1)),"
        n=$((n + 1))
    done
    n=0
    for p in $ETCD_PORTS; do
        ip netns exec "$(ns x)" etcd --name "e$n" --data-dir "$STATE/etcd$n" \
            --listen-client-urls "http://10.99.0.99:$p" \
            --advertise-client-urls "http://10.99.0.99:$p" \
            --listen-peer-urls "http://127.0.0.1:$((p + 1))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((p + 1))" \
            --initial-cluster "${peers%,}" --initial-cluster-state new \
            --initial-cluster-token "$PREFIX" > "$STATE/etcd$n.log" 2>&1 &
        echo $! > "$STATE/etcd$n.pid"
        n=$((n + 1))
    done
    for _ in $(seq 100); do
        if ip netns exec "$(ns x)" curl -sf --max-time 1 http://10.99.0.99:2379/health \
            | grep -q '"health":"true"'; then
            return
        fi
        sleep 0.1
    done
    tail -20 "$STATE/etcd0.log" >&2
    die "etcd did not start within 10 s"
}

# Server I's cluster link through namespace <prefix>-link<I>: ctl -- a<I> [impairment] b<I>
# -- p<I> on the bridge.
impaired_link() {
    local i=$1 l; l=$(ns "link$i")
    local loss=0 dup=0 reorder=0 delay=1
    IFS=, read -ra kv <<< "$IMPAIR"
    for e in "${kv[@]}"; do
        case "${e%%=*}" in
            loss) loss=${e#*=} ;;
            duplicate) dup=${e#*=} ;;
            reorder) reorder=${e#*=} ;;
            delay_ms) delay=${e#*=} ;;
            *) die "--impair: unknown setting ${e%%=*}" ;;
        esac
    done
    ip netns add "$l"
    ip -n "$l" link set lo up
    ip link add ctl netns "$(ns "s$i")" mtu "$MTU" type veth peer name "a$i" netns "$l" mtu "$MTU"
    ip link add "b$i" netns "$l" mtu "$MTU" type veth peer name "p$i" netns "$(ns net)" mtu "$MTU"
    for d in "a$i" "b$i"; do
        ip -n "$l" link set "$d" promisc on up
        quiet_offloads "$l" "$d"
    done
    quiet_offloads "$(ns net)" "p$i"
    local netem="netem loss ${loss}% duplicate ${dup}% delay ${delay}ms reorder ${reorder}% 50%"
    if ip netns exec "$l" tc qdisc add dev "a$i" root $netem 2>/dev/null; then
        ip netns exec "$l" tc qdisc add dev "b$i" root $netem
        ip -n "$l" link add br0 type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0
        ip -n "$l" link set br0 mtu "$MTU" up
        ip -n "$l" link set "a$i" master br0
        ip -n "$l" link set "b$i" master br0
        echo "netem" > "$STATE/impair$i"
    else
        ip netns exec "$l" python3 "$ROOT/scripts/linkem.py" "a$i" "b$i" --loss "$loss" \
            --duplicate "$dup" --reorder "$reorder" --delay-ms "$delay" > "$STATE/linkem$i.log" 2>&1 &
        echo $! > "$STATE/linkem$i.pid"
        echo "linkem (this kernel has no netem)" > "$STATE/impair$i"
    fi
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, AF_PACKET)"
    [ -x "$NFMGR" ] || die "no nfmgr at $NFMGR (cargo build --release, or --bin DIR)"
    [ "$SERVERS" -ge 1 ] && [ "$SERVERS" -le 9 ] || die "--servers: 1 to 9"
    down
    rm -rf "$STATE" "$SHM"
    mkdir -p "$STATE" "$SHM"
    # The cluster key: 32 random bytes as hex, readable by root only.
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/cluster.key")

    ip netns add "$(ns net)"
    ip -n "$(ns net)" link set lo up
    # The cluster link is a wire: frames crossing it owe nothing to the host's firewall, even
    # where br_netfilter is loaded (by a container engine, say).
    ip -n "$(ns net)" link add br0 type bridge nf_call_iptables 0 nf_call_ip6tables 0 \
        nf_call_arptables 0
    ip -n "$(ns net)" link set br0 mtu "$MTU" up
    for i in $(seq 1 "$SERVERS"); do
        local s; s=$(ns "s$i")
        ip netns add "$s"
        ip -n "$s" link set lo up
        if [ -n "$IMPAIR" ] && [ "$i" -gt 1 ]; then
            impaired_link "$i"
        else
            ip link add ctl netns "$s" mtu "$MTU" type veth peer name "p$i" netns "$(ns net)" mtu "$MTU"
        fi
        ip -n "$(ns net)" link set "p$i" master br0 up
        ip -n "$s" addr add "10.99.0.$i/24" dev ctl
        ip -n "$s" link set ctl up
        quiet_offloads "$s" ctl
        mkdir -p "$SHM/s$i"
        ln -s "$SHM/s$i" "$STATE/s$i"
        config "$i" > "$STATE/s$i.toml"
    done
    # A spare station on the bridge (tests inject frames from it).
    ip netns add "$(ns x)"
    ip link add eth0 netns "$(ns x)" mtu "$MTU" type veth peer name px netns "$(ns net)" mtu "$MTU"
    ip -n "$(ns net)" link set px master br0 up
    ip -n "$(ns x)" link set eth0 up
    ip -n "$(ns x)" addr add 10.99.0.99/24 dev eth0
    # Client and server on either side of server 1.
    for end in client server; do
        ip netns add "$(ns $end)"
        ip -n "$(ns $end)" link set lo up
        # A quiet wire: no IPv6 router and neighbour chatter unless a test asks for IPv6.
        ip netns exec "$(ns $end)" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
            net.ipv6.conf.default.disable_ipv6=1
    done
    ip link add eth0 netns "$(ns client)" type veth peer name cin netns "$(ns s1)"
    ip link add eth0 netns "$(ns server)" type veth peer name sin netns "$(ns s1)"
    ip -n "$(ns client)" addr add 10.77.0.1/24 dev eth0
    ip -n "$(ns server)" addr add 10.77.0.2/24 dev eth0
    for pair in "client eth0" "server eth0" "s1 cin" "s1 sin"; do
        set -- $pair
        ip -n "$(ns "$1")" link set "$2" up
        quiet_offloads "$(ns "$1")" "$2"
    done
    if [ -n "$ETCD" ]; then start_etcd; fi
    [ $START = 1 ] || { echo "testbed $PREFIX: $SERVERS servers set up (not started); configs in $STATE"; return; }
    local order; order=$(seq 1 "$SERVERS")
    if [ -n "$ETCD" ] && [ "$SERVERS" -ge 2 ]; then
        # Server 2 first, elected before the others start: the coordinator is then not the
        # ingress server (drills kill the coordinator's server, never the ingress).
        start_server 2
        for _ in $(seq 100); do
            "$NFMGR" status --socket "$STATE/s2.sock" --json 2>/dev/null \
                | grep -q '"role": *"coordinator"' && break
            sleep 0.1
        done
        order=$(seq 1 "$SERVERS" | grep -vx 2)
    fi
    for i in $order; do start_server "$i"; done
    # Wait for the cluster: every server alive in the coordinator's view, with its vswitch
    # and runtimes (a member's endpoints may come a heartbeat after its join, later still
    # over an impaired link).
    for _ in $(seq 200); do
        alive=$("$NFMGR" status --socket "$STATE/s1.sock" --json 2>/dev/null \
            | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for s in d["servers"] if s["alive"] and s["endpoints"] >= 1 + int(sys.argv[1])))' "$RUNTIMES" 2>/dev/null || echo 0)
        if [ "$alive" = "$SERVERS" ]; then
            echo "testbed $PREFIX: $SERVERS servers up, cluster formed; configs and logs in $STATE"
            return
        fi
        sleep 0.1
    done
    for i in $(seq 1 "$SERVERS"); do echo "--- s$i log"; tail -20 "$STATE/s$i.log"; done >&2
    die "the cluster did not form within 20 s"
}

case "$cmd" in
    up) up ;;
    down) down; rm -rf "$STATE" "$SHM"; echo "testbed $PREFIX: down" ;;
    status) exec "$NFMGR" status --socket "$STATE/s1.sock" ;;
    exec)
        [ -n "$EXEC_SERVER" ] || die "exec SERVER CMD..."
        exec ip netns exec "$(ns "s$EXEC_SERVER")" "${EXEC_ARGS[@]}" ;;
    *) sed -n '2,25p' "$0"; exit 2 ;;
esac
