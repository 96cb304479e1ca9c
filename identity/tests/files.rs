//! The files source: credentials read from disk, changes picked up, bad changes refused with the
//! previous certificate kept in service.
#![allow(clippy::unwrap_used, missing_docs)]
#![cfg(all(feature = "files", feature = "local-ca"))]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{TestTimer, id, settle};
use meshwire_identity::id::{SpiffeId, TrustDomain};
use meshwire_identity::manager::{CertManager, ManagerConfig, Priority};
use meshwire_identity::source::files::{FilePaths, FileSource};
use meshwire_identity::source::local_ca::LocalCa;
use meshwire_identity::source::{CertSource, Credentials, SourceError};

fn paths(dir: &Path) -> FilePaths {
    FilePaths {
        cert_chain: dir.join("cert-chain.pem"),
        private_key: dir.join("key.pem"),
        trust_bundle: dir.join("root-cert.pem"),
    }
}

fn write(p: &FilePaths, creds: &Credentials) {
    std::fs::write(&p.cert_chain, creds.svid.chain_pem()).unwrap();
    std::fs::write(&p.private_key, creds.svid.private_key_pem()).unwrap();
    let root = creds.bundles.iter().next().unwrap().roots()[0].clone();
    std::fs::write(
        &p.trust_bundle,
        pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec())),
    )
    .unwrap();
}

/// A directory holding a valid SVID for `web` from a new CA.
fn fixture() -> (tempfile::TempDir, FilePaths, LocalCa, SpiffeId, Credentials) {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(dir.path());
    let ca = new_ca();
    let web = id("web");
    let first = ca.issue(&web).unwrap();
    write(&p, &first);
    (dir, p, ca, web, first)
}

fn new_ca() -> LocalCa {
    LocalCa::ephemeral(TrustDomain::new("cluster.local").unwrap()).unwrap()
}

#[test]
fn loads_and_picks_up_replacements_and_refuses_bad_ones() {
    let (_dir, p, ca, web, first) = fixture();
    let source = FileSource::new(p.clone());
    let now = SystemTime::now();
    assert!(source.load(now).unwrap().svid.same_chain(&first.svid));

    // A valid replacement is picked up.
    let second = ca.issue(&web).unwrap();
    write(&p, &second);
    assert!(source.load(now).unwrap().svid.same_chain(&second.svid));

    // Truncated chain: refused, the previous certificate stays.
    let pem = second.svid.chain_pem();
    std::fs::write(&p.cert_chain, &pem[..pem.len() / 2]).unwrap();
    assert!(source.load(now).unwrap().svid.same_chain(&second.svid));

    // A key of another certificate: refused, the previous certificate stays.
    let third = ca.issue(&web).unwrap();
    std::fs::write(&p.cert_chain, third.svid.chain_pem()).unwrap();
    std::fs::write(&p.private_key, first.svid.private_key_pem()).unwrap();
    assert!(source.load(now).unwrap().svid.same_chain(&second.svid));

    // A chain from another CA than the bundle's: refused.
    let foreign = new_ca().issue(&web).unwrap();
    std::fs::write(&p.cert_chain, foreign.svid.chain_pem()).unwrap();
    std::fs::write(&p.private_key, foreign.svid.private_key_pem()).unwrap();
    assert!(source.load(now).unwrap().svid.same_chain(&second.svid));

    // A missing file while an agent replaces it: the previous certificate stays.
    std::fs::remove_file(&p.private_key).unwrap();
    assert!(source.load(now).unwrap().svid.same_chain(&second.svid));

    // Fixed: the new files are used.
    write(&p, &third);
    assert!(source.load(now).unwrap().svid.same_chain(&third.svid));
}

#[test]
fn bad_files_with_nothing_to_fall_back_on_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(dir.path());
    let source = FileSource::new(p.clone());
    let err = source.load(SystemTime::now()).unwrap_err();
    assert!(
        matches!(&err, SourceError::Io { path, .. } if path.ends_with("cert-chain.pem")),
        "{err}"
    );

    let ca = new_ca();
    let creds = ca
        .issue_at(
            &id("old"),
            SystemTime::now() - Duration::from_secs(7200),
            Duration::from_secs(3600),
        )
        .unwrap();
    write(&p, &creds);
    let err = source.load(SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(err.to_string().contains("cert-chain.pem"), "{err}");

    std::fs::write(&p.trust_bundle, "not a bundle").unwrap();
    write(&p, &ca.issue(&id("old")).unwrap());
    std::fs::write(
        &p.trust_bundle,
        "-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = source.load(SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains("root-cert.pem"), "{err}");
}

#[tokio::test]
async fn files_of_another_identity_are_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(dir.path());
    write(&p, &new_ca().issue(&id("web")).unwrap());
    let source = FileSource::new(p);
    let err = source.fetch(&id("db")).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::NotServed { id: who, .. } if *who == id("db")),
        "{err}"
    );
    assert!(
        err.to_string().contains("spiffe://cluster.local/ns/default/sa/web"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_manager_rotates_to_files_replaced_on_disk() {
    let (_dir, p, ca, web, first) = fixture();
    let source = Arc::new(FileSource::new(p.clone()).with_poll_interval(Duration::from_secs(5)));
    let manager = CertManager::new(source, TestTimer::with_real_wall(), ManagerConfig::default());
    let driver = manager.clone();
    tokio::spawn(async move { driver.run().await });

    let handle = manager.get(&web, Priority::Connection).await.unwrap();
    assert!(handle.current().svid().same_chain(&first.svid));
    let unchanged = handle.current();

    // Unchanged files: the manager looks again but keeps the very same certificate object.
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert!(
        Arc::ptr_eq(&unchanged, &handle.current()),
        "an unchanged reload does not rebuild the configs"
    );

    // A corrupt write is ignored.
    std::fs::write(&p.cert_chain, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert!(handle.current().svid().same_chain(&first.svid));
    assert!(manager.get(&web, Priority::Connection).await.is_ok());

    // A valid replacement is in service within one poll interval.
    let second = ca.issue(&web).unwrap();
    write(&p, &second);
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert!(handle.current().svid().same_chain(&second.svid));
    manager.shutdown();
}
