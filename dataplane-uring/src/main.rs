//! `ztunnel-uring`: meshwire's node proxy on glommio, thread-per-core io_uring.
//!
//! The same configuration, flags, listeners, behaviour, metrics, admin and access logs as
//! `ztunnel` (see its `--help`); the data path runs on one glommio executor per core, pinned, with
//! listeners per core (see [`meshwire_dataplane_uring::proxy`]). `--worker-threads` (or
//! `ZTUNNEL_WORKER_THREADS`) sets the number of executors; the default is one per CPU of the
//! process's CPU set.
//!
//! Exit status: as `ztunnel` (0 after a drain, 2 for an invalid command line or environment, 1 when
//! the proxy cannot start), and 1 when io_uring cannot be used here (the message names the cause
//! and points to `ztunnel`) or when a core stops unexpectedly (after draining the others).

use std::process::ExitCode;

use meshwire_dataplane::admin::LogControl;
use meshwire_dataplane::app::cli;
use meshwire_dataplane::config::Config;
use meshwire_dataplane_uring::preflight;
use meshwire_dataplane_uring::proxy::{Error, UringProxy};

fn main() -> ExitCode {
    cli::main(run)
}

/// Checks that io_uring can serve, places the executors, and runs the proxy with the control plane
/// on this thread until SIGTERM, SIGINT or `/quitquitquit`, then drains.
fn run(config: Config, logging: LogControl) -> anyhow::Result<ExitCode> {
    preflight::check().map_err(Error::Unavailable)?;
    let cpus = preflight::cpus().map_err(|e| anyhow::anyhow!("cannot read the process's CPU set: {e}"))?;
    let count = if config.worker_threads_given {
        config.worker_threads
    } else {
        cpus.len()
    };
    if count > cpus.len() {
        tracing::warn!(
            executors = count,
            cpus = cpus.len(),
            "more executors than CPUs in the process's CPU set: some share a CPU"
        );
    }
    let placement = preflight::placement(&cpus, count);
    let runtime =
        cli::control_runtime().map_err(|e| anyhow::anyhow!("cannot start the control thread's runtime: {e}"))?;
    runtime.block_on(async {
        // ztunnel's first line, which scripts read the version from.
        tracing::info!("version: {}", meshwire_dataplane::config::BuildInfo::current());
        tracing::info!(executors = count, "starting");
        let mut proxy = UringProxy::start(config, Some(logging), placement).await?;
        let code = tokio::select! {
            stop = cli::wait_for_shutdown(proxy.shutdown_trigger()) => {
                stop?;
                ExitCode::SUCCESS
            }
            core = proxy.core_stopped() => {
                tracing::error!(core, "a core stopped unexpectedly: draining the others and exiting");
                ExitCode::FAILURE
            }
        };
        proxy.drain().await;
        Ok(code)
    })
}
