//! `ztunnel`: meshwire's node proxy on tokio.
//!
//! Reads its configuration from flags and ztunnel's environment variables (see `--help`), serves the
//! inbound HBONE, inbound plaintext, outbound capture, SOCKS5, readiness, admin and metrics listeners
//! (see [`meshwire_dataplane::app`]), and drains on SIGTERM, SIGINT or `POST /quitquitquit` on the
//! admin listener: it stops accepting, asks HBONE connections to finish, waits up to the drain
//! deadline, and exits 0. The admin `/logging` endpoint changes the log filter at runtime.
//!
//! Exit status: 0 after a drain (or for `--help`/`--version`), 2 for an invalid command line or
//! environment, 1 when the proxy cannot start (invalid local configuration, unusable certificate
//! source, an explicit packet mark that cannot be set, a listener that cannot be bound).

use std::process::ExitCode;

use meshwire_dataplane::admin::LogControl;
use meshwire_dataplane::app::{Proxy, cli, thread_cache};
use meshwire_dataplane::config::Config;

fn main() -> ExitCode {
    cli::main(run)
}

/// Runs the proxy until SIGTERM, SIGINT or `/quitquitquit`, then drains: the data path on a
/// multi-thread runtime, the control plane (configuration, certificates, admin, metrics) on this
/// thread, as the io_uring build does.
fn run(config: Config, logging: LogControl) -> anyhow::Result<ExitCode> {
    let data = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("ztunnel-worker")
        .on_thread_park(thread_cache::on_park)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))?;
    let control =
        cli::control_runtime().map_err(|e| anyhow::anyhow!("cannot start the control thread's runtime: {e}"))?;
    control.block_on(async {
        // ztunnel's first line, which scripts read the version from.
        tracing::info!("version: {}", meshwire_dataplane::config::BuildInfo::current());
        tracing::info!(worker_threads = config.worker_threads, "starting");
        let proxy = Proxy::start_on(config, Some(logging), data.handle().clone()).await?;
        cli::wait_for_shutdown(proxy.shutdown_trigger()).await?;
        proxy.drain().await;
        Ok(ExitCode::SUCCESS)
    })
}
