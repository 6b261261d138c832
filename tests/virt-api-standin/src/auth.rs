//! Who is calling, and may they: the API server's aggregator authenticates the user and passes it
//! on in request headers (`X-Remote-User`, `X-Remote-Uid`, `X-Remote-Group`,
//! `X-Remote-Extra-<key>`) over a TLS connection on which it shows its front-proxy client
//! certificate. The stand-in believes those headers only on such a connection (the certificate is
//! verified against the front-proxy CA during the handshake; its common name must be one of the
//! allowed names here), then asks the API server whether the user may make the call
//! (SubjectAccessReview), as KubeVirt's virt-api does by delegation.

use std::collections::BTreeMap;

use hyper::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// The user the aggregator named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Pure: the user of a request whose TLS client certificate (already verified against the
/// front-proxy CA) has common name `peer_cn`. `allowed_names` empty: any name.
pub fn authenticate(
    peer_cn: Option<&str>,
    allowed_names: &[String],
    headers: &HeaderMap,
) -> Result<User, String> {
    let Some(cn) = peer_cn else {
        return Err("the client certificate has no common name".into());
    };
    if !allowed_names.is_empty() && !allowed_names.iter().any(|n| n == cn) {
        return Err(format!(
            "client certificate {cn:?} is not one of the allowed request-header names {allowed_names:?}"
        ));
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let name = values("x-remote-user")
        .into_iter()
        .find(|v| !v.is_empty())
        .ok_or("no X-Remote-User header: the request did not come through the API server")?;
    let uid = values("x-remote-uid").into_iter().find(|v| !v.is_empty());
    let groups = values("x-remote-group");
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (header, value) in headers {
        let Some(key) = header.as_str().strip_prefix("x-remote-extra-") else {
            continue;
        };
        let Ok(value) = value.to_str() else { continue };
        extra
            .entry(unescape(key).to_lowercase())
            .or_default()
            .push(value.to_string());
    }
    Ok(User {
        name,
        uid,
        groups,
        extra,
    })
}

/// Pure: `%XX` sequences decoded (client-go escapes the extra keys that are not legal in a header
/// name, e.g. the `/` of `authentication.kubernetes.io/credential-id`).
fn unescape(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the review answered.
pub enum Decision {
    Allowed,
    Denied(String),
}

/// Asks the API server whether `user` may `update` `virtualmachineinstances/<subresource>` of
/// group `subresources.kubevirt.io` named `name` in `namespace` (what virt-api asks for a PUT).
pub async fn review(
    client: &kube::Client,
    user: &User,
    namespace: &str,
    name: &str,
    subresource: &str,
) -> Result<Decision, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                verb: Some("update".into()),
                group: Some("subresources.kubevirt.io".into()),
                version: Some("v1".into()),
                resource: Some("virtualmachineinstances".into()),
                subresource: Some(subresource.to_string()),
                name: Some(name.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    let status = answer.status.unwrap_or_default();
    Ok(if status.allowed {
        Decision::Allowed
    } else {
        Decision::Denied(status.reason.unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        map
    }

    #[test]
    fn the_aggregators_headers_name_the_user() {
        let map = headers(&[
            ("X-Remote-User", "system:serviceaccount:ns:freezer"),
            ("X-Remote-Uid", "1234"),
            ("X-Remote-Group", "system:serviceaccounts"),
            ("X-Remote-Group", "system:authenticated"),
            (
                "X-Remote-Extra-Authentication.kubernetes.io%2fcredential-Id",
                "JTI=abc",
            ),
        ]);
        let allowed = vec!["front-proxy-client".to_string()];
        let user = authenticate(Some("front-proxy-client"), &allowed, &map).expect("user");
        assert_eq!(user.name, "system:serviceaccount:ns:freezer");
        assert_eq!(user.uid.as_deref(), Some("1234"));
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", "system:authenticated"]
        );
        assert_eq!(
            user.extra.get("authentication.kubernetes.io/credential-id"),
            Some(&vec!["JTI=abc".to_string()])
        );
    }

    #[test]
    fn a_certificate_of_another_name_or_no_user_is_refused() {
        let map = headers(&[("X-Remote-User", "alice")]);
        let allowed = vec!["front-proxy-client".to_string()];
        let error = authenticate(Some("someone-else"), &allowed, &map).expect_err("refused");
        assert!(error.contains("someone-else"), "{error}");
        assert!(authenticate(None, &allowed, &map).is_err());
        assert!(authenticate(Some("front-proxy-client"), &allowed, &HeaderMap::new()).is_err());
        // No allowed names configured: any certificate of the CA will do.
        assert!(authenticate(Some("someone-else"), &[], &map).is_ok());
    }

    #[test]
    fn escapes_are_decoded_and_stray_percents_kept() {
        assert_eq!(unescape("a%2fb"), "a/b");
        assert_eq!(unescape("100%"), "100%");
        assert_eq!(unescape("%zz"), "%zz");
    }
}
