#!/usr/bin/env bash
# The test command of meshwire: installs what the tests need on a fresh machine (idempotent), then
# runs the whole suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# --- what the tests need ------------------------------------------------------------------------
# Debian packages the test suite uses: iptables and iproute2 (ip netns) for the capture tests, which
# run the proxy in network namespaces behind dataplane/scripts/redirect.sh; gcc and valgrind for the
# C API's tests (ffi/tests/c_programs.rs compiles C programs and runs one under valgrind).
# g++ builds libFuzzer for the fuzz targets; make builds jemalloc, the binaries' allocator; util-linux
# has taskset and chrt, which the benchmark's smoke test uses (bench/tests).
APT_PACKAGES=(iptables iproute2 gcc g++ make valgrind util-linux)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup first" >&2; exit 1; }
for component in clippy rustfmt; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
# cargo-fuzz for the fuzz targets of fuzz/ (run on stable, without sanitizers: scripts/fuzz.sh).
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# --- checks and tests ---------------------------------------------------------------------------
echo "== rustls stays on ring: no aws-lc-rs in the dependency tree"
for manifest in Cargo.toml fuzz/Cargo.toml; do
  if cargo tree --manifest-path "$manifest" --workspace --all-features -i aws-lc-rs >/dev/null 2>&1; then
    cargo tree --manifest-path "$manifest" --workspace --all-features -i aws-lc-rs >&2
    echo "aws-lc-rs is in the dependency tree of $manifest" >&2
    exit 1
  fi
done

echo "== rustfmt"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== rustdoc: no broken or redundant links"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

echo "== loom model checks (identity: fetch de-duplication and certificate swap)"
cargo test --locked -p meshwire-identity --features loom --lib loom

echo "== cargo test --workspace"
cargo test --workspace --locked

echo "== fuzz targets: every one for ${FUZZ_SECONDS:-15} s, seeds first"
scripts/fuzz.sh
