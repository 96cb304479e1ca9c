//! The C API from C and Python: test programs in `tests/c/` compiled with the system C compiler
//! against `libmeshwire.so` (and `libmeshwire.a`), run with real sockets on 127.0.0.1 and real
//! local-CA certificates in a temporary directory; the C round trip also under valgrind; the
//! Python `ctypes` example. Clients and servers written with the hbone crate face the C ones.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use meshwire_hbone::client::{self, ConnectRequest};
use meshwire_hbone::{ConnectError, Settings};
use meshwire_identity::id::TrustDomain;
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_rt::TokioTimer;
use meshwire_testkit::net::echo_hbone_server;
use meshwire_testkit::pki::{client_config, id, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one C program may run before the test kills it and fails.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(120);
/// Set to 1 to skip the valgrind run on a machine without valgrind (it fails otherwise).
const SKIP_VALGRIND: &str = "MESHWIRE_SKIP_VALGRIND";

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding `libmeshwire.so` and `libmeshwire.a`: cargo builds them with the test
/// (they are crate types of the package) into the test binary's `deps` directory, and copies them to
/// its parent when the library is built on its own (`cargo build -p meshwire-ffi`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let candidates = [deps.clone(), deps.parent().unwrap().to_path_buf()];
    candidates
        .iter()
        .find(|dir| dir.join("libmeshwire.so").is_file() && dir.join("libmeshwire.a").is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libmeshwire.so and libmeshwire.a are in neither {} nor {}",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    Shared,
    Static,
}

/// Compiles `tests/c/<name>.c` into `out_dir` with the system C compiler, warnings as errors.
fn compile(name: &str, out_dir: &Path, link: Link) -> PathBuf {
    let lib = lib_dir();
    let exe = out_dir.join(match link {
        Link::Shared => name.to_owned(),
        Link::Static => format!("{name}-static"),
    });
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args([
        "-std=c11",
        "-D_DEFAULT_SOURCE",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-g",
        "-O1",
        "-pthread",
    ])
    .arg("-I")
    .arg(crate_dir().join("include"))
    .arg(crate_dir().join("tests/c").join(format!("{name}.c")))
    .arg("-o")
    .arg(&exe);
    match link {
        Link::Shared => {
            cc.arg("-L")
                .arg(&lib)
                .arg("-lmeshwire")
                .arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        Link::Static => {
            cc.arg(lib.join("libmeshwire.a")).args(["-lpthread", "-ldl", "-lm"]);
        }
    }
    let out = cc.output().expect("the system C compiler `cc` runs");
    assert!(
        out.status.success(),
        "compiling {name}.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a command to completion, killing it after `PROGRAM_TIMEOUT`.
fn run(mut cmd: Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PROGRAM_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {PROGRAM_TIMEOUT:?}");
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn c_program_creates_contexts_serves_dials_exchanges_and_frees() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile("roundtrip", dir.path(), Link::Shared);
    let mut cmd = Command::new(&exe);
    cmd.arg(dir.path().join("ca"));
    let out = run(cmd);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("roundtrip: ok"),
        "{}",
        describe(&out)
    );
}

#[test]
fn c_program_under_valgrind_leaks_nothing() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        if std::env::var(SKIP_VALGRIND).is_ok_and(|v| v == "1") {
            eprintln!("valgrind is not installed; skipped because {SKIP_VALGRIND}=1");
            return;
        }
        panic!("valgrind is not installed: install it (apt-get install valgrind), or set {SKIP_VALGRIND}=1 to skip");
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = compile("roundtrip", dir.path(), Link::Shared);
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--error-exitcode=99",
        "--num-callers=40",
    ])
    .arg(format!(
        "--suppressions={}",
        crate_dir().join("tests/valgrind.supp").display()
    ))
    .arg(&exe)
    .arg(dir.path().join("ca"));
    let out = run(cmd);
    assert!(
        out.status.success(),
        "valgrind found errors or leaks (exit 99) or the program failed:\n{}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("definitely lost: 0 bytes") || stderr.contains("All heap blocks were freed"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// The C client against a server written with the hbone crate, and the other way round.
// ---------------------------------------------------------------------------------------------

const SERVER_ID: &str = "spiffe://cluster.local/ns/test/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/test/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_client_against_an_hbone_crate_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = LocalCa::load_or_create(&ca_dir, TrustDomain::new("cluster.local").unwrap()).unwrap();
    let (addr, handler) = echo_hbone_server(server_config(&ca, SERVER_ID)).await;

    for link in [Link::Shared, Link::Static] {
        let out_dir = dir.path().to_owned();
        let ca_dir = ca_dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            let exe = compile("client", &out_dir, link);
            let mut cmd = Command::new(exe);
            cmd.arg(&ca_dir)
                .arg(CLIENT_ID)
                .arg(addr.to_string())
                .arg("10.0.0.7:8080")
                .arg(SERVER_ID);
            run(cmd)
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("client: ok"),
            "{}",
            describe(&out)
        );
    }
    let seen = handler.requests.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for request in seen.iter() {
        assert_eq!(request.peer, id(CLIENT_ID));
        assert_eq!(request.authority.to_string(), "10.0.0.7:8080");
        let baggage = request.metadata.baggage.as_ref().expect("the C client sent baggage");
        assert_eq!(baggage.namespace_name.as_deref(), Some("test"));
    }
}

