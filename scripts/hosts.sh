#!/usr/bin/env bash
# Test hosts on this machine, for trying braid across hosts by hand (the
# tests make their own with braid_tests::hosts). As root:
#
#   scripts/hosts.sh up 3      # hosts braid-host-0..2 at 10.231.0.1..3
#   scripts/hosts.sh run 1 braid start --address 10.231.0.1:PORT --token T --host 10.231.0.2
#   scripts/hosts.sh down      # kills what runs on them, removes them
#
# Each host is a network namespace on the bridge `bbhosts` with a private
# /tmp and /dev/shm (a mount namespace held by a keeper process) and its
# own host name. Traffic stays on the bridge: this machine has no address
# on the hosts' subnet.
set -euo pipefail
SUBNET=10.231.0
BRIDGE=bbhosts
STATE=/run/braid-hosts
keeper() { cat "$STATE/keeper-$1"; }
case "${1:-}" in
up)
    n=${2:-2}
    mkdir -p "$STATE"
    ip link add "$BRIDGE" type bridge
    ip link set "$BRIDGE" up
    for ((i = 0; i < n; i++)); do
        ns=braid-host-$i
        ip netns add "$ns"
        ip link add "bvhosts$i" type veth peer name "bnhosts$i"
        ip link set "bnhosts$i" netns "$ns"
        ip -n "$ns" link set "bnhosts$i" name eth0
        ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        ip link set "bvhosts$i" master "$BRIDGE" up
        ip netns exec "$ns" unshare --mount --uts --propagation private sh -c \
            "mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /dev/shm && hostname $ns && exec sleep infinity" &
        echo $! > "$STATE/keeper-$i"
        echo "$ns: $SUBNET.$((i + 1))"
    done
    ;;
run)
    i=$2
    shift 2
    exec nsenter --target "$(keeper "$i")" --mount --net --uts -- "$@"
    ;;
down)
    for f in "$STATE"/keeper-*; do
        [ -e "$f" ] || continue
        i=${f##*-}
        for pid in $(ip netns pids "braid-host-$i"); do kill -9 "$pid" 2>/dev/null || true; done
        ip link del "bvhosts$i" 2>/dev/null || true
        ip netns del "braid-host-$i" 2>/dev/null || true
        rm -f "$f"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up [N] | run I COMMAND… | down" >&2
    exit 2
    ;;
esac
