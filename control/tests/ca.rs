//! The CA client against a fake istiod's CA, over real TLS and real sockets: the request (CSR,
//! validity, `ImpersonatedIdentity`, headers), the chain as sent, errors with the CA's address and
//! the gRPC code; and the fake's scripted wrong answers, which other crates' tests rely on.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use meshwire_control::ca::{CaClient, CaError};
use meshwire_control::channel::{Address, Channel, ChannelConfig, Roots, Token};
use meshwire_rt::TokioTimer;
use meshwire_testkit::istiod::{CaMode, FakeIstiod, ISTIOD_NAME};
use rcgen::{CertificateParams, KeyPair, SanType};

use tonic::Code;

const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

fn client(fake: &FakeIstiod, roots: Roots) -> CaClient<TokioTimer> {
    let address = Address::parse(&fake.address().to_string()).unwrap();
    let config = ChannelConfig::new(address, roots)
        .server_name(ISTIOD_NAME)
        .token(Token::Static("ca-token".into()))
        .cluster_id("west")
        .header("X-Ca_Extra", "1");
    CaClient::new(Channel::new(config).unwrap(), TokioTimer)
}

/// A CSR for `id` (ECDSA P-256, one URI SAN) and its key.
fn csr(id: &str) -> (String, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

/// The URI SANs and the raw public key of a PEM certificate.
fn parse(pem: &str) -> (Vec<String>, Vec<u8>) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans = cert
        .subject_alternative_name()
        .unwrap()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (sans, cert.public_key().subject_public_key.data.to_vec())
}

fn uri_sans(pem: &str) -> Vec<String> {
    parse(pem).0
}

#[tokio::test]
async fn issues_a_certificate_with_the_headers_and_the_impersonated_identity() {
    let fake = FakeIstiod::start().await;
    let ca = client(&fake, Roots::Pem(fake.root_pem()));
    let (csr_pem, key) = csr(ID);
    let chain = ca
        .create_certificate(csr_pem.clone(), Duration::from_secs(3600), Some(ID.to_string()))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], fake.root_pem(), "the root last, as sent");
    assert_eq!(uri_sans(&chain[0]), [ID]);
    assert_eq!(parse(&chain[0]).1, key.public_key_raw(), "the leaf holds the CSR's key");

    let requests = fake.ca_requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.csr, csr_pem);
    assert_eq!(r.validity_secs, 3600);
    assert_eq!(r.impersonated.as_deref(), Some(ID));
    assert_eq!(r.uri_san.as_deref(), Some(ID));
    assert_eq!(r.headers["authorization"], "Bearer ca-token");
    assert_eq!(r.headers["clusterid"], "west");
    assert_eq!(r.headers["x-ca_extra"], "1");

    // Without impersonation: no metadata.
    let (csr_pem, _) = csr(ID);
    ca.create_certificate(csr_pem, Duration::from_secs(60), None)
        .await
        .unwrap();
    assert_eq!(fake.ca_requests()[1].impersonated, None);
}

#[tokio::test]
async fn errors_carry_the_address_and_the_grpc_code() {
    let fake = FakeIstiod::start().await;
    let ca = client(&fake, Roots::Pem(fake.root_pem()));
    fake.set_ca(CaMode::Fail(
        Code::PermissionDenied,
        "no pod with that identity on this node".into(),
    ));
    let (csr_pem, _) = csr(ID);
    let err = ca
        .create_certificate(csr_pem, Duration::from_secs(3600), Some(ID.into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    let text = err.to_string();
    assert!(text.contains(&fake.address().to_string()), "{text}");
    assert!(
        text.contains("PermissionDenied") && text.contains("no pod with that identity"),
        "{text}"
    );

    // The fake CA checks the CSR against the impersonated identity.
    fake.set_ca(CaMode::Sign);
    let (csr_pem, _) = csr("spiffe://cluster.local/ns/default/sa/other");
    let err = ca
        .create_certificate(csr_pem, Duration::from_secs(3600), Some(ID.into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // A CA whose certificate the roots do not sign: a connect error naming the address.
    let ca = client(&fake, Roots::Pem(fake.other_root_pem()));
    let (csr_pem, _) = csr(ID);
    let err = ca
        .create_certificate(csr_pem, Duration::from_secs(3600), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&fake.address().to_string()), "{err}");
}

#[tokio::test]
async fn the_fake_ca_answers_wrongly_when_told_to() {
    let fake = FakeIstiod::start().await;
    let ca = client(&fake, Roots::Pem(fake.root_pem()));

    fake.set_ca(CaMode::WrongIdentity("spiffe://cluster.local/ns/evil/sa/x".into()));
    let (csr_pem, _) = csr(ID);
    let chain = ca
        .create_certificate(csr_pem, Duration::from_secs(600), None)
        .await
        .unwrap();
    assert_eq!(uri_sans(&chain[0]), ["spiffe://cluster.local/ns/evil/sa/x"]);

    fake.set_ca(CaMode::WrongKey);
    let (csr_pem, key) = csr(ID);
    let chain = ca
        .create_certificate(csr_pem, Duration::from_secs(600), None)
        .await
        .unwrap();
    assert_eq!(uri_sans(&chain[0]), [ID]);
    assert_ne!(parse(&chain[0]).1, key.public_key_raw(), "another key");

    fake.set_ca(CaMode::RotateRoots);
    let (csr_pem, _) = csr(ID);
    let chain = ca
        .create_certificate(csr_pem, Duration::from_secs(600), None)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], format!("{}{}", fake.root_pem(), fake.other_root_pem()));
    assert_eq!(chain[1].matches("BEGIN CERTIFICATE").count(), 2);
}