/// Opens a tunnel to the C server as `client_id`.
async fn open(ca: &LocalCa, port: u16, client_id: &str, authority: &str) -> Result<client::Tunnel, ConnectError> {
    let config = client_config(ca, client_id, SERVER_ID);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (conn, driver) = client::handshake(tcp, config, &Settings::default(), TokioTimer).await?;
    tokio::spawn(driver);
    let tunnel = conn.open(&ConnectRequest::new(authority.parse().unwrap())).await?;
    assert_eq!(tunnel.peer_identity(), &id(SERVER_ID));
    Ok(tunnel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_crate_client_against_the_c_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let out_dir = dir.path().to_owned();
    let exe = tokio::task::spawn_blocking(move || compile("server", &out_dir, Link::Shared))
        .await
        .unwrap();
    let mut child = Command::new(exe)
        .arg(&ca_dir)
        .arg(SERVER_ID)
        .arg(CLIENT_ID)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (port, stdout) = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let port: u16 = line
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the C server printed {line:?}, not its port"));
        (port, stdout)
    })
    .await
    .unwrap();
    // The C server created the CA in the directory; the client's certificate comes from the same root.
    let ca = LocalCa::load_or_create(&ca_dir, TrustDomain::new("cluster.local").unwrap()).unwrap();

    let mut tunnel = open(&ca, port, CLIENT_ID, "10.0.0.9:80").await.unwrap();
    let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut tunnel);
    let write = async {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut received = Vec::new();
    let read = r.read_to_end(&mut received);
    let (_, read) = tokio::join!(write, read);
    read.unwrap();
    assert!(received == sent, "{} bytes came back of {}", received.len(), sent.len());

    let refused = open(&ca, port, CLIENT_ID, "10.0.0.9:1").await.unwrap_err();
    assert_eq!(refused.status(), Some(http::StatusCode::UNAUTHORIZED), "{refused}");
    let stranger = open(&ca, port, "spiffe://cluster.local/ns/test/sa/stranger", "10.0.0.9:80")
        .await
        .unwrap_err();
    assert_eq!(stranger.status(), Some(http::StatusCode::FORBIDDEN), "{stranger}");

    drop(child.stdin.take());
    let out = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        let mut stdout = stdout;
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let out = child.wait_with_output().unwrap();
        (rest, out)
    })
    .await
    .unwrap();
    let (rest, out) = out;
    assert!(out.status.success(), "{}\n{rest}", describe(&out));
    assert!(rest.contains("server: accepted=1 refused=2"), "{rest}");
}

#[test]
fn python_ctypes_example_dials_and_echoes() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 is not installed: the ctypes example is not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(crate_dir().join("examples/echo.py"))
        .arg(lib_dir().join("libmeshwire.so"))
        .arg(dir.path().join("ca"));
    let out = run(cmd);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("echo: ok"),
        "{}",
        describe(&out)
    );
}
