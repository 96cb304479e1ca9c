#!/usr/bin/env bash
# In-pod mode on one machine, step by step, without Kubernetes: what istio-cni and ztunnel do for
# two ambient pods on a node, with network namespaces as the pods.
#
#   1. two pods: network namespaces a (10.44.0.1) and b (10.44.0.2) joined by a veth pair;
#   2. istio-cni's rules inside each pod (tests/scripts/istio-cni-inpod.sh): the pod's outbound TCP
#      is redirected to 15001, its inbound TCP sent to 15006 and 15008 by TPROXY;
#   3. pod b's application: an HTTP server on 8080;
#   4. the mesh's local configuration: workloads a and b (service accounts a and b) on node "demo";
#   5. an istio-cni stand-in (scripts/inpod-istio-cni.py, Python 3 only) listening on a Unix
#      SOCK_SEQPACKET socket, which hands both pods (their network namespaces) to the proxy;
#   6. ztunnel in in-pod mode (--inpod): it opens each pod's listeners inside the pod's namespace;
#   7. pod a calls pod b (curl from inside a): captured in a, carried over HBONE (mTLS with each
#      pod's own identity) to b's 15008, delivered inside b;
#   8. the access log lines of that connection, one per side.
#
# Everything is removed at the end (also on failure or Ctrl-C). Needs root, ip (iproute2), iptables
# and python3; curl is used when there (python3 otherwise).
#
# Usage: scripts/inpod-demo.sh [--binary PATH] [--readiness-port N] [--admin-port N] [--metrics-port N]
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: scripts/inpod-demo.sh [options]

Runs in-pod mode on this machine: two pods (network namespaces) with istio-cni's rules, an
istio-cni stand-in handing them to ztunnel, and a request from pod a to pod b through the mesh.
Removes everything it made when it ends. Needs root, iproute2, iptables and python3.

Options:
  --binary PATH         the ztunnel binary (default: target/debug/ztunnel, else target/release/ztunnel,
                        under CARGO_TARGET_DIR if set)
  --readiness-port N    the proxy's readiness port on 127.0.0.1 (default 15021)
  --admin-port N        the proxy's admin port on 127.0.0.1 (default 15000)
  --metrics-port N      the proxy's metrics port on 127.0.0.1 (default 15020)
  -h, --help            this help
EOF
}

die() {
  echo "inpod-demo.sh: $*" >&2
  exit 2
}

binary=""
readiness_port=15021
admin_port=15000
metrics_port=15020
while [ $# -gt 0 ]; do
  case "$1" in
    --binary | --readiness-port | --admin-port | --metrics-port)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --binary) binary="$2" ;;
        --readiness-port) readiness_port="$2" ;;
        --admin-port) admin_port="$2" ;;
        --metrics-port) metrics_port="$2" ;;
      esac
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      die "unknown argument: $1"
      ;;
  esac
  shift
done
for port in "$readiness_port" "$admin_port" "$metrics_port"; do
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "invalid port \"$port\""
done
if [ -z "$binary" ]; then
  target="${CARGO_TARGET_DIR:-$repo/target}"
  for candidate in "$target/debug/ztunnel" "$target/release/ztunnel"; do
    if [ -x "$candidate" ]; then
      binary="$candidate"
      break
    fi
  done
  [ -n "$binary" ] || die "no ztunnel binary under $target: build it (cargo build -p meshwire-dataplane --bins) or pass --binary PATH"
fi
[ -x "$binary" ] || die "--binary $binary is not an executable file"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, veth, iptables)"
for tool in ip iptables python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

step() { printf '\n== %s\n' "$*"; }

# Fetches URL (from inside network namespace NS when given) and prints the body; fails on an error
# status.
fetch() { # URL [NS]
  local url="$1" ns="${2:-}" run=()
  [ -z "$ns" ] || run=(ip netns exec "$ns")
  if command -v curl >/dev/null; then
    "${run[@]}" curl -sS -f --max-time 10 "$url"
  else
    "${run[@]}" python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "$url"
  fi
}

work="$(mktemp -d -t inpod-demo.XXXXXX)"
ns_a="inpod-demo-$$-a"
ns_b="inpod-demo-$$-b"
a_ip=10.44.0.1
b_ip=10.44.0.2
pids=()

