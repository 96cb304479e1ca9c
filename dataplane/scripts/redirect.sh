#!/usr/bin/env bash
# Redirects a workload's TCP traffic to the meshwire proxy with iptables (nat table, REDIRECT), as
# ztunnel's in-pod rules do:
#
#   OUTPUT      TCP -> REDIRECT to the outbound capture port (15001), except packets carrying the
#               proxy's mark (its own upstream connections), traffic leaving through loopback, and
#               connections to the proxy's own ports or to excluded ports;
#   PREROUTING  TCP -> REDIRECT to the inbound plaintext port (15006), except HBONE (15008), packets
#               carrying the mark, traffic arriving on loopback, and excluded ports.
#
# The rules live in two chains of their own (MESHWIRE_OUTPUT, MESHWIRE_PREROUTING) with one jump each
# from OUTPUT and PREROUTING, so `up` can be run again (it rewrites them) and `down` removes exactly
# them. Run it in the workload's network namespace (--netns NAME, or inside it). Needs root (or
# CAP_NET_ADMIN) and iptables (the nft backend is fine).
#
# The proxy must mark its upstream connections with the same mark (ztunnel's 0x539 by default; see
# `ztunnel --help`, --packet-mark), or its own connections are captured again.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: redirect.sh up|down|show [options]

Commands:
  up      install (or rewrite) the redirection rules
  down    remove them (nothing to remove is not an error)
  show    print the rules of the meshwire chains

Options:
  --netns NAME          apply in the network namespace NAME (ip netns exec NAME ...)
  --outbound-port PORT  outbound capture port of the proxy (default 15001)
  --inbound-port PORT   inbound plaintext port of the proxy (default 15006)
  --hbone-port PORT     inbound HBONE port, never redirected (default 15008)
  --proxy-ports LIST    the proxy's own ports, never redirected outbound (comma-separated;
                        default 15001,15006,15008,15080,15053,15021,15000,15020)
  --mark MARK           packet mark of the proxy's own traffic, decimal or 0x hex (default 0x539)
  --exclude-ports LIST  destination ports left alone both ways (comma-separated; default none)
  --ipv6                also apply with ip6tables
  -h, --help            this help
EOF
}

die() {
  echo "redirect.sh: $*" >&2
  exit 2
}

OUT_CHAIN=MESHWIRE_OUTPUT
IN_CHAIN=MESHWIRE_PREROUTING

command=""
netns=""
outbound_port=15001
inbound_port=15006
hbone_port=15008
proxy_ports=""
mark=0x539
exclude_ports=""
ipv6=false

while [ $# -gt 0 ]; do
  case "$1" in
    up | down | show)
      [ -z "$command" ] || die "two commands given: $command and $1"
      command="$1"
      ;;
    --netns | --outbound-port | --inbound-port | --hbone-port | --proxy-ports | --mark | --exclude-ports)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --netns) netns="$2" ;;
        --outbound-port) outbound_port="$2" ;;
        --inbound-port) inbound_port="$2" ;;
        --hbone-port) hbone_port="$2" ;;
        --proxy-ports) proxy_ports="$2" ;;
        --mark) mark="$2" ;;
        --exclude-ports) exclude_ports="$2" ;;
      esac
      shift
      ;;
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

check_port() { # NAME VALUE
  [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] && [ "$2" -le 65535 ] ||
    die "invalid $1 \"$2\": expected a port between 1 and 65535"
}
check_port_list() { # NAME LIST
  local port
  [ -n "$2" ] || return 0
  IFS=',' read -r -a ports <<<"$2"
  [ "${#ports[@]}" -gt 0 ] || die "invalid $1 \"$2\": expected ports separated by commas"
  for port in "${ports[@]}"; do
    check_port "$1" "$port"
  done
}
check_port --outbound-port "$outbound_port"
check_port --inbound-port "$inbound_port"
check_port --hbone-port "$hbone_port"
[ -n "$proxy_ports" ] || proxy_ports="$outbound_port,$inbound_port,$hbone_port,15080,15053,15021,15000,15020"
check_port_list --proxy-ports "$proxy_ports"
check_port_list --exclude-ports "$exclude_ports"
if [[ "$mark" =~ ^0[xX][0-9a-fA-F]{1,8}$ ]] || [[ "$mark" =~ ^[0-9]+$ ]]; then
  [ $((mark)) -ge 1 ] && [ $((mark)) -le 4294967295 ] ||
    die "invalid --mark \"$mark\": expected a mark between 1 and 0xffffffff"
else
  die "invalid --mark \"$mark\": expected a number, decimal or 0x hex"
fi
mark=$(printf '0x%x' $((mark)))

