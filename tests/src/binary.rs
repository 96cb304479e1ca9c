//! The proxy binaries under test.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A proxy binary: its name and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    name: &'static str,
    path: PathBuf,
}

/// The names of the proxy binaries every scenario runs against.
pub const NAMES: &[&str] = &["ztunnel", "ztunnel-uring"];

/// The environment variables the proxies read that a developer's shell might set: removed so that
/// only what a test passes applies.
const CLEARED_ENV: &[&str] = &[
    "RUST_LOG",
    "LOCAL_XDS_PATH",
    "LOCAL_XDS",
    "PROXY_MODE",
    "PROXY_WORKLOAD_INFO",
    "MESHWIRE_STATE_DIR",
    "STATE_DIRECTORY",
    "LOG_FORMAT",
    "NODE_NAME",
    "INSTANCE_IP",
    "PACKET_MARK",
];

/// Removes from `cmd`'s environment the variables the proxies read (`RUST_LOG`, `LOCAL_XDS_PATH`, ...).
pub fn clear_env(cmd: &mut Command) -> &mut Command {
    for name in CLEARED_ENV {
        cmd.env_remove(name);
    }
    cmd
}

impl Binary {
    /// The binary called `name` in the binary directory ([`bin_dir`]). Panics with a message saying
    /// how to build it when it is missing.
    pub fn named(name: &'static str) -> Binary {
        let path = bin_dir().join(name);
        assert!(
            path.is_file(),
            "{} is missing: build the proxies first (`cargo build --workspace --bins`; `cargo test --workspace` \
             builds them) or point MESHWIRE_BIN_DIR at their directory",
            path.display()
        );
        Binary { name, path }
    }

    /// The tokio build, `ztunnel`.
    pub fn ztunnel() -> Binary {
        Binary::named("ztunnel")
    }

    /// The io_uring build, `ztunnel-uring`.
    pub fn ztunnel_uring() -> Binary {
        Binary::named("ztunnel-uring")
    }

    /// Its name (`ztunnel`, `ztunnel-uring`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command running it with only the arguments a test adds (and none of the environment
    /// variables it reads), for checks of its command line.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        clear_env(&mut cmd);
        cmd
    }
}

impl fmt::Display for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Every proxy binary of [`NAMES`].
pub fn all() -> Vec<Binary> {
    NAMES.iter().map(|name| Binary::named(name)).collect()
}

/// Every ordered pair of binaries (client side, server side), mixed pairs included.
pub fn pairs() -> Vec<(Binary, Binary)> {
    let all = all();
    all.iter()
        .flat_map(|a| all.iter().map(move |b| (a.clone(), b.clone())))
        .collect()
}

/// The directory of the proxy binaries: `MESHWIRE_BIN_DIR`, or the profile directory of the target
/// dir this test executable runs from (`target/debug/deps/<test>` -> `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHWIRE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}
