//! The driver's export CA: a key and self-signed certificate in a Secret of the operator's
//! namespace, made by the operator the first time an export or a node's front needs it. It
//! issues every export's client certificate and every node front's server certificate.
//!
//! Rotation: delete the Secret. The next use makes a new CA; the signer re-issues every node's
//! front certificate within a minute (a front's chain that does not end with the current CA is
//! signed again), and exports made before keep credentials of the old CA, which the fronts no
//! longer accept: re-create them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::error::Error;

/// The CA Secret's name in the operator's namespace.
pub const SECRET_NAME: &str = "livedisk-export-ca";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// How long a loaded CA is used before the Secret is read again (a rotation shows after this).
const RELOAD_AFTER: Duration = Duration::from_secs(60);
/// Validity of the CA and of a front's certificate.
const CA_DAYS: i64 = 3650;
const FRONT_DAYS: i64 = 365;

/// The CA as loaded.
pub struct ExportCa {
    pub cert_pem: String,
    key_pem: String,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ExportCa {
    /// A new CA.
    pub fn generate() -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(credential_error)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "livedisk export CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now_minus_minutes(5);
        params.not_after = days_from_now(CA_DAYS);
        let cert = params.self_signed(&key).map_err(credential_error)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, Error> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(credential_error)?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(credential_error)
    }

    /// A client certificate (and key) for one export, named `subject`, valid for `days`.
    pub fn issue_client(&self, subject: &str, days: i64) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(credential_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, subject);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now_minus_minutes(5);
        params.not_after = days_from_now(days);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(credential_error)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A node front's certificate (server, and client of other nodes' fronts) for its request (its names as requested), as the chain
    /// the front serves: the leaf, then this CA.
    pub fn sign_front(&self, request_pem: &str) -> Result<String, Error> {
        let mut request =
            CertificateSigningRequestParams::from_pem(request_pem).map_err(credential_error)?;
        request.params.is_ca = IsCa::ExplicitNoCa;
        // Client use too: a node's engine presents it when it attaches another node's volume
        // through that node's front (remote attach).
        request.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        request.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        request.params.not_before = now_minus_minutes(5);
        request.params.not_after = days_from_now(FRONT_DAYS);
        let cert = request
            .signed_by(&self.issuer()?)
            .map_err(credential_error)?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }
}

fn credential_error(error: rcgen::Error) -> Error {
    Error::Credentials(error.to_string())
}

fn now_minus_minutes(minutes: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::minutes(minutes)
}

fn days_from_now(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

/// The CA of the operator's namespace, read from its Secret (made when absent) and kept for a
/// minute.
pub struct CaStore {
    client: Client,
    namespace: String,
    loaded: Mutex<Option<(Instant, std::sync::Arc<ExportCa>)>>,
}

impl CaStore {
    pub fn new(client: Client, namespace: String) -> Self {
        Self {
            client,
            namespace,
            loaded: Mutex::new(None),
        }
    }

    pub async fn current(&self) -> Result<std::sync::Arc<ExportCa>, Error> {
        if let Some((at, ca)) = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && at.elapsed() < RELOAD_AFTER
        {
            return Ok(ca.clone());
        }
        let ca = std::sync::Arc::new(self.load_or_create().await?);
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), ca.clone()));
        Ok(ca)
    }

    async fn load_or_create(&self) -> Result<ExportCa, Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let what = || format!("Secret {}/{SECRET_NAME}", self.namespace);
        if let Some(secret) = api
            .get_opt(SECRET_NAME)
            .await
            .map_err(|cause| Error::Observe {
                what: what(),
                cause,
            })?
        {
            return from_secret(&secret).ok_or_else(|| {
                Error::Credentials(format!(
                    "{} lacks {CA_CERT} or {CA_KEY}; delete it and the operator makes a new CA",
                    what()
                ))
            });
        }
        let ca = ExportCa::generate()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.into()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/part-of".to_string(),
                        "livedisk".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                [
                    (
                        CA_CERT.to_string(),
                        ByteString(ca.cert_pem.clone().into_bytes()),
                    ),
                    (
                        CA_KEY.to_string(),
                        ByteString(ca.key_pem.clone().into_bytes()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(namespace = %self.namespace, "made the export CA");
                Ok(ca)
            }
            // Another replica (or a moment ago, this one) made it first: use that one.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let secret = api.get(SECRET_NAME).await.map_err(|cause| Error::Observe {
                    what: what(),
                    cause,
                })?;
                from_secret(&secret)
                    .ok_or_else(|| Error::Credentials(format!("{} is incomplete", what())))
            }
            Err(cause) => Err(Error::Apply {
                what: what(),
                cause,
            }),
        }
    }
}

fn from_secret(secret: &Secret) -> Option<ExportCa> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    Some(ExportCa {
        cert_pem: text(CA_CERT)?,
        key_pem: text(CA_KEY)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_front_request_is_signed_into_a_chain_ending_with_the_ca() {
        let ca = ExportCa::generate().expect("ca");
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["10.0.0.2".to_string(), "node-a".to_string()])
            .expect("params");
        let request = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let chain = ca.sign_front(&request).expect("signed");
        assert!(chain.ends_with(&ca.cert_pem));
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let client = ca.issue_client("diskexport ns/x", 30).expect("client");
        assert!(client.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(client.key_pem.contains("PRIVATE KEY"));
    }
}
