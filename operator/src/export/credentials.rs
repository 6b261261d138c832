//! The credentials Secret of one DiskExport, in its namespace and owned by it (garbage-collected
//! with it): the export CA's certificate and a client certificate, key and bearer token issued
//! for this export only. Its keys are the file names QEMU's and libnbd's TLS clients read from a
//! directory (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), so the Secret mounted as a
//! volume is a ready credentials directory, plus `token` for HTTP.
//!
//! The node admits these credentials by their SHA-256 (written into the LivediskExport), never
//! by the secrets themselves.

use std::io::Read;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use livedisk_api::DiskExport;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use super::ca::ExportCa;
use crate::error::Error;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
pub const TOKEN: &str = "token";

/// What the node is told to admit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pins {
    pub certificate_sha256: String,
    pub token_sha256: String,
}

/// Pure: the Secret's name: `<export>-credentials`, or `diskexport-<uid>-credentials` when that
/// would not be a valid name.
pub fn secret_name(export: &str, uid: &str) -> String {
    let name = format!("{export}-credentials");
    if name.len() <= 253 {
        name
    } else {
        format!("diskexport-{uid}-credentials")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Pure: the pins of a Secret's credentials, when it holds both.
pub fn pins_of(data: &std::collections::BTreeMap<String, ByteString>) -> Option<Pins> {
    let cert = CertificateDer::from_pem_slice(&data.get(CLIENT_CERT)?.0).ok()?;
    let token = std::str::from_utf8(&data.get(TOKEN)?.0)
        .ok()?
        .trim()
        .to_string();
    Some(Pins {
        certificate_sha256: sha256_hex(cert.as_ref()),
        token_sha256: sha256_hex(token.as_bytes()),
    })
}

/// Validity of an export's client certificate: a day past its TTL, else a year.
pub fn client_days(ttl_seconds: Option<i64>) -> i64 {
    match ttl_seconds {
        Some(ttl) => (ttl.max(0) as u64).div_ceil(86_400) as i64 + 1,
        None => 365,
    }
}

/// Why the credentials cannot be made.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict(pub String);

/// The export's Secret: read when it is this export's, else made; another object's Secret of
/// the same name is a conflict.
pub async fn ensure(
    client: &Client,
    ca: &ExportCa,
    export: &DiskExport,
) -> Result<Result<(String, Pins), Conflict>, Error> {
    let namespace = export.namespace().unwrap_or_default();
    let uid = export.uid().unwrap_or_default();
    let name = secret_name(&export.name_any(), &uid);
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let what = || format!("Secret {namespace}/{name}");
    if let Some(existing) = api.get_opt(&name).await.map_err(|cause| Error::Observe {
        what: what(),
        cause,
    })? {
        let ours = existing
            .owner_references()
            .iter()
            .any(|o| o.uid == uid && o.kind == "DiskExport");
        let pins = existing.data.as_ref().and_then(pins_of);
        return Ok(match (ours, pins) {
            (true, Some(pins)) => Ok((name, pins)),
            (true, None) => Err(Conflict(format!(
                "{} is this DiskExport's but lacks {CLIENT_CERT} or {TOKEN}; delete it and it is made again",
                what()
            ))),
            (false, _) => Err(Conflict(format!(
                "{} exists and does not belong to this DiskExport; delete or rename it",
                what()
            ))),
        });
    }
    let issued = ca.issue_client(
        &format!("diskexport {namespace}/{}", export.name_any()),
        client_days(export.spec.ttl_seconds),
    )?;
    let token = random_token()?;
    let owner = OwnerReference {
        api_version: DiskExport::api_version(&()).into_owned(),
        kind: DiskExport::kind(&()).into_owned(),
        name: export.name_any(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let data: std::collections::BTreeMap<String, ByteString> = [
        (CA_CERT, ca.cert_pem.clone()),
        (CLIENT_CERT, issued.cert_pem),
        (CLIENT_KEY, issued.key_pem),
        (TOKEN, token),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect();
    let pins = pins_of(&data)
        .ok_or_else(|| Error::Credentials("the issued certificate does not read back".into()))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            owner_references: Some(vec![owner]),
            labels: Some(
                [(
                    livedisk_api::internal::export::LABEL_NAME.to_string(),
                    export.name_any(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    api.create(&PostParams::default(), &secret)
        .await
        .map_err(|cause| Error::Apply {
            what: what(),
            cause,
        })?;
    tracing::info!(secret = %name, %namespace, "issued export credentials");
    Ok(Ok((name, pins)))
}

/// 32 random bytes from the kernel, hex.
fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Credentials(format!("reading /dev/urandom: {e}")))?;
    Ok(hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_valid_and_certificates_outlive_their_ttl() {
        assert_eq!(secret_name("backup", "u"), "backup-credentials");
        assert_eq!(
            secret_name(&"x".repeat(250), "u"),
            "diskexport-u-credentials"
        );
        assert_eq!(client_days(None), 365);
        assert_eq!(client_days(Some(3600)), 2);
        assert_eq!(client_days(Some(86_400 * 7)), 8);
    }

    #[test]
    fn pins_are_digests_of_the_certificate_der_and_the_trimmed_token() {
        let ca = ExportCa::generate().expect("ca");
        let issued = ca.issue_client("t", 1).expect("issued");
        let data = [
            (
                CLIENT_CERT.to_string(),
                ByteString(issued.cert_pem.clone().into_bytes()),
            ),
            (TOKEN.to_string(), ByteString(b"abc\n".to_vec())),
        ]
        .into();
        let pins = pins_of(&data).expect("pins");
        assert_eq!(pins.token_sha256, sha256_hex(b"abc"));
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("der");
        assert_eq!(pins.certificate_sha256, sha256_hex(der.as_ref()));
    }
}