if [ -n "$netns" ]; then
  command -v ip >/dev/null || die "ip (iproute2) is not installed; it is needed for --netns"
  ip netns list | awk '{print $1}' | grep -qxF -- "$netns" ||
    die "network namespace \"$netns\" does not exist (ip netns list)"
fi
tools=(iptables)
[ "$ipv6" = false ] || tools+=(ip6tables)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install iptables)"
done

# Runs a command, in the namespace if one is given.
in_ns() {
  if [ -n "$netns" ]; then
    ip netns exec "$netns" "$@"
  else
    "$@"
  fi
}

# Runs an iptables command that must succeed; on failure names it and shows its error.
must() {
  local output
  if ! output=$(in_ns "$@" 2>&1); then
    echo "redirect.sh: failed${netns:+ in network namespace $netns}: $*" >&2
    [ -z "$output" ] || echo "$output" >&2
    [ "$(id -u)" -eq 0 ] || echo "redirect.sh: changing iptables rules needs root (CAP_NET_ADMIN)" >&2
    exit 1
  fi
}

# Whether an iptables command succeeds (for -C and -L checks).
quietly() {
  in_ns "$@" >/dev/null 2>&1
}

up() { # TOOL
  local ipt="$1" port
  for chain in "$OUT_CHAIN" "$IN_CHAIN"; do
    quietly "$ipt" -w -t nat -L "$chain" -n || must "$ipt" -w -t nat -N "$chain"
    must "$ipt" -w -t nat -F "$chain"
  done

  must "$ipt" -w -t nat -A "$OUT_CHAIN" -m mark --mark "$mark" -j RETURN
  must "$ipt" -w -t nat -A "$OUT_CHAIN" -o lo -j RETURN
  IFS=',' read -r -a ports <<<"$proxy_ports${exclude_ports:+,$exclude_ports}"
  for port in "${ports[@]}"; do
    must "$ipt" -w -t nat -A "$OUT_CHAIN" -p tcp --dport "$port" -j RETURN
  done
  must "$ipt" -w -t nat -A "$OUT_CHAIN" -p tcp -j REDIRECT --to-ports "$outbound_port"

  must "$ipt" -w -t nat -A "$IN_CHAIN" -m mark --mark "$mark" -j RETURN
  must "$ipt" -w -t nat -A "$IN_CHAIN" -i lo -j RETURN
  IFS=',' read -r -a ports <<<"$hbone_port${exclude_ports:+,$exclude_ports}"
  for port in "${ports[@]}"; do
    must "$ipt" -w -t nat -A "$IN_CHAIN" -p tcp --dport "$port" -j RETURN
  done
  must "$ipt" -w -t nat -A "$IN_CHAIN" -p tcp -j REDIRECT --to-ports "$inbound_port"

  quietly "$ipt" -w -t nat -C OUTPUT -p tcp -j "$OUT_CHAIN" ||
    must "$ipt" -w -t nat -A OUTPUT -p tcp -j "$OUT_CHAIN"
  quietly "$ipt" -w -t nat -C PREROUTING -p tcp -j "$IN_CHAIN" ||
    must "$ipt" -w -t nat -A PREROUTING -p tcp -j "$IN_CHAIN"
}

down() { # TOOL
  local ipt="$1"
  while quietly "$ipt" -w -t nat -C OUTPUT -p tcp -j "$OUT_CHAIN"; do
    must "$ipt" -w -t nat -D OUTPUT -p tcp -j "$OUT_CHAIN"
  done
  while quietly "$ipt" -w -t nat -C PREROUTING -p tcp -j "$IN_CHAIN"; do
    must "$ipt" -w -t nat -D PREROUTING -p tcp -j "$IN_CHAIN"
  done
  for chain in "$OUT_CHAIN" "$IN_CHAIN"; do
    if quietly "$ipt" -w -t nat -L "$chain" -n; then
      must "$ipt" -w -t nat -F "$chain"
      must "$ipt" -w -t nat -X "$chain"
    fi
  done
}

show() { # TOOL
  local ipt="$1"
  for chain in OUTPUT PREROUTING "$OUT_CHAIN" "$IN_CHAIN"; do
    quietly "$ipt" -w -t nat -L "$chain" -n || continue
    in_ns "$ipt" -w -t nat -S "$chain" | grep -e "MESHWIRE" || true
  done
}

for tool in "${tools[@]}"; do
  "$command" "$tool"
done
case "$command" in
  up) echo "redirect.sh: TCP redirected${netns:+ in $netns}: outbound -> $outbound_port, inbound -> $inbound_port (mark $mark skipped)" ;;
  down) echo "redirect.sh: redirection removed${netns:+ in $netns}" ;;
esac
