//! The endpoint's serving certificate: `tls.crt` + `tls.key` from a directory (a Secret mounted
//! by the chart, or the driver's own PKI under hack/driver.sh), or a self-signed one made at
//! start. Both are read once, at start.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TelemetryError;

/// The certificate chain and key the endpoint serves.
pub struct ServingCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ServingCert {
    /// `tls.crt` (the chain, leaf first) and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TelemetryError> {
        let crt = dir.join("tls.crt");
        let key = dir.join("tls.key");
        let chain = CertificateDer::pem_file_iter(&crt)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TelemetryError::ReadTls {
                path: crt.clone(),
                source,
            })?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|source| TelemetryError::ReadTls { path: key, source })?;
        Ok(Self { chain, key })
    }

    /// A fresh self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: Vec<String>) -> Result<Self, TelemetryError> {
        let made = rcgen::generate_simple_self_signed(names)?;
        Ok(Self {
            chain: vec![made.cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()).into(),
        })
    }

    /// A rustls server configuration serving this certificate over HTTP/2 or HTTP/1.1.
    pub fn server_config(self) -> Result<Arc<ServerConfig>, TelemetryError> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Pure: the names a self-signed certificate carries: `localhost`, the loopback addresses, the
/// host name and, when the endpoint binds one address, that address.
pub fn self_signed_names(bind: std::net::IpAddr, hostname: Option<String>) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !bind.is_unspecified() && !bind.is_loopback() {
        names.push(bind.to_string());
    }
    names.extend(hostname.filter(|h| !h.is_empty()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_specific_bind_address_is_named_and_wildcards_are_not() {
        let names = self_signed_names("10.1.2.3".parse().unwrap(), Some("node-a".into()));
        assert!(names.contains(&"10.1.2.3".to_string()), "{names:?}");
        assert!(names.contains(&"node-a".to_string()), "{names:?}");
        let names = self_signed_names("0.0.0.0".parse().unwrap(), None);
        assert_eq!(names, ["localhost", "127.0.0.1", "::1"]);
    }

    #[test]
    fn a_directory_without_a_certificate_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = ServingCert::load(dir.path()).err().expect("no files");
        assert!(error.to_string().contains("tls.crt"), "{error}");
    }

    #[test]
    fn a_self_signed_certificate_round_trips_through_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.path().join("tls.crt"), made.cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), made.signing_key.serialize_pem()).unwrap();
        let loaded = ServingCert::load(dir.path()).unwrap();
        assert_eq!(loaded.chain, vec![made.cert.der().clone()]);
        loaded.server_config().unwrap();
    }
}
