//! The local configuration file as a careless or hostile writer leaves it, against both binaries: a
//! file rewritten in place is applied only once its writer closes it (a DENY policy never vanishes
//! while the writer pauses half-way); a file truncated to empty, or an empty file renamed into
//! place, is refused and the configuration in force stays; a file renamed into place applies. And
//! `/config_dump` of 10,000 workloads is streamed: dumping it does not raise the proxy's memory by
//! the size of the document. Files in ztunnel's format (its own `examples/localhost.yaml`, and one
//! with fields nobody knows) start both binaries; unknown fields are logged once per content applied.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::time::{Duration, Instant};

use meshwire_hbone::client::ConnectError;
use meshwire_testkit::http;
use meshwire_tests::binary::{self, Binary};
use meshwire_tests::hbone::{HboneClient, spiffe};
use meshwire_tests::mesh::{Mesh, Proxy};
use meshwire_tests::net::{self, EchoServer, lo};
use meshwire_tests::policy::{self, WORKLOAD};

/// A namespace DENY policy of `prod` for the identity `prod/<service_account>`.
fn deny(service_account: &str) -> String {
    policy::deny(
        &format!("deny-{service_account}"),
        &format!("principals: [!Exact cluster.local/ns/prod/sa/{service_account}]"),
    )
}

/// The workload with DENY policies for `denied`.
fn config(denied: &[&str]) -> String {
    let policies: Vec<String> = denied.iter().map(|sa| deny(sa)).collect();
    policy::config(&policies)
}

/// How long a whole-proxy change may take to show on a loaded machine.
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);

struct Server {
    mesh: Mesh,
    proxy: Proxy,
    echo: EchoServer,
}

impl Server {
    fn start(binary: &Binary, yaml: &str) -> Server {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(yaml);
        let proxy = policy::server_proxy(&mesh, binary);
        Server { mesh, proxy, echo }
    }

    /// Whether `prod/<service_account>` may reach the echo server: `true` on 200 (and the echo
    /// works), `false` on 401; anything else fails the test.
    fn allowed(&self, service_account: &str) -> bool {
        let client = HboneClient::new(
            self.mesh.ca(),
            &spiffe("prod", service_account),
            &[spiffe("prod", "server")],
        )
        .from_ip(lo(5));
        match client.open(self.proxy.ports().inbound, self.echo.addr()) {
            Ok(opened) => {
                let echoed = net::echo_exchange(opened.stream, 256).unwrap();
                assert!(echoed.intact(), "{service_account}: {echoed:?}");
                true
            }
            Err(ConnectError::Refused { status, .. }) if status.as_u16() == 401 => false,
            Err(other) => panic!("{service_account}: unexpected {other}\n{}", self.proxy.describe()),
        }
    }

    /// The body of `/config_dump`.
    fn dump(&self) -> String {
        let reply = http::request_blocking(self.proxy.ports().admin, "GET", "/config_dump")
            .unwrap_or_else(|e| panic!("/config_dump: {e}\n{}", self.proxy.describe()));
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body
    }

    /// The configuration generation `/config_dump` shows.
    fn generation(&self) -> u64 {
        generation_of(&self.dump())
    }

