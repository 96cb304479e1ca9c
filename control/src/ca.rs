//! The Istio CA client: unary `/istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! [`CaClient::create_certificate`] sends a CSR and returns the certificate chain as the CA sent
//! it (leaf first, the root or roots last); checking it is the identity crate's job. Each call
//! opens its own connection (TLS 1.3, the headers of the [`Channel`]) and drives it until the
//! answer arrives, so nothing runs between calls and a rotated root file or token is always used.

use std::pin::pin;
use std::time::Duration;

use futures_util::future::{Either, select};
use meshwire_rt::Timer;
use prost_types::value::Kind;
use prost_types::{Struct, Value};

use crate::channel::{Channel, ChannelError};
use crate::proto::istio::v1::auth::IstioCertificateRequest;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

/// The metadata key that asks for another workload's certificate (node mode).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The default time a certificate request may take, connection included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a certificate could not be obtained. Every variant names the CA's address.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// No connection to the CA.
    #[error("CA {address}: {error}")]
    Connect {
        /// The CA's address.
        address: String,
        /// What failed.
        error: ChannelError,
    },
    /// The CA answered with a gRPC error.
    #[error("CA {address} refused the certificate request: gRPC status {code:?}: {message}")]
    Status {
        /// The CA's address.
        address: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The CA answered with an empty chain.
    #[error("CA {address} answered with an empty certificate chain")]
    EmptyChain {
        /// The CA's address.
        address: String,
    },
    /// The request took longer than the request timeout.
    #[error("CA {address}: no answer within {timeout:?}")]
    Timeout {
        /// The CA's address.
        address: String,
        /// The request timeout.
        timeout: Duration,
    },
}

impl CaError {
    /// The gRPC code of a [`CaError::Status`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CaError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A client of the Istio CA.
#[derive(Debug, Clone)]
pub struct CaClient<T> {
    channel: Channel,
    timer: T,
    request_timeout: Duration,
}

impl<T: Timer> CaClient<T> {
    /// A client of the CA at `channel`, with [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn new(channel: Channel, timer: T) -> Self {
        Self {
            channel,
            timer,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Sets the request timeout (connection included).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The CA's address.
    pub fn address(&self) -> String {
        self.channel.address().to_string()
    }

    /// Asks for a certificate for `csr_pem`, valid for `validity` (whole seconds), on behalf of
    /// the SPIFFE ID `impersonated` when given (metadata `ImpersonatedIdentity`). Returns
    /// `cert_chain` as sent.
    pub async fn create_certificate(
        &self,
        csr_pem: String,
        validity: Duration,
        impersonated: Option<String>,
    ) -> Result<Vec<String>, CaError> {
        let address = self.address();
        let call = self.call(csr_pem, validity, impersonated);
        match meshwire_rt::timeout(&self.timer, self.request_timeout, call).await {
            Some(result) => result,
            None => Err(CaError::Timeout {
                address,
                timeout: self.request_timeout,
            }),
        }
    }

    async fn call(
        &self,
        csr: String,
        validity: Duration,
        impersonated: Option<String>,
    ) -> Result<Vec<String>, CaError> {
        let address = self.address();
        let (service, connection) = self
            .channel
            .connect(&self.timer)
            .await
            .map_err(|error| CaError::Connect {
                address: address.clone(),
                error,
            })?;
        let metadata = impersonated.map(|id| Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(id)),
                },
            )]
            .into_iter()
            .collect(),
        });
        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata,
        };
        let mut client = IstioCertificateServiceClient::with_origin(service, self.channel.origin());
        let call = pin!(client.create_certificate(request));
        let result = match select(call, connection).await {
            Either::Left((result, _)) => result,
            Either::Right((closed, call)) => {
                // The connection ended first: the call ends with it; report why it closed if the
                // call has nothing better to say.
                match call.await {
                    Ok(answer) => Ok(answer),
                    Err(status) => match closed {
                        Err(error) => return Err(CaError::Connect { address, error }),
                        Ok(()) => Err(status),
                    },
                }
            }
        };
        let chain = result
            .map_err(|status| {
                tracing::warn!(ca = %address, code = ?status.code(), message = status.message(),
                    "CA: certificate request failed");
                CaError::Status {
                    address: address.clone(),
                    code: status.code(),
                    message: status.message().to_string(),
                }
            })?
            .into_inner()
            .cert_chain;
        if chain.is_empty() {
            return Err(CaError::EmptyChain { address });
        }
        Ok(chain)
    }
}
