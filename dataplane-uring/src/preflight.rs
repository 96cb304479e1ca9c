//! What the io_uring build checks before it starts its executors, so that a machine where it
//! cannot run gets a message naming the cause (and pointing to `ztunnel`, the tokio build) instead
//! of a hang or a panic: the CPUs it may run on, the locked-memory limit glommio needs, whether
//! io_uring is turned off, and the classification of the errors an executor fails to start with.

use std::fmt;
use std::io;

use rustix::process::{Resource, getrlimit};

/// The locked-memory limit (`RLIMIT_MEMLOCK`) glommio requires of the process before it creates an
/// executor's rings: 512 KiB.
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Why io_uring cannot serve the proxy here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unavailable {
    /// The locked-memory limit is below what glommio needs.
    MemlockLimit {
        /// The limit, in bytes.
        limit: u64,
        /// What glommio needs, in bytes.
        needed: u64,
    },
    /// The `kernel.io_uring_disabled` sysctl turns io_uring off for this process.
    Disabled {
        /// Its value (1: only for members of `kernel.io_uring_group`; 2: for everyone).
        value: u8,
    },
    /// The kernel has no io_uring (`ENOSYS`).
    NotSupported,
    /// Creating a ring is refused (`EPERM`): a seccomp filter (container runtimes' default
    /// profiles block io_uring), or the `kernel.io_uring_disabled` sysctl.
    Blocked,
    /// The kernel cannot allocate the rings (`ENOMEM`): usually the locked-memory limit.
    OutOfMemory,
    /// An executor could not be started for another reason.
    Executor {
        /// The core's index.
        core: usize,
        /// The CPU it was to be pinned to.
        cpu: usize,
        /// What failed.
        error: String,
    },
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::MemlockLimit { limit, needed } => write!(
                f,
                "the locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`) is {} KiB and glommio needs at least {} KiB \
                 (raise it: `ulimit -l`, systemd's LimitMEMLOCK=, or the container's memlock ulimit)",
                limit / 1024,
                needed / 1024
            ),
            Unavailable::Disabled { value } => write!(
                f,
                "io_uring is turned off by the sysctl kernel.io_uring_disabled = {value}{}",
                if *value == 1 {
                    " (allowed only for members of kernel.io_uring_group)"
                } else {
                    ""
                }
            ),
            Unavailable::NotSupported => f.write_str("this kernel has no io_uring (io_uring_setup: ENOSYS)"),
            Unavailable::Blocked => f.write_str(
                "creating an io_uring is not permitted (EPERM): a seccomp filter (container runtimes' default \
                 profiles block io_uring) or the sysctl kernel.io_uring_disabled",
            ),
            Unavailable::OutOfMemory => f.write_str(
                "the kernel cannot allocate io_uring rings (ENOMEM): raise the locked-memory limit (`ulimit -l`)",
            ),
            Unavailable::Executor { core, cpu, error } => {
                write!(f, "cannot start the executor of core {core} (CPU {cpu}): {error}")
            }
        }
    }
}

impl std::error::Error for Unavailable {}

impl Unavailable {
    /// The error an executor failed to start with, classified: the locked-memory check of glommio,
    /// `ENOSYS`, `EPERM` and `ENOMEM` from the ring's creation, or anything else as
    /// [`Unavailable::Executor`].
    pub fn classify(core: usize, cpu: usize, error: glommio::GlommioError<()>) -> Unavailable {
        use glommio::{GlommioError, ReactorErrorKind};
        let errno = match &error {
            GlommioError::IoError(e) | GlommioError::EnhancedIoError { source: e, .. } => e.raw_os_error(),
            _ => None,
        };
        match (error, errno.map(rustix::io::Errno::from_raw_os_error)) {
            (GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(limit, needed)), _) => {
                Unavailable::MemlockLimit { limit, needed }
            }
            (_, Some(rustix::io::Errno::NOSYS)) => Unavailable::NotSupported,
            (_, Some(rustix::io::Errno::PERM)) => Unavailable::Blocked,
            (_, Some(rustix::io::Errno::NOMEM)) => Unavailable::OutOfMemory,
            (other, _) => Unavailable::Executor {
                core,
                cpu,
                error: other.to_string(),
            },
        }
    }
}

/// Checks what can be checked before an executor is made: the locked-memory limit and the
/// `kernel.io_uring_disabled` sysctl (value 2 turns io_uring off for everyone; with 1, only an
/// attempt tells, so it is left to the executors).
pub fn check() -> Result<(), Unavailable> {
    check_memlock(getrlimit(Resource::Memlock).current)?;
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(text) if text.trim() == "2" => Err(Unavailable::Disabled { value: 2 }),
        _ => Ok(()),
    }
}

/// [`Unavailable::MemlockLimit`] when `limit` (bytes; `None`: unlimited) is below [`MIN_MEMLOCK`].
pub fn check_memlock(limit: Option<u64>) -> Result<(), Unavailable> {
    match limit {
        Some(limit) if limit < MIN_MEMLOCK => Err(Unavailable::MemlockLimit {
            limit,
            needed: MIN_MEMLOCK,
        }),
        _ => Ok(()),
    }
}

/// The CPUs of the process's CPU set (`sched_getaffinity`), in order.
pub fn cpus() -> io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// The CPU each of `count` executors is pinned to: the CPUs of `cpus` in order, starting over when
/// there are more executors than CPUs (several executors then share a CPU).
pub fn placement(cpus: &[usize], count: usize) -> Vec<usize> {
    if cpus.is_empty() {
        return vec![0; count];
    }
    (0..count).map(|i| cpus[i % cpus.len()]).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn memlock_below_glommios_minimum_is_named() {
        let err = check_memlock(Some(64 * 1024)).unwrap_err();
        assert_eq!(
            err,
            Unavailable::MemlockLimit {
                limit: 64 * 1024,
                needed: MIN_MEMLOCK
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("64 KiB") && text.contains("512 KiB") && text.contains("ulimit -l"),
            "{text}"
        );
        assert!(check_memlock(Some(MIN_MEMLOCK)).is_ok());
        assert!(check_memlock(None).is_ok());
    }

    #[test]
    fn placement_wraps_over_the_cpu_set() {
        assert_eq!(placement(&[2, 5], 3), vec![2, 5, 2]);
        assert_eq!(placement(&[0, 1], 1), vec![0]);
        assert_eq!(placement(&[], 2), vec![0, 0]);
    }

    #[test]
    fn the_cpu_set_is_not_empty() {
        let cpus = cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.len() <= std::thread::available_parallelism().map_or(usize::MAX, usize::from));
    }

    #[test]
    fn glommio_errors_are_classified() {
        let memlock = glommio::GlommioError::<()>::ReactorError(glommio::ReactorErrorKind::MemLockLimit(1, 2));
        assert_eq!(
            Unavailable::classify(0, 0, memlock),
            Unavailable::MemlockLimit { limit: 1, needed: 2 }
        );
        let eperm =
            glommio::GlommioError::<()>::IoError(io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error()));
        assert_eq!(Unavailable::classify(0, 0, eperm), Unavailable::Blocked);
        let enosys =
            glommio::GlommioError::<()>::IoError(io::Error::from_raw_os_error(rustix::io::Errno::NOSYS.raw_os_error()));
        assert_eq!(Unavailable::classify(0, 0, enosys), Unavailable::NotSupported);
    }
}