cleanup() {
  local status=$?
  set +e
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null
  done
  for ns in "$ns_a" "$ns_b"; do
    ip netns delete "$ns" 2>/dev/null
  done
  rm -rf "$work"
  if [ "$status" -eq 0 ]; then
    printf '\n== done: namespaces %s and %s, the proxy and the stand-ins are gone\n' "$ns_a" "$ns_b"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Prints the logs and fails.
fail() {
  echo "inpod-demo.sh: $*" >&2
  for log in "$work"/*.log; do
    [ -f "$log" ] || continue
    echo "--- $(basename "$log")" >&2
    cat "$log" >&2
  done
  exit 1
}

step "1. two pods: network namespaces $ns_a ($a_ip) and $ns_b ($b_ip), joined by a veth pair"
ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add eth0 netns "$ns_a" type veth peer name eth0 netns "$ns_b"
for pod in "$ns_a $a_ip" "$ns_b $b_ip"; do
  read -r ns addr <<<"$pod"
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
done

step "2. istio-cni's rules inside each pod (tests/scripts/istio-cni-inpod.sh)"
for ns in "$ns_a" "$ns_b"; do
  "$repo/tests/scripts/istio-cni-inpod.sh" up --netns "$ns"
done
"$repo/tests/scripts/istio-cni-inpod.sh" show --netns "$ns_a"

step "3. pod b's application: an HTTP server on 8080"
cat >"$work/server.py" <<'EOF'
import http.server, sys

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from pod b (the connection came from %s)\n" % self.client_address[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
EOF
ip netns exec "$ns_b" python3 "$work/server.py" >"$work/server.log" 2>&1 &
pids+=($!)
echo "python3 $work/server.py in $ns_b"

step "4. the mesh's local configuration: workloads a and b on node demo"
cat >"$work/mesh.yaml" <<EOF
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: a, workloadIps: ["$a_ip"], protocol: HBONE, node: demo}
- {uid: b, name: b, namespace: default, serviceAccount: b, workloadIps: ["$b_ip"], protocol: HBONE, node: demo}
EOF
cat "$work/mesh.yaml"

step "5. istio-cni's stand-in on $work/ztunnel.sock (scripts/inpod-istio-cni.py)"
python3 -u "$repo/scripts/inpod-istio-cni.py" --socket "$work/ztunnel.sock" \
  --pod "uid-a=/run/netns/$ns_a,a,default,a" \
  --pod "uid-b=/run/netns/$ns_b,b,default,b" >"$work/istio-cni.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  [ -S "$work/ztunnel.sock" ] && break
  sleep 0.1
done
[ -S "$work/ztunnel.sock" ] || fail "the istio-cni stand-in did not listen"

step "6. ztunnel in in-pod mode ($binary)"
proxy=("$binary" --inpod --inpod-socket "$work/ztunnel.sock" --config "$work/mesh.yaml"
  --state-dir "$work/state" --node-name demo --bind-address 127.0.0.1
  --readiness-port "$readiness_port" --admin-port "$admin_port" --metrics-port "$metrics_port"
  --socks5 false --dns-proxy false --log-level info)
echo "${proxy[*]}"
env -u RUST_LOG -u LOCAL_XDS -u LOCAL_XDS_PATH "${proxy[@]}" >"$work/ztunnel.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
ready=false
for _ in $(seq 600); do
  kill -0 "$proxy_pid" 2>/dev/null || fail "ztunnel exited"
  if fetch "http://127.0.0.1:$readiness_port/healthz/ready" >/dev/null 2>&1; then
    ready=true
    break
  fi
  sleep 0.1
done
[ "$ready" = true ] || fail "ztunnel was not ready within 60 s"
sed 's/^/  /' "$work/istio-cni.log"
echo "ready: http://127.0.0.1:$readiness_port/healthz/ready answers 200"
grep -F "serving the pod in its network namespace" "$work/ztunnel.log" | sed 's/^/  /' || true

step "7. pod a calls pod b: ip netns exec $ns_a curl http://$b_ip:8080/"
answer="$(fetch "http://$b_ip:8080/" "$ns_a")" || fail "pod a could not reach pod b"
echo "$answer"
echo "(the proxy connects to the application from inside pod b, from b's own address: README, \"In-pod mode\")"

step "8. the access log: one line per side, with both pods' identities"
lines=""
for _ in $(seq 100); do
  lines="$(grep -E 'direction="(outbound|inbound)"' "$work/ztunnel.log" || true)"
  [ "$(printf '%s\n' "$lines" | grep -c direction=)" -ge 2 ] && break
  sleep 0.1
done
[ -n "$lines" ] || fail "no access log line"
echo "$lines"
