//! The front's TLS identity and its client admission.
//!
//! The node plugin makes a key pair at start and keeps the private key in memory; it publishes
//! a certificate request in its LivediskNode, and the operator answers with a certificate from
//! the driver's export CA (leaf, then the CA). Until that certificate is installed the listeners
//! refuse every connection. A client is admitted in the handshake only with a certificate that
//! both chains to that CA and is named by a live grant (its SHA-256 pinned by the operator in the
//! LivediskExport); which export it may then open is decided per NBD option or HTTP request.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use livedisk_api::ExportProtocol;
use rcgen::{CertificateParams, DnType, KeyPair};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use super::FrontError;
use super::grants::{Grants, sha256_hex};

/// The front's key and the request for its certificate.
pub struct FrontKey {
    key_der: Vec<u8>,
    /// The same key, PEM (PKCS#8): the engine daemon reads it from a file when this node
    /// attaches another node's volume (the certificate serves as the node's client identity).
    key_pem: String,
    /// PEM PKCS#10 request naming `host` and the node.
    pub request_pem: String,
    pub request_sha256: String,
}

impl FrontKey {
    /// A fresh key pair and a request for a certificate naming `host` (the address clients dial)
    /// and the node's name.
    pub fn generate(host: &str, node: &str) -> Result<Self, FrontError> {
        let key = KeyPair::generate()?;
        let mut names = vec![host.to_string()];
        if node != host {
            names.push(node.to_string());
        }
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("livedisk export front {node}"));
        let request_pem = params.serialize_request(&key)?.pem()?;
        Ok(Self {
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
            request_sha256: sha256_hex(request_pem.as_bytes()),
            request_pem,
        })
    }
}

impl FrontKey {
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

/// The listeners' TLS configurations, once the front has its certificate.
pub struct FrontTls {
    grants: Arc<Grants>,
    provider: Arc<CryptoProvider>,
    configs: RwLock<Option<Configs>>,
}

#[derive(Clone)]
struct Configs {
    /// NBD: a client certificate is required.
    nbd: Arc<ServerConfig>,
    /// HTTPS: a client certificate or a bearer token.
    https: Arc<ServerConfig>,
    /// PEM of the issued chain, to recognise a repeated installation.
    chain_pem: String,
}

impl FrontTls {
    pub fn new(grants: Arc<Grants>) -> Self {
        Self {
            grants,
            provider: Arc::new(ring::default_provider()),
            configs: RwLock::new(None),
        }
    }

    pub fn nbd(&self) -> Option<Arc<ServerConfig>> {
        self.read().as_ref().map(|c| c.nbd.clone())
    }

    pub fn https(&self) -> Option<Arc<ServerConfig>> {
        self.read().as_ref().map(|c| c.https.clone())
    }

    pub fn installed(&self) -> bool {
        self.read().is_some()
    }

    /// The installed chain (PEM, leaf first, the CA last), once the operator issued it.
    pub fn chain_pem(&self) -> Option<String> {
        self.read().as_ref().map(|c| c.chain_pem.clone())
    }

    /// Installs the issued chain (PEM, leaf first, the CA last) for `key`. The CA at the end of
    /// the chain is the one client certificates must chain to.
    pub fn install(&self, key: &FrontKey, chain_pem: &str) -> Result<bool, FrontError> {
        if self
            .read()
            .as_ref()
            .is_some_and(|c| c.chain_pem == chain_pem)
        {
            return Ok(false);
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| FrontError::Certificate(format!("the issued chain: {e}")))?;
        let (Some(_leaf), Some(ca)) = (chain.first(), chain.last()) else {
            return Err(FrontError::Certificate("the issued chain is empty".into()));
        };
        if chain.len() < 2 {
            return Err(FrontError::Certificate(
                "the issued chain has no CA certificate after the leaf".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| FrontError::Certificate(format!("the CA certificate: {e}")))?;
        let roots = Arc::new(roots);
        let served = chain[..chain.len() - 1].to_vec();
        let key_der = || PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.key_der.clone()));
        let config = |mandatory: bool| -> Result<Arc<ServerConfig>, FrontError> {
            let builder =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone());
            let builder = match mandatory {
                true => builder,
                false => builder.allow_unauthenticated(),
            };
            let chained = builder
                .build()
                .map_err(|e| FrontError::Certificate(format!("client verifier: {e}")))?;
            let verifier = Arc::new(PinnedClients {
                chained,
                grants: self.grants.clone(),
                protocol: match mandatory {
                    true => ExportProtocol::Nbd,
                    false => ExportProtocol::Http,
                },
            });
            let mut config = ServerConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| FrontError::Certificate(e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(served.clone(), key_der())
                .map_err(|e| {
                    FrontError::Certificate(format!(
                        "the issued certificate does not match this node's key: {e}"
                    ))
                })?;
            if !mandatory {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
            }
            Ok(Arc::new(config))
        };
        let configs = Configs {
            nbd: config(true)?,
            https: config(false)?,
            chain_pem: chain_pem.to_string(),
        };
        *self.configs.write().unwrap_or_else(|p| p.into_inner()) = Some(configs);
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Configs>> {
        self.configs.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Admits a client certificate that chains to the export CA *and* is pinned by a live grant.
#[derive(Debug)]
struct PinnedClients {
    chained: Arc<dyn ClientCertVerifier>,
    grants: Arc<Grants>,
    /// The listener this verifier guards: a certificate is admitted only by a grant of it.
    protocol: ExportProtocol,
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grants")
    }
}

impl ClientCertVerifier for PinnedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chained.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chained.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, tokio_rustls::rustls::Error> {
        self.chained
            .verify_client_cert(end_entity, intermediates, now)?;
        let pin = sha256_hex(end_entity.as_ref());
        if self
            .grants
            .knows_certificate(self.protocol, &pin, SystemTime::now())
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(tokio_rustls::rustls::Error::General(
                "this client certificate is not issued for any export this node serves (deleted or expired)".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.chained.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.chained.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chained.supported_verify_schemes()
    }
}
