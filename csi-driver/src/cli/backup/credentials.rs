//! The credentials directory of an export (its Secret, mounted): the CA to trust and the bearer
//! token to show.

use std::path::Path;

use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use super::error::BackupError;

/// The credentials directory (a mounted Secret): `ca-cert.pem` and `token`. The client
/// certificate and key beside them are not used: the bearer token is enough for the front.
pub struct Credentials {
    pub ca: Vec<CertificateDer<'static>>,
    pub token: String,
}

impl Credentials {
    pub fn load(dir: &Path) -> Result<Self, BackupError> {
        let ca_path = dir.join("ca-cert.pem");
        let bad = |path: &Path, why: String| BackupError::Credentials {
            path: path.to_path_buf(),
            why,
        };
        let ca = CertificateDer::pem_file_iter(&ca_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&ca_path, e.to_string()))?;
        if ca.is_empty() {
            return Err(bad(&ca_path, "no PEM certificate in it".into()));
        }
        let token_path = dir.join("token");
        let text =
            std::fs::read_to_string(&token_path).map_err(|e| bad(&token_path, e.to_string()))?;
        let token = parse_token(&text).map_err(|why| bad(&token_path, why.into()))?;
        Ok(Self { ca, token })
    }
}

/// Pure: the bearer token from the token file's text: surrounding whitespace (a trailing
/// newline) dropped; empty or inner whitespace refused, since no header could carry it.
pub fn parse_token(text: &str) -> Result<String, &'static str> {
    let token = text.trim();
    if token.is_empty() {
        return Err("the token is empty");
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the token holds whitespace or control characters");
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_lose_their_newline_and_must_be_one_word() {
        assert_eq!(parse_token("abc\n").as_deref(), Ok("abc"));
        assert_eq!(parse_token("  abc \r\n").as_deref(), Ok("abc"));
        assert!(parse_token("\n").is_err());
        assert!(parse_token("a b").is_err());
    }
}
