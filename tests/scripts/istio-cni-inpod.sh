#!/usr/bin/env bash
# The redirection istio-cni installs inside an ambient pod's network namespace (in-pod mode), for the
# tests' pods (network namespaces made by the tests): the same chains, marks and routes, so that a
# node proxy's per-pod listeners are exercised as in a cluster.
#
#   mangle PREROUTING -> ISTIO_PRERT
#     mark 0x539/0xfff (the proxy's own packets)     -> connmark 0x111/0xfff
#     from 169.254.7.127 (kubelet probes, SNATed)    -> ACCEPT
#     TCP to 15008, not the proxy's mark             -> TPROXY to 15008, mark 0x111/0xfff
#     TCP RELATED,ESTABLISHED                        -> ACCEPT
#     TCP not to 127.0.0.1, not the proxy's mark     -> TPROXY to 15006, mark 0x111/0xfff
#   mangle OUTPUT -> ISTIO_OUTPUT
#     connmark 0x111/0xfff                           -> restore the mark (replies of tproxied flows)
#   nat OUTPUT -> ISTIO_OUTPUT
#     to 169.254.7.127                               -> ACCEPT
#     UDP to port 53 not via lo (with --dns)         -> REDIRECT to 15053
#     TCP with mark 0x111/0xfff                      -> ACCEPT
#     TCP not to 127.0.0.1, not the proxy's mark     -> REDIRECT to 15001
#   routing: fwmark 0x111/0xfff -> table 100 (pref 32764): local 0.0.0.0/0 dev lo
#
# Inbound is TPROXY, not REDIRECT: the proxy's 15006 and 15008 listeners must set IP_TRANSPARENT, and
# an accepted connection's local address is the address the client dialled. Outbound is REDIRECT:
# SO_ORIGINAL_DST gives it. The proxy marks its sockets with 0x539 so that none of it is captured.
#
# Usage: istio-cni-inpod.sh up|down|show --netns NAME [--mark MARK] [--dns] [--ipv6]
set -euo pipefail

TPROXY_MARK=0x111/0xfff
ROUTE_TABLE=100
RULE_PREF=32764
PROBE_SNAT_V4=169.254.7.127
PROBE_SNAT_V6=fd16:9254:7127:1337:ffff:ffff:ffff:ffff

usage() {
  cat <<'EOF'
Usage: istio-cni-inpod.sh up|down|show --netns NAME [options]

Commands:
  up      install istio-cni's in-pod rules and routes in the namespace (rewritten if present)
  down    remove them (nothing to remove is not an error)
  show    print them

Options:
  --netns NAME   the pod's network namespace (required)
  --mark MARK    the proxy's packet mark, decimal or 0x hex (default 0x539; matched under 0xfff)
  --dns          also redirect UDP DNS (port 53) to the proxy's 15053
  --ipv6         also apply with ip6tables
  -h, --help     this help
EOF
}

die() {
  echo "istio-cni-inpod.sh: $*" >&2
  exit 2
}

command=""
netns=""
mark=0x539
dns=false
ipv6=false
while [ $# -gt 0 ]; do
  case "$1" in
    up | down | show)
      [ -z "$command" ] || die "two commands given: $command and $1"
      command="$1"
      ;;
    --netns | --mark)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --netns) netns="$2" ;;
        --mark) mark="$2" ;;
      esac
      shift
      ;;
    --dns) dns=true ;;
    --ipv6) ipv6=true ;;
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
[ -n "$command" ] || {
  usage >&2
  die "no command: expected up, down or show"
}
[ -n "$netns" ] || die "--netns is required: istio-cni's rules live in a pod's own namespace"
if [[ "$mark" =~ ^0[xX][0-9a-fA-F]{1,8}$ ]] || [[ "$mark" =~ ^[0-9]+$ ]]; then
  [ $((mark)) -ge 1 ] && [ $((mark)) -le 4294967295 ] ||
    die "invalid --mark \"$mark\": expected a mark between 1 and 0xffffffff"
else
  die "invalid --mark \"$mark\": expected a number, decimal or 0x hex"
fi
proxy_mark="$(printf '0x%x' $((mark)))/0xfff"

command -v ip >/dev/null || die "ip (iproute2) is not installed"
ip netns list | awk '{print $1}' | grep -qxF -- "$netns" ||
  die "network namespace \"$netns\" does not exist (ip netns list)"
tools=(iptables)
[ "$ipv6" = false ] || tools+=(ip6tables)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install iptables)"
done

in_ns() { ip netns exec "$netns" "$@"; }

must() {
  local output
  if ! output=$(in_ns "$@" 2>&1); then
    echo "istio-cni-inpod.sh: failed in network namespace $netns: $*" >&2
    [ -z "$output" ] || echo "$output" >&2
    exit 1
  fi
}

quietly() { in_ns "$@" >/dev/null 2>&1; }

