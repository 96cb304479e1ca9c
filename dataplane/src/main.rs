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

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;

use meshwire_dataplane::admin::LogControl;
use meshwire_dataplane::app::{Drained, Proxy, cli};
use meshwire_dataplane::config::Config;

fn main() -> ExitCode {
    let config = match cli::load_config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let logging = cli::init_logging(&config);
    cli::return_freed_memory();
    match run(config, logging) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the proxy on a multi-thread runtime until SIGTERM, SIGINT or `/quitquitquit`, then drains.
fn run(config: Config, logging: LogControl) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("ztunnel-worker")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))?;
    runtime.block_on(async {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            worker_threads = config.worker_threads,
            "starting"
        );
        let proxy = Proxy::start_with_logging(config, Some(logging)).await?;
        cli::wait_for_shutdown(proxy.shutdown_trigger()).await?;
        match proxy.drain().await {
            Drained::Complete => tracing::info!("drained: every connection ended"),
            Drained::DeadlineReached => tracing::warn!("drain deadline reached: closing remaining connections"),
        }
        Ok(())
    })
}
