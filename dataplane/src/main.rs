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

use meshwire_dataplane::admin::{LogControl, ShutdownTrigger};
use meshwire_dataplane::app::{Drained, Proxy};
use meshwire_dataplane::config::{Config, Error as ConfigError, LogFormat};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

fn main() -> ExitCode {
    let config = match Config::from_process().and_then(|c| c.check_files().map(|()| c)) {
        Ok(config) => config,
        Err(err) if err.is_help() => {
            print!("{err}");
            return ExitCode::SUCCESS;
        }
        Err(ConfigError::Cli { message, .. }) => {
            eprint!("{message}");
            return ExitCode::from(2);
        }
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let logging = init_logging(&config);
    for name in &config.ignored_env {
        tracing::warn!(
            variable = name,
            "ztunnel environment variable not supported by meshwire: ignored"
        );
    }
    match run(config, logging) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the `tracing` subscriber: the configured filter (`RUST_LOG` syntax), replaceable at runtime
/// through the returned handle, and format, on stderr.
fn init_logging(config: &Config) -> LogControl {
    let (filter, level) = match EnvFilter::try_new(&config.log_level) {
        Ok(filter) => (filter, config.log_level.clone()),
        Err(err) => {
            eprintln!("warning: invalid log level {:?} ({err}): using info", config.log_level);
            (EnvFilter::new("info"), "info".to_owned())
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = Registry::default().with(filter);
    match config.log_format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        _ => registry.with(fmt).init(),
    }
    LogControl::new(handle, level)
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
        wait_for_shutdown(proxy.shutdown_trigger()).await?;
        match proxy.drain().await {
            Drained::Complete => tracing::info!("drained: every connection ended"),
            Drained::DeadlineReached => tracing::warn!("drain deadline reached: closing remaining connections"),
        }
        Ok(())
    })
}

/// Resolves on the first SIGTERM or SIGINT, or when `/quitquitquit` pulls `trigger`.
async fn wait_for_shutdown(trigger: ShutdownTrigger) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| anyhow::anyhow!("cannot listen for SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| anyhow::anyhow!("cannot listen for SIGINT: {e}"))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        reason = trigger.triggered() => tracing::info!(%reason, "shutdown asked for"),
    }
    Ok(())
}
