//! Writes the certificate fixtures (`fixtures/`) and the seed corpora of the certificate targets
//! (`corpus/svid/`): a real X.509-SVID issued by the built-in local CA, its key, and the CA's trust
//! bundle, in the input formats of `fuzz_targets/svid.rs`.
//!
//! Run from `fuzz/`: `cargo run --example seeds`. The output is committed; rerunning replaces it
//! with fresh certificates (the targets read the fixtures at build time).

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshwire_identity::id::{parse_spiffe_id, parse_trust_domain};
use meshwire_identity::source::local_ca::LocalCa;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = here.join("fixtures");
    let corpus = here.join("corpus/svid");
    fs::create_dir_all(&fixtures)?;
    fs::create_dir_all(&corpus)?;

    let ca = LocalCa::ephemeral(parse_trust_domain("cluster.local")?)?;
    let id = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/fuzz")?;
    // Valid from 2026-01-01 for ten years; the targets verify at a fixed time inside that window.
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let creds = ca.issue_at(&id, start, Duration::from_secs(10 * 365 * 24 * 3600))?;
    let chain_pem = creds.svid.chain_pem();
    let key_pem = creds.svid.private_key_pem();
    let bundle_pem: String = ca
        .bundle()
        .roots()
        .iter()
        .map(|root| pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec())))
        .collect();
    fs::write(fixtures.join("svid-chain.pem"), &chain_pem)?;
    fs::write(fixtures.join("svid-key.pem"), &key_pem)?;
    fs::write(fixtures.join("bundle.pem"), &bundle_pem)?;

    // Mode 0: PEM chain, NUL, PEM key.
    let mut pem_seed = vec![0u8];
    pem_seed.extend_from_slice(chain_pem.as_bytes());
    pem_seed.push(0);
    pem_seed.extend_from_slice(key_pem.as_bytes());
    fs::write(corpus.join("svid-pem"), pem_seed)?;
    // Mode 1: DER blobs, each with a 2-byte big-endian length: the chain, then the key.
    let mut der_seed = vec![1u8];
    for cert in creds.svid.chain() {
        push_blob(&mut der_seed, cert);
    }
    push_blob(&mut der_seed, creds.svid.private_key().secret_der());
    fs::write(corpus.join("svid-der"), der_seed)?;
    // Mode 2: a PEM bundle; mode 3: DER roots.
    let mut bundle_seed = vec![2u8];
    bundle_seed.extend_from_slice(bundle_pem.as_bytes());
    fs::write(corpus.join("bundle-pem"), bundle_seed)?;
    let mut bundle_der = vec![3u8];
    for root in ca.bundle().roots() {
        push_blob(&mut bundle_der, root);
    }
    fs::write(corpus.join("bundle-der"), bundle_der)?;
    println!("wrote {} and {}", fixtures.display(), corpus.display());
    Ok(())
}

fn push_blob(out: &mut Vec<u8>, blob: &[u8]) {
    let len = u16::try_from(blob.len()).expect("certificates and keys here are small");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(blob);
}
