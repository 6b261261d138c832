//! The export URL (a DiskExport's `status.endpoint` for protocol HTTP), taken apart once.

use hyper::Uri;

use super::error::BackupError;

/// `https://HOST[:PORT]/exports/NAME`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportUrl {
    /// As given, for messages and manifests.
    pub url: String,
    /// Without brackets for an IPv6 address: the TLS server name and the address to connect to.
    pub host: String,
    pub port: u16,
    /// `HOST[:PORT]` as written, for the `Host` header.
    pub authority: String,
    /// The export's path, `/exports/NAME`.
    pub path: String,
}

impl ExportUrl {
    /// Pure: parses and checks an export URL.
    pub fn parse(url: &str) -> Result<Self, BackupError> {
        let bad = |why: &str| BackupError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the export is served over https only"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials go in --credentials, not in the URL"));
        }
        if uri.query().is_some() {
            return Err(bad("an export URL has no query"));
        }
        let path = uri.path().trim_end_matches('/');
        let name = path.rsplit('/').next().unwrap_or_default();
        if !path.starts_with("/exports/") || name.is_empty() || name == "exports" {
            return Err(bad("the path is /exports/NAME"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Self {
            url: url.to_string(),
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_string(),
            path: path.to_string(),
        })
    }

    /// The export's name, the last path segment.
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }

    /// The path of the export's changed-extent map.
    pub fn extents_path(&self) -> String {
        format!("{}/extents", self.path)
    }

    /// The full URL of `path` on this front, for messages.
    pub fn at(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority)
    }

    /// Pure: the snapshot the export serves, when its name is a snapshot ID (the front names an
    /// export after its snapshot); `None` for any other name.
    pub fn snapshot(&self) -> Option<String> {
        livedisk_engine::SnapshotId::parse(self.name())
            .ok()
            .map(|id| id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAP: &str = "snap-0b6a4f43-0d4e-4b51-9d4f-1a5c0d0f7e21";

    #[test]
    fn parses_an_ip_address_url() {
        let u = ExportUrl::parse(&format!("https://10.1.2.3:10810/exports/{SNAP}")).unwrap();
        assert_eq!(u.host, "10.1.2.3");
        assert_eq!(u.port, 10810);
        assert_eq!(u.authority, "10.1.2.3:10810");
        assert_eq!(u.name(), SNAP);
        assert_eq!(u.extents_path(), format!("/exports/{SNAP}/extents"));
        assert_eq!(u.snapshot().as_deref(), Some(SNAP));
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets_and_the_port_defaults() {
        let u = ExportUrl::parse("https://[fd00::1]/exports/x/").unwrap();
        assert_eq!(u.host, "fd00::1");
        assert_eq!(u.port, 443);
        assert_eq!(u.authority, "[fd00::1]");
        assert_eq!(u.path, "/exports/x");
        assert_eq!(u.snapshot(), None);
    }

    #[test]
    fn refuses_what_is_not_an_export_url() {
        for bad in [
            "http://h/exports/x",
            "https://h/other/x",
            "https://h/exports/",
            "https://user:pw@h/exports/x",
            "https://h/exports/x?a=1",
            "not a url",
        ] {
            assert!(ExportUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
