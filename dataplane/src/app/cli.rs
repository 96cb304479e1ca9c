//! What both binaries' `main` does around the proxy: reading the configuration with ztunnel's
//! exit codes, installing the log subscriber whose filter `/logging` changes, and waiting for the
//! signal to drain.

use std::process::ExitCode;

use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::admin::{LogControl, ShutdownTrigger};
use crate::config::{Config, Error as ConfigError, LogFormat};

/// The configuration from the process's arguments and environment, with its files checked; or the
/// exit code after printing why not: 0 for `--help` and `--version` (printed on stdout), 2 for an
/// invalid command line or environment (the error on stderr).
pub fn load_config() -> Result<Config, ExitCode> {
    match Config::from_process().and_then(|c| c.check_files().map(|()| c)) {
        Ok(config) => Ok(config),
        Err(err) if err.is_help() => {
            print!("{err}");
            Err(ExitCode::SUCCESS)
        }
        Err(ConfigError::Cli { message, .. }) => {
            eprint!("{message}");
            Err(ExitCode::from(2))
        }
        Err(err) => {
            eprintln!("error: {err}");
            Err(ExitCode::from(2))
        }
    }
}

/// Installs the `tracing` subscriber: the configured filter (`RUST_LOG` syntax), replaceable at runtime
/// through the returned handle, and format, on stderr; then warns of the ztunnel variables that are
/// set but not supported.
pub fn init_logging(config: &Config) -> LogControl {
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
    for name in &config.ignored_env {
        tracing::warn!(
            variable = name,
            "ztunnel environment variable not supported by meshwire: ignored"
        );
    }
    LogControl::new(handle, level)
}

/// Resolves on the first SIGTERM or SIGINT, or when `/quitquitquit` pulls `trigger`. Call inside a
/// tokio runtime with IO enabled.
pub async fn wait_for_shutdown(trigger: ShutdownTrigger) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen for SIGINT: {e}")))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        reason = trigger.triggered() => tracing::info!(%reason, "shutdown asked for"),
    }
    Ok(())
}

/// Lets jemalloc (the binaries' allocator) give freed memory back to the kernel on its own: its
/// background threads purge the pages freed more than about ten seconds ago (jemalloc's
/// `dirty_decay_ms`), so the memory of connections that closed returns even when nothing is
/// allocated afterwards (without them, jemalloc purges only on its allocation path). Call once, at
/// the start of `main`; without the `jemalloc` feature it does nothing.
pub fn return_freed_memory() {
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start jemalloc's background threads: freed memory returns to the kernel only as memory is allocated again");
    }
}
