#!/usr/bin/env bash
# Two "hosts" on one machine: two network namespaces joined by a veth pair, each end shaped to
# 1 Gbit/s with `tc qdisc ... tbf`, and one torchrun agent in each (--nnodes 2, one rank per
# host, Gloo bound to the veth with GLOO_SOCKET_IFNAME). Removes the namespaces when done, however
# it ends. The ranks share this machine's cores and filesystem: only their network is split.
#
#   benchmarks/cluster.sh --check                  # can it run here? (root, ip, tc, namespaces)
#   benchmarks/cluster.sh -m launcher my.yaml      # everything after is torchrun's target and its args
#
# Environment: PYTHON (default .venv/bin/python, else python3), CLUSTER_RATE (default 1gbit),
# CLUSTER_STATS (a file to write {"tx_bytes": [host 0, host 1]}: bytes each veth sent, headers included).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RATE="${CLUSTER_RATE:-1gbit}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
TAG="mlpp$$"
NS=("${TAG}h0" "${TAG}h1")
DEV=("${TAG}v0" "${TAG}v1")
ADDR=("10.213.0.1" "10.213.0.2")
PORT=29500

die() { echo "cluster.sh: $*" >&2; exit 1; }

check() {
    [[ "$(id -u)" == 0 ]] || die "must run as root: it creates network namespaces and a veth pair (run with sudo)"
    command -v ip >/dev/null || die "no 'ip' command (install iproute2)"
    command -v tc >/dev/null || die "no 'tc' command (install iproute2)"
    local probe="${TAG}probe" ns pid
    for ns in $(ip netns list 2>/dev/null | grep -o '^mlpp[0-9]*h[01]'); do  # left by a SIGKILLed run
        pid="${ns#mlpp}"; pid="${pid%h[01]}"
        kill -0 "$pid" 2>/dev/null || ip netns del "$ns" 2>/dev/null
    done
    if ! err=$(ip netns add "$probe" 2>&1); then
        die "cannot create a network namespace here ($err); a container needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
    fi
    ip netns del "$probe"
}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
}

setup() {
    ip netns add "${NS[0]}" && ip netns add "${NS[1]}" \
        && ip link add "${DEV[0]}" type veth peer name "${DEV[1]}" || die "cannot create the namespaces or the veth pair"
    for i in 0 1; do
        ip link set "${DEV[$i]}" netns "${NS[$i]}" \
            && ip -n "${NS[$i]}" addr add "${ADDR[$i]}/24" dev "${DEV[$i]}" \
            && ip -n "${NS[$i]}" link set "${DEV[$i]}" up \
            && ip -n "${NS[$i]}" link set lo up \
            && tc -n "${NS[$i]}" qdisc add dev "${DEV[$i]}" root tbf rate "$RATE" burst 256kb latency 50ms \
            || die "cannot configure ${DEV[$i]} in ${NS[$i]}"
    done
}

tx_bytes() { ip netns exec "${NS[$1]}" cat "/sys/class/net/${DEV[$1]}/statistics/tx_bytes"; }

if [[ "${1:-}" == "--check" ]]; then check; echo "cluster.sh: ok (root, ip, tc, network namespaces)"; exit 0; fi
[[ $# -gt 0 ]] || die "usage: $0 --check | $0 TORCHRUN_TARGET [ARGS...]  (e.g. $0 -m launcher my.yaml)"
check
trap cleanup EXIT
trap 'exit 130' INT TERM
setup

for i in 0 1; do
    ip netns exec "${NS[$i]}" env GLOO_SOCKET_IFNAME="${DEV[$i]}" "$PYTHON" -m torch.distributed.run \
        --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint "${ADDR[0]}:$PORT" \
        --rdzv-id "$TAG" --rdzv-conf "is_host=$([[ $i == 0 ]] && echo true || echo false)" \
        --local-addr "${ADDR[$i]}" "$@" &
    pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid"; code=$?
    (( code > rc )) && rc=$code
done
pids=()
if [[ -n "${CLUSTER_STATS:-}" ]]; then
    printf '{"tx_bytes": [%s, %s], "rate": "%s"}\n' "$(tx_bytes 0)" "$(tx_bytes 1)" "$RATE" > "$CLUSTER_STATS"
fi
exit "$rc"
