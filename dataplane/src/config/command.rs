//! Every option, in the order of `--help`, and the command line made of them. The options themselves
//! are defined next to what they set, in the sibling modules.

use clap::{Arg, Command};

use super::options::Opt;
use super::{hbone, identity, istio, listeners, mode, runtime};

/// Every option, in the order of `--help` and of the flags table of the [module documentation](super).
pub(super) const OPTS: &[&Opt] = &[
    &mode::CONFIG,
    &mode::MODE,
    &mode::WORKLOAD,
    &mode::NODE_NAME,
    &mode::INPOD,
    &mode::INPOD_SOCKET,
    &mode::INPOD_PORT_REUSE,
    &mode::INSTANCE_IP,
    &mode::CLUSTER_ID,
    &mode::CLUSTER_DOMAIN,
    &identity::TRUST_DOMAIN,
    &mode::NETWORK,
    &identity::STATE_DIR,
    &identity::CERT_CHAIN,
    &identity::CERT_KEY,
    &identity::TRUST_BUNDLE,
    &identity::CERT_TTL,
    &istio::XDS_ADDRESS,
    &istio::XDS_ROOT_CA,
    &istio::ALT_XDS_HOSTNAME,
    &istio::CA_ADDRESS,
    &istio::CA_ROOT_CA,
    &istio::ALT_CA_HOSTNAME,
    &istio::AUTH_TOKEN,
    &istio::POD_NAME,
    &istio::POD_NAMESPACE,
    &istio::SERVICE_ACCOUNT,
    &listeners::BIND_ADDRESS,
    &listeners::IPV6,
    &listeners::INBOUND_PORT,
    &listeners::INBOUND_PLAINTEXT_PORT,
    &listeners::OUTBOUND_PORT,
    &listeners::SOCKS5,
    &listeners::SOCKS5_PORT,
    &listeners::SOCKS5_ADDRESS,
    &listeners::DNS_PROXY,
    &listeners::DNS_PORT,
    &listeners::DNS_ADDRESS,
    &listeners::DNS_RESOLV_CONF,
    &listeners::DNS_UPSTREAM_TIMEOUT,
    &listeners::DNS_FORWARD_LIMIT,
    &listeners::DNS_TCP_CONNECTIONS,
    &listeners::DNS_PREFERRED_NAMESPACE,
    &listeners::READINESS_PORT,
    &listeners::ADMIN_PORT,
    &listeners::ADMIN_ADDRESS,
    &listeners::METRICS_PORT,
    &hbone::HTTP2_STREAM_WINDOW,
    &hbone::HTTP2_CONNECTION_WINDOW,
    &hbone::HTTP2_FRAME_SIZE,
    &hbone::HBONE_STREAM_SEND_BUFFER,
    &hbone::HBONE_CONNECTION_BUFFER,
    &hbone::HBONE_BUFFER_BUDGET,
    &hbone::HBONE_RECEIVE_BUDGET,
    &hbone::POOL_MAX_STREAMS,
    &hbone::POOL_UNUSED_RELEASE_TIMEOUT,
    &hbone::POOL_SURPLUS_RELEASE_TIMEOUT,
    &hbone::POOL_RESPONSE_TIMEOUT,
    &hbone::POOL_PROBE_TIMEOUT,
    &runtime::WORKER_THREADS,
    &runtime::DRAIN_DEADLINE,
    &runtime::HANDOVER,
    &runtime::LOG_FORMAT,
    &runtime::LOG_LEVEL,
    &runtime::PACKET_MARK,
    &runtime::ORIGINAL_SOURCE,
    &runtime::CONNECTION_BALANCE,
    &runtime::XDS_PRIORITY,
    &runtime::XDS_CPU_SHARE,
];

/// The command line: every option in [`OPTS`], plus the positional words Istio passes.
pub(super) fn command() -> Command {
    let cmd = Command::new("ztunnel")
        .version(concat!(env!("CARGO_PKG_VERSION"), " (meshwire)"))
        .about("meshwire: a ztunnel-compatible node proxy")
        .long_about(
            "meshwire: a ztunnel-compatible node proxy.\n\nEvery flag can also be set through the environment \
             variables listed with it; a flag wins over its variables, the first variable listed wins over \
             the others, and an empty variable counts as unset.",
        )
        .arg(
            Arg::new("command")
                .value_name("COMMAND")
                .value_parser(["proxy", "version"])
                .help("proxy (the default) runs the proxy; version prints ztunnel's build-info line"),
        )
        .arg(
            Arg::new("proxy-type")
                .value_name("PROXY_TYPE")
                .help("Accepted and ignored, as by ztunnel (Istio runs `ztunnel proxy ztunnel`)"),
        );
    OPTS.iter().fold(cmd, |cmd, opt| cmd.arg(opt.arg()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_on_the_command_line() {
        let cmd = command();
        for opt in OPTS {
            assert!(cmd.get_arguments().any(|a| a.get_id() == opt.id()), "{}", opt.flag);
            assert!(opt.flag.starts_with("--"), "{}", opt.flag);
        }
    }
}
