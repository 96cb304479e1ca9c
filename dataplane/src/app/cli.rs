//! What both binaries' `main` does around the proxy ([`main`]): reading the configuration with
//! ztunnel's exit codes, installing the log subscriber whose filter `/logging` changes, building the control
//! thread's runtime, and waiting for the signal to drain.

use std::process::ExitCode;

use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::admin::{LogControl, ShutdownTrigger};
use crate::config::{Config, Error as ConfigError, LogFormat};
use crate::telemetry::accesslog;
use crate::telemetry::layout::LogLayout;

/// jemalloc, the allocator of both binaries (of every program linking this library with the
/// `jemalloc` feature): large buffers freed and allocated again at a high rate (the data path's
/// copy buffers and HBONE frames) stay mapped, where glibc's malloc gives them back to the kernel
/// and faults them in again. [`return_freed_memory`] sets how it returns memory.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A binary's `main`: reads the configuration ([`load_config`]; exits with its code when there is
/// none), installs the log subscriber ([`init_logging`]), lets jemalloc return freed memory
/// ([`return_freed_memory`]), and runs `run`; an error is printed on stderr and exits 1.
pub fn main<E: std::fmt::Display>(run: impl FnOnce(Config, LogControl) -> Result<ExitCode, E>) -> ExitCode {
    let config = match load_config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let logging = init_logging(&config);
    return_freed_memory();
    match run(config, logging) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

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
/// through the returned handle, and format, in ztunnel's layout ([`LogLayout`]: tab-separated text or
/// JSON), on stdout as ztunnel writes them (errors that stop the start go to stderr); then warns of the ztunnel variables that are set but not supported.
pub fn init_logging(config: &Config) -> LogControl {
    let (filter, level) = match EnvFilter::try_new(&config.log_level) {
        Ok(filter) => (filter, config.log_level.clone()),
        Err(err) => {
            eprintln!("warning: invalid log level {:?} ({err}): using info", config.log_level);
            (EnvFilter::new("info"), "info".to_owned())
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    let layout = LogLayout::new(match config.log_format {
        LogFormat::Json => accesslog::LogFormat::Json,
        LogFormat::Text => accesslog::LogFormat::Text,
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .event_format(layout)
        .fmt_fields(layout);
    Registry::default().with(filter).with(fmt).init();
    for name in &config.ignored_env {
        tracing::warn!(
            variable = name,
            "ztunnel environment variable not supported by meshwire: ignored"
        );
    }
    LogControl::new(handle, level)
}

/// The runtime of the control thread (configuration, certificates, readiness, admin, metrics):
/// tokio's current-thread runtime, with IO and time, for the calling thread to `block_on`.
pub fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .thread_name("ztunnel-control")
        .on_thread_park(super::thread_cache::on_park)
        .enable_all()
        .build()
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

/// How long jemalloc keeps pages freed and unused before giving them back to the kernel, in
/// milliseconds (its own default is 10 s): the memory of a burst of connections returns within a
/// few seconds of their end. Pages reused sooner, as under load, are not affected.
pub const ALLOCATOR_DECAY_MS: isize = 1000;

/// Lets jemalloc (the binaries' allocator) give freed memory back to the kernel on its own: its
/// background threads purge the pages left unused for [`ALLOCATOR_DECAY_MS`] (`dirty_decay_ms`;
/// purged for good at once, `muzzy_decay_ms` 0), so the memory of connections that closed
/// returns even when nothing is allocated afterwards (without them, jemalloc purges only on its
/// allocation path). jemalloc's own configuration (`_RJEM_MALLOC_CONF`), when set, is left as it
/// is. Call once, at the start of `main`; without the `jemalloc` feature it does nothing.
pub fn return_freed_memory() {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{Access, AsName};

        if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
            tracing::warn!(error = %e, "cannot start jemalloc's background threads: freed memory returns to the kernel only as memory is allocated again");
        }
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return;
        }
        // The default of arenas made later, then every arena made already (those not made yet
        // answer an error).
        let mut names = vec![
            ("arenas.muzzy_decay_ms\0".to_owned(), 0),
            ("arenas.dirty_decay_ms\0".to_owned(), ALLOCATOR_DECAY_MS),
        ];
        let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
        for i in 0..arenas {
            names.push((format!("arena.{i}.muzzy_decay_ms\0"), 0));
            names.push((format!("arena.{i}.dirty_decay_ms\0"), ALLOCATOR_DECAY_MS));
        }
        for (name, value) in &names {
            let key = name.as_str().name();
            if Access::<isize>::read(key).is_ok()
                && let Err(e) = Access::<isize>::write(key, *value)
            {
                tracing::warn!(error = %e, setting = name.trim_end_matches('\0'), "cannot set how soon jemalloc returns freed memory");
            }
        }
    }
}

#[cfg(all(test, feature = "jemalloc"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use tikv_jemalloc_ctl::{Access, AsName};

    /// The allocator of the binaries gives back pages a second after they are left unused, in
    /// arenas made before and after the setting, unless jemalloc's own configuration is set.
    #[test]
    fn freed_memory_returns_within_the_decay_time() {
        let read = |name: &str| Access::<isize>::read(name.name());
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return;
        }
        super::return_freed_memory();
        assert_eq!(read("arenas.dirty_decay_ms\0").unwrap(), super::ALLOCATOR_DECAY_MS);
        assert_eq!(read("arenas.muzzy_decay_ms\0").unwrap(), 0);
        assert_eq!(read("arena.0.dirty_decay_ms\0").unwrap(), super::ALLOCATOR_DECAY_MS);
        assert_eq!(read("arena.0.muzzy_decay_ms\0").unwrap(), 0);
        assert!(tikv_jemalloc_ctl::background_thread::read().unwrap());
        // An arena made afterwards takes the new default.
        let made = Access::<u32>::read("arenas.create\0".name()).unwrap();
        let name = format!("arena.{made}.dirty_decay_ms\0");
        assert_eq!(read(&name).unwrap(), super::ALLOCATOR_DECAY_MS);
    }
}