# Creates (or empties) CHAIN in TABLE and jumps to it from HOOK once.
chain() { # TOOL TABLE HOOK CHAIN
  local ipt="$1" table="$2" hook="$3" name="$4"
  quietly "$ipt" -w -t "$table" -L "$name" -n || must "$ipt" -w -t "$table" -N "$name"
  must "$ipt" -w -t "$table" -F "$name"
  quietly "$ipt" -w -t "$table" -C "$hook" -j "$name" || must "$ipt" -w -t "$table" -A "$hook" -j "$name"
}

unchain() { # TOOL TABLE HOOK CHAIN
  local ipt="$1" table="$2" hook="$3" name="$4"
  while quietly "$ipt" -w -t "$table" -C "$hook" -j "$name"; do
    must "$ipt" -w -t "$table" -D "$hook" -j "$name"
  done
  if quietly "$ipt" -w -t "$table" -L "$name" -n; then
    must "$ipt" -w -t "$table" -F "$name"
    must "$ipt" -w -t "$table" -X "$name"
  fi
}

up() { # TOOL
  local ipt="$1" family=-4 probe="$PROBE_SNAT_V4" loopback=127.0.0.1/32 any=0.0.0.0/0
  if [ "$ipt" = ip6tables ]; then
    family=-6 probe="$PROBE_SNAT_V6" loopback=::1/128 any=::/0
  fi
  chain "$ipt" mangle PREROUTING ISTIO_PRERT
  chain "$ipt" mangle OUTPUT ISTIO_OUTPUT
  chain "$ipt" nat OUTPUT ISTIO_OUTPUT

  must "$ipt" -w -t mangle -A ISTIO_PRERT -m mark --mark "$proxy_mark" -j CONNMARK --set-xmark "$TPROXY_MARK"
  must "$ipt" -w -t mangle -A ISTIO_PRERT -s "$probe" -p tcp -m tcp -j ACCEPT
  must "$ipt" -w -t mangle -A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark "$proxy_mark" \
    -j TPROXY --on-port 15008 --tproxy-mark "$TPROXY_MARK"
  must "$ipt" -w -t mangle -A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  must "$ipt" -w -t mangle -A ISTIO_PRERT ! -d "$loopback" -p tcp -m mark ! --mark "$proxy_mark" \
    -j TPROXY --on-port 15006 --tproxy-mark "$TPROXY_MARK"
  must "$ipt" -w -t mangle -A ISTIO_OUTPUT -m connmark --mark "$TPROXY_MARK" \
    -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff

  must "$ipt" -w -t nat -A ISTIO_OUTPUT -d "$probe" -p tcp -m tcp -j ACCEPT
  if [ "$dns" = true ]; then
    must "$ipt" -w -t nat -A ISTIO_OUTPUT ! -o lo -p udp -m udp --dport 53 -j REDIRECT --to-port 15053
  fi
  must "$ipt" -w -t nat -A ISTIO_OUTPUT -p tcp -m mark --mark "$TPROXY_MARK" -j ACCEPT
  must "$ipt" -w -t nat -A ISTIO_OUTPUT ! -d "$loopback" -p tcp -m mark ! --mark "$proxy_mark" \
    -j REDIRECT --to-ports 15001

  quietly ip "$family" rule del fwmark "$TPROXY_MARK" pref "$RULE_PREF" lookup "$ROUTE_TABLE" || true
  must ip "$family" rule add fwmark "$TPROXY_MARK" pref "$RULE_PREF" lookup "$ROUTE_TABLE"
  must ip "$family" route replace local "$any" dev lo table "$ROUTE_TABLE"
}

down() { # TOOL
  local ipt="$1" family=-4 any=0.0.0.0/0
  [ "$ipt" != ip6tables ] || family=-6 any=::/0
  unchain "$ipt" mangle PREROUTING ISTIO_PRERT
  unchain "$ipt" mangle OUTPUT ISTIO_OUTPUT
  unchain "$ipt" nat OUTPUT ISTIO_OUTPUT
  while quietly ip "$family" rule del fwmark "$TPROXY_MARK" pref "$RULE_PREF" lookup "$ROUTE_TABLE"; do :; done
  quietly ip "$family" route del local "$any" dev lo table "$ROUTE_TABLE" || true
}

show() { # TOOL
  local ipt="$1" family=-4
  [ "$ipt" != ip6tables ] || family=-6
  echo "== $ipt in $netns"
  for spec in "mangle ISTIO_PRERT" "mangle ISTIO_OUTPUT" "nat ISTIO_OUTPUT"; do
    read -r table name <<<"$spec"
    quietly "$ipt" -w -t "$table" -S "$name" && in_ns "$ipt" -w -t "$table" -S "$name"
  done
  in_ns ip "$family" rule show pref "$RULE_PREF"
  in_ns ip "$family" route show table "$ROUTE_TABLE" 2>/dev/null || true
}

for tool in "${tools[@]}"; do
  "$command" "$tool"
done