    /// Waits until `/config_dump` shows `generation`.
    fn wait_generation(&self, generation: u64) {
        let deadline = Instant::now() + CHANGE_DEADLINE;
        loop {
            let now = self.generation();
            if now == generation {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "generation {generation} not applied (at {now}):\n{}",
                self.proxy.describe()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many log lines report an empty configuration file.
    fn empty_errors(&self) -> usize {
        self.proxy
            .log_lines(&["\terror\t", "is empty; keeping the current configuration"])
            .len()
    }

    /// Waits until more than `before` log lines report an empty configuration file, checking all
    /// the while that the configuration in force stays at `generation`.
    fn wait_empty_error(&self, before: usize, generation: u64) {
        let deadline = Instant::now() + CHANGE_DEADLINE;
        while self.empty_errors() <= before {
            assert_eq!(
                self.generation(),
                generation,
                "the empty file was applied:\n{}",
                self.proxy.describe()
            );
            assert!(
                Instant::now() < deadline,
                "no error about the empty file:\n{}",
                self.proxy.describe()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `meshwire.config.generation` of a `/config_dump` body (pretty JSON; the only `generation` key).
fn generation_of(dump: &str) -> u64 {
    let at = dump.find("\"generation\": ").expect("a generation in the dump") + "\"generation\": ".len();
    let digits: String = dump[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a number")
}

#[test]
fn a_file_rewritten_in_place_applies_only_once_its_writer_closes_it() {
    for binary in binary::all() {
        let server = Server::start(&binary, &config(&["attacker"]));
        assert!(!server.allowed("attacker"), "{binary}");
        assert!(server.allowed("batch"), "{binary}");
        let generation = server.generation();

        // Truncated in place and written up to `policies:`, then held open for a while.
        let full = config(&["attacker", "batch"]);
        let cut = full.find("policies:").unwrap();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(server.mesh.config_path())
            .unwrap();
        file.write_all(&full.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        let pause = Instant::now() + Duration::from_millis(2_500);
        let mut checks = 0;
        // For the whole pause, and at least twice however slow a check is on a loaded machine.
        while Instant::now() < pause || checks < 2 {
            assert!(
                !server.allowed("attacker"),
                "{binary}: the DENY policy vanished while the file was half-written\n{}",
                server.proxy.describe()
            );
            assert_eq!(
                server.generation(),
                generation,
                "{binary}: a half-written file was applied"
            );
            checks += 1;
            std::thread::sleep(Duration::from_millis(100));
        }

        // The writer is done: the whole new file applies.
        file.write_all(&full.as_bytes()[cut..]).unwrap();
        drop(file);
        server.wait_generation(generation + 1);
        assert!(!server.allowed("attacker"), "{binary}");
        assert!(
            !server.allowed("batch"),
            "{binary}: the new DENY policy is not in force"
        );
        assert!(server.allowed("frontend"), "{binary}");
        assert!(
            server.proxy.log_lines(&["rejected an invalid change"]).is_empty(),
            "{binary}: {}",
            server.proxy.describe()
        );
    }
}

#[test]
fn an_empty_file_is_refused_and_the_configuration_in_force_stays() {
    for binary in binary::all() {
        let server = Server::start(&binary, &config(&["attacker"]));
        assert!(!server.allowed("attacker"), "{binary}");
        let generation = server.generation();

        // Truncated to empty in place.
        drop(std::fs::File::create(server.mesh.config_path()).unwrap());
        server.wait_empty_error(0, generation);
        assert_eq!(server.generation(), generation, "{binary}: the empty file was applied");
        assert!(!server.allowed("attacker"), "{binary}: the DENY policy vanished");
        assert!(server.dump().contains("cluster1//v1/Pod/prod/server"), "{binary}");

        // A valid change (so that the empty file that follows is a change too), then an empty file
        // renamed into place.
        server.mesh.write_config(&config(&["attacker", "frontend"]));
        server.wait_generation(generation + 1);
        let tmp = server.mesh.config_path().with_extension("empty");
        std::fs::write(&tmp, "").unwrap();
        std::fs::rename(&tmp, server.mesh.config_path()).unwrap();
        server.wait_empty_error(1, generation + 1);
        assert_eq!(
            server.generation(),
            generation + 1,
            "{binary}: the empty file was applied"
        );
        assert!(!server.allowed("attacker"), "{binary}: the DENY policy vanished");
        assert!(!server.allowed("frontend"), "{binary}: the DENY policy vanished");

        // A valid file renamed into place still applies.
        server.mesh.write_config(&config(&["attacker", "batch"]));
        server.wait_generation(generation + 2);
        assert!(!server.allowed("batch"), "{binary}");
        assert!(server.allowed("frontend"), "{binary}");
    }
}

#[test]
fn a_file_renamed_into_place_applies() {
    for binary in binary::all() {
        let server = Server::start(&binary, &config(&["attacker"]));
        assert!(server.allowed("batch"), "{binary}");
        let generation = server.generation();
        server.mesh.write_config(&config(&["attacker", "batch"]));
        server.wait_generation(generation + 1);
        assert!(
            !server.allowed("batch"),
            "{binary}: the new DENY policy is not in force"
        );
        assert!(!server.allowed("attacker"), "{binary}");
        assert!(server.allowed("frontend"), "{binary}");

        // And the ALLOW-everyone file back again.
        server.mesh.write_config(WORKLOAD);
        server.wait_generation(generation + 2);
        assert!(server.allowed("attacker"), "{binary}");
    }
}

#[test]
fn a_configmap_style_symlink_swap_applies() {
    for binary in binary::all() {
        let echo = EchoServer::start(lo(2));
        let mesh = Mesh::new(&config(&["attacker"]));
        // As a ConfigMap volume lays it out: mesh.yaml -> ..data/mesh.yaml, ..data -> ..v1.
        let root = mesh.config_path().parent().unwrap().to_path_buf();
        let version = |name: &str, yaml: &str| {
            std::fs::create_dir(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("mesh.yaml"), yaml).unwrap();
        };
        version("..v1", &config(&["attacker"]));
        std::os::unix::fs::symlink("..v1", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/mesh.yaml", root.join("mesh.yaml.link")).unwrap();
        std::fs::rename(root.join("mesh.yaml.link"), mesh.config_path()).unwrap();
        let proxy = policy::server_proxy(&mesh, &binary);
        let server = Server { mesh, proxy, echo };
        assert!(server.allowed("batch"), "{binary}");
        let generation = server.generation();

        // The kubelet's update: a new version directory, `..data` swapped by a rename, the old
        // version removed.
        version("..v2", &config(&["attacker", "batch"]));
        std::os::unix::fs::symlink("..v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join("..v1")).unwrap();
        server.wait_generation(generation + 1);
        assert!(
            !server.allowed("batch"),
            "{binary}: the new DENY policy is not in force"
        );
        assert!(!server.allowed("attacker"), "{binary}");
    }
}

/// The server workload and `count` more, each in a service.
fn many_workloads(count: usize) -> String {
    let mut yaml = String::with_capacity(count * 300);
    yaml.push_str(WORKLOAD);
    for i in 0..count {
        yaml.push_str(&format!(
            "  - name: w-{i}\n    namespace: bulk\n    serviceAccount: sa-{i}\n    workloadIps: [\"10.{}.{}.{}\"]\n    \
             protocol: HBONE\n    node: node-{}\n    services:\n      \"bulk/svc.bulk.svc.cluster.local\": {{80: 8080}}\n",
            i / 65_536,
            (i / 256) % 256,
            i % 256,
            i % 50,
        ));
    }
    yaml.push_str(
        "services:\n  - name: svc\n    namespace: bulk\n    hostname: svc.bulk.svc.cluster.local\n    \
         vips: [\"/10.96.0.1\"]\n    ports: {80: 8080}\n",
    );
    yaml
}

#[test]
fn dumping_ten_thousand_workloads_costs_bounded_memory() {
    const WORKLOADS: usize = 10_000;
    const DUMPS: usize = 3;
    // Generous: a dump held whole in memory raised RSS by about 65 MiB, and kept it.
    const BOUND_KIB: u64 = 20 * 1024;
    for binary in binary::all() {
        let mesh = Mesh::new(&many_workloads(WORKLOADS));
        let proxy = policy::server_proxy(&mesh, &binary);
        let dump = || {
            let reply = http::request_blocking(proxy.ports().admin, "GET", "/config_dump")
                .unwrap_or_else(|e| panic!("/config_dump: {e}\n{}", proxy.describe()));
            assert_eq!(reply.status, 200);
            reply.body
        };
        let before = proxy.rss_kib().expect("VmRSS");
        let first = dump();
        assert_eq!(first.matches("\"spiffeId\": ").count(), WORKLOADS + 1, "{binary}");
        assert!(first.contains("\"name\": \"w-9999\""), "{binary}");
        for _ in 1..DUMPS {
            let body = dump();
            assert_eq!(body.matches("\"spiffeId\": ").count(), WORKLOADS + 1, "{binary}");
        }
        let after = proxy.rss_kib().expect("VmRSS");
        let grown = after.saturating_sub(before);
        eprintln!(
            "{binary}: VmRSS {before} KiB before {DUMPS} dumps of {} KiB, {after} KiB after (+{grown} KiB)",
            first.len() / 1024
        );
        assert!(
            grown < BOUND_KIB,
            "{binary}: {DUMPS} dumps raised VmRSS by {grown} KiB ({before} -> {after})"
        );
    }
}

/// ztunnel's `examples/localhost.yaml`, as ztunnel ships it.
const ZTUNNEL_LOCALHOST: &str = include_str!("../../dataplane/tests/fixtures/ztunnel/localhost.yaml");
/// ztunnel's format with fields neither ztunnel nor meshwire knows.
const ZTUNNEL_FUTURE_FIELDS: &str = include_str!("../../dataplane/tests/fixtures/ztunnel/future-fields.yaml");

#[test]
fn ztunnels_own_localhost_example_starts_both_binaries() {
    for binary in binary::all() {
        let mesh = Mesh::new(ZTUNNEL_LOCALHOST);
        // Ready: `/healthz/ready` answers 200.
        let proxy = mesh.proxy(&binary, lo(1)).spawn();
        let reply = http::request_blocking(proxy.ports().admin, "GET", "/config_dump")
            .unwrap_or_else(|e| panic!("/config_dump: {e}\n{}", proxy.describe()));
        assert_eq!(reply.status, 200, "{binary}: {}", reply.body);
        for held in [
            "cluster1//v1/Pod/default/local",
            "cluster1//v1/Pod/default/local-tcp",
            "example2.com",
            "deny-9999",
        ] {
            assert!(reply.body.contains(held), "{binary}: no {held} in\n{}", reply.body);
        }
        assert!(
            proxy.log_lines(&["unknown field"]).is_empty(),
            "{binary}:\n{}",
            proxy.describe()
        );
    }
}

#[test]
fn unknown_fields_are_logged_once_per_content_and_do_not_stop_the_proxy() {
    let warnings = [
        "apiVersion: unknown field, ignored (line 4, column 1)",
        "workloads[0].serviceAcount: unknown field, ignored; did you mean `serviceAccount`? (line 9, column 3)",
        "workloads[0].futureField: unknown field, ignored (line 13, column 3)",
        "services[0].sessionAffinity: unknown field, ignored (line 27, column 3)",
    ];
    for binary in binary::all() {
        let mesh = Mesh::new(ZTUNNEL_FUTURE_FIELDS);
        let proxy = mesh.proxy(&binary, lo(1)).spawn();
        let logged = |warning: &str| proxy.log_lines(&["\twarn\t", warning]).len();
        for warning in warnings {
            assert_eq!(logged(warning), 1, "{binary}: {warning}\n{}", proxy.describe());
        }
        let generation = || {
            let reply = http::request_blocking(proxy.ports().admin, "GET", "/config_dump")
                .unwrap_or_else(|e| panic!("/config_dump: {e}\n{}", proxy.describe()));
            generation_of(&reply.body)
        };
        assert_eq!(generation(), 1, "{binary}");
        // The same content again is not applied, nor logged; a changed one is, with its warnings.
        mesh.write_config(ZTUNNEL_FUTURE_FIELDS);
        // Time for the watcher to look at it (were it to parse it again, it would log again).
        std::thread::sleep(Duration::from_millis(500));
        mesh.write_config(&format!("{ZTUNNEL_FUTURE_FIELDS}# changed\n"));
        let deadline = Instant::now() + CHANGE_DEADLINE;
        while generation() < 2 {
            assert!(Instant::now() < deadline, "{binary}: not applied\n{}", proxy.describe());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(generation(), 2, "{binary}");
        for warning in warnings {
            assert_eq!(logged(warning), 2, "{binary}: {warning}\n{}", proxy.describe());
        }
    }
}
