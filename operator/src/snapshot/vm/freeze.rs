//! The guest freeze through KubeVirt's `subresources.kubevirt.io` API (served by virt-api, an
//! aggregated API): `PUT .../virtualmachineinstances/NAME/freeze` with an unfreeze timeout, after
//! which the guest agent thaws by itself, and `PUT .../unfreeze`. Both answer 409 unless the
//! instance is running.

use std::time::Duration;

use kube::Client;

/// How long the guest agent keeps the guest frozen if no unfreeze comes (an operator that dies
/// mid-freeze): the cut of a group is O(1), so a minute is far more than it needs.
pub const UNFREEZE_TIMEOUT: Duration = Duration::from_secs(60);

fn path(namespace: &str, name: &str, verb: &str) -> String {
    format!(
        "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/{verb}"
    )
}

/// What the API answered when it refused: the HTTP code (0 when no answer came) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{} ({})", self.message, self.code)
        }
    }
}

async fn put(client: &Client, uri: String, body: Vec<u8>) -> Result<(), Refused> {
    let request = http::Request::put(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| Refused {
            code: 0,
            message: e.to_string(),
        })?;
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(Refused {
            code: status.code,
            message: status.message.clone(),
        }),
        Err(other) => Err(Refused {
            code: 0,
            message: other.to_string(),
        }),
    }
}

/// Freezes the guest filesystems of the instance.
pub async fn freeze(
    client: &Client,
    namespace: &str,
    name: &str,
    unfreeze_timeout: Duration,
) -> Result<(), Refused> {
    let body = serde_json::json!({ "unfreezeTimeout": format!("{}s", unfreeze_timeout.as_secs()) });
    put(
        client,
        path(namespace, name, "freeze"),
        body.to_string().into_bytes(),
    )
    .await
}

/// Thaws the guest filesystems of the instance.
pub async fn unfreeze(client: &Client, namespace: &str, name: &str) -> Result<(), Refused> {
    put(client, path(namespace, name, "unfreeze"), Vec::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paths_are_kubevirts() {
        assert_eq!(
            path("ns", "vm", "freeze"),
            "/apis/subresources.kubevirt.io/v1/namespaces/ns/virtualmachineinstances/vm/freeze"
        );
    }
}
