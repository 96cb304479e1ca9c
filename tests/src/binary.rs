//! The proxy binaries under test.

use std::fmt;
use std::path::{Path, PathBuf};

/// A proxy binary: its name and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binary {
    name: &'static str,
    path: PathBuf,
}

/// The names of the proxy binaries every scenario runs against.
pub const NAMES: &[&str] = &["ztunnel"];

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

    /// Its name (`ztunnel`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
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
