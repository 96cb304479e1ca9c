//! The few facts this crate reads from an X.509 certificate, extracted with `x509-parser`.

use std::time::{Duration, SystemTime};

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What a certificate says about itself that SVID validation needs.
pub(crate) struct CertFacts {
    pub(crate) uri_sans: Vec<String>,
    pub(crate) is_ca: bool,
    /// `None` when the certificate has no key usage extension.
    pub(crate) digital_signature: Option<bool>,
    pub(crate) key_cert_sign: bool,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// The serial number, in decimal.
    pub(crate) serial: String,
}

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError(pub(crate) String);

fn to_system_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

pub(crate) fn facts(der: &[u8]) -> Result<CertFacts, ParseError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| ParseError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ParseError(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| ParseError(format!("subjectAltName: {e}")))?;
    let uri_sans = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let bc = cert
        .basic_constraints()
        .map_err(|e| ParseError(format!("basicConstraints: {e}")))?;
    let ku = cert.key_usage().map_err(|e| ParseError(format!("keyUsage: {e}")))?;
    let validity = cert.validity();
    Ok(CertFacts {
        uri_sans,
        is_ca: bc.is_some_and(|bc| bc.value.ca),
        digital_signature: ku.as_ref().map(|ku| ku.value.digital_signature()),
        key_cert_sign: ku.is_some_and(|ku| ku.value.key_cert_sign()),
        not_before: to_system_time(validity.not_before.timestamp()),
        not_after: to_system_time(validity.not_after.timestamp()),
        serial: cert.tbs_certificate.serial.to_string(),
    })
}
