//! The HTTP side: discovery of `subresources.kubevirt.io/v1` and the `freeze` / `unfreeze`
//! subresources of `virtualmachineinstances`, answered as KubeVirt's virt-api answers them.
//!
//! virt-api's answers, which these copy: 200 with an empty body on success; 404 when the VMI does
//! not exist; 409 "VM is not running" (freeze) / "VMI is not running" (unfreeze) when its
//! `status.phase` is not `Running`; and every failure past that point (virt-handler's 400 for a
//! missing or unreadable `unfreezeTimeout`, the guest agent's failure) as a 500 InternalError
//! "unexpected return code 400 (400 Bad Request)", since virt-api wraps whatever virt-handler
//! refused. The stand-in appends its own reason to that message. Errors are `Status` objects.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::auth::{self, Decision, User};
use crate::duration::{parse_go_duration, whole_seconds};
use crate::guest::{Froze, GuestError, Guests, Vmi};
use crate::record::{Call, Recorder};

pub const GROUP: &str = "subresources.kubevirt.io";
pub const VERSION: &str = "v1";

/// Test knob: hold a successful freeze's answer this many seconds (after the guest is frozen
/// and the call recorded), so that a test can stop the caller in the middle of a freeze.
pub const FREEZE_DELAY_ANNOTATION: &str = "livedisk.io/standin-freeze-delay";
/// Test knob: the guest agent fails the freeze with this message (answered as virt-api would:
/// 500).
pub const FREEZE_ERROR_ANNOTATION: &str = "livedisk.io/standin-freeze-error";

/// A freeze body larger than this is refused (virt-handler reads 1 KiB of it).
const BODY_LIMIT: usize = 64 << 10;

pub struct Server {
    pub client: kube::Client,
    pub guests: Arc<Guests>,
    pub recorder: Arc<Recorder>,
    pub allowed_names: Vec<String>,
}

type Answer = Response<Full<Bytes>>;

/// One request of a connection whose verified client certificate has common name `peer_cn`.
pub async fn handle(
    server: Arc<Server>,
    peer_cn: Arc<Option<String>>,
    request: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    let answer = match segments.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] if is_read(&method) => text(StatusCode::OK, "ok"),
        ["apis"] if is_read(&method) => object(StatusCode::OK, group_list()),
        // The aggregator merges every aggregated server's OpenAPI documents into its own (and
        // retries, logging, when there are none): empty ones.
        ["openapi", "v2"] if is_read(&method) => object(StatusCode::OK, openapi_v2()),
        ["openapi", "v3"] if is_read(&method) => object(StatusCode::OK, json!({"paths": {}})),
        ["apis", GROUP] if is_read(&method) => object(StatusCode::OK, group()),
        ["apis", GROUP, VERSION] if is_read(&method) => object(StatusCode::OK, resource_list()),
        [
            "apis",
            GROUP,
            VERSION,
            "namespaces",
            namespace,
            "virtualmachineinstances",
            name,
            op @ ("freeze" | "unfreeze"),
        ] if !namespace.is_empty() && !name.is_empty() => {
            if method != Method::PUT {
                failure(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    &format!(
                        "the server does not allow this method on the requested resource: {method} {op}"
                    ),
                    None,
                )
            } else {
                let (namespace, name, op) =
                    (namespace.to_string(), name.to_string(), op.to_string());
                call(&server, peer_cn.as_deref(), request, &namespace, &name, &op).await
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            None,
        ),
    };
    Ok(answer)
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// An answer, what the record says about it, and how long to hold it.
struct Reply {
    answer: Answer,
    note: Option<String>,
    delay: Option<Duration>,
}

impl Reply {
    fn ok() -> Self {
        Self {
            answer: ok(),
            note: None,
            delay: None,
        }
    }

    fn failure(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Self {
        Self {
            answer: failure(code, reason, message, details),
            note: Some(message.to_string()),
            delay: None,
        }
    }

    /// virt-api's InternalError.
    fn internal(error: &str) -> Self {
        let details = json!({"causes": [{"message": error}]});
        Self::failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &format!("Internal error occurred: {error}"),
            Some(details),
        )
    }

    /// What virt-api answers when virt-handler refused the call with its 400, plus the
    /// stand-in's reason.
    fn virt_handler_refused(why: &str) -> Self {
        Self::internal(&format!(
            "unexpected return code 400 (400 Bad Request) (stand-in: {why})"
        ))
    }
}

/// A freeze or unfreeze: authenticated, authorized, carried out, recorded, answered.
async fn call(
    server: &Arc<Server>,
    peer_cn: Option<&str>,
    request: Request<Incoming>,
    namespace: &str,
    name: &str,
    op: &str,
) -> Answer {
    let op: &'static str = if op == "freeze" { "freeze" } else { "unfreeze" };
    let user = auth::authenticate(peer_cn, &server.allowed_names, request.headers());
    let body = Limited::new(request.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map(|b| b.to_bytes());
    let mut call = Call {
        op,
        namespace: namespace.to_string(),
        name: name.to_string(),
        user: user.as_ref().ok().map(|u| u.name.clone()),
        ..Default::default()
    };
    if op == "freeze"
        && let Ok(bytes) = &body
    {
        call.unfreeze_timeout = timeout_text(bytes);
    }
    let reply = match user {
        Err(reason) => Reply::failure(StatusCode::UNAUTHORIZED, "Unauthorized", &reason, None),
        Ok(user) => carry_out(server, &user, namespace, name, op, body).await,
    };
    call.code = Some(reply.answer.status().as_u16());
    call.message = reply.note;
    server.recorder.record(&call);
    if let Some(delay) = reply.delay {
        tracing::info!(%namespace, %name, ?delay, "holding the freeze answer ({FREEZE_DELAY_ANNOTATION})");
        tokio::time::sleep(delay).await;
    }
    reply.answer
}

type Body = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

async fn carry_out(
    server: &Arc<Server>,
    user: &User,
    namespace: &str,
    name: &str,
    op: &'static str,
    body: Body,
) -> Reply {
    match auth::review(&server.client, user, namespace, name, op).await {
        Err(error) => return Reply::internal(&format!("access review: {error}")),
        Ok(Decision::Denied(reason)) => {
            let mut message = format!(
                "virtualmachineinstances.{GROUP} {name:?} is forbidden: User {:?} cannot update resource \"virtualmachineinstances/{op}\" in API group \"{GROUP}\" in the namespace {namespace:?}",
                user.name
            );
            if !reason.is_empty() {
                message.push_str(": ");
                message.push_str(&reason);
            }
            let details = json!({"name": name, "group": GROUP, "kind": "virtualmachineinstances"});
            return Reply::failure(StatusCode::FORBIDDEN, "Forbidden", &message, Some(details));
        }
        Ok(Decision::Allowed) => {}
    }
    let details = json!({"name": name, "group": "kubevirt.io", "kind": "virtualmachineinstance"});
    let vmi = match server.guests.get(namespace, name).await {
        Err(error) => return Reply::internal(&format!("getting the VMI: {error}")),
        Ok(None) => {
            let message = format!("virtualmachineinstance.kubevirt.io {name:?} not found");
            return Reply::failure(StatusCode::NOT_FOUND, "NotFound", &message, Some(details));
        }
        Ok(Some(vmi)) => vmi,
    };
    if vmi.phase.as_deref() != Some("Running") {
        let why = if op == "freeze" {
            "VM is not running"
        } else {
            "VMI is not running"
        };
        let message = format!(
            "Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io {name:?}: {why}"
        );
        return Reply::failure(StatusCode::CONFLICT, "Conflict", &message, Some(details));
    }
    if op == "unfreeze" {
        return match server.guests.unfreeze(&vmi).await {
            Ok((was_frozen, thawed)) => Reply {
                note: unfreeze_note(was_frozen, thawed),
                ..Reply::ok()
            },
            Err(GuestError::Agent(error)) => {
                Reply::virt_handler_refused(&format!("the guest agent failed the thaw: {error}"))
            }
            Err(GuestError::Api(error)) => {
                Reply::internal(&format!("clearing the VMI's freeze status: {error}"))
            }
        };
    }
    freeze(server, &vmi, body).await
}

async fn freeze(server: &Arc<Server>, vmi: &Vmi, body: Body) -> Reply {
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(error) => {
            return Reply::virt_handler_refused(&format!("reading the request body: {error}"));
        }
    };
    let (nanos, text) = match parse_freeze_body(&bytes) {
        Ok(parsed) => parsed,
        Err(why) => return Reply::virt_handler_refused(&why),
    };
    if let Some(message) = vmi.annotations.get(FREEZE_ERROR_ANNOTATION) {
        return Reply::virt_handler_refused(&format!(
            "the guest agent failed the freeze: {message} ({FREEZE_ERROR_ANNOTATION})"
        ));
    }
    let delay = match vmi.annotations.get(FREEZE_DELAY_ANNOTATION) {
        None => None,
        Some(seconds) => match seconds.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
            _ => {
                return Reply::internal(&format!(
                    "{FREEZE_DELAY_ANNOTATION} is {seconds:?}, not a number of seconds"
                ));
            }
        },
    };
    match server.guests.freeze(vmi, whole_seconds(nanos), &text).await {
        Ok(Froze::Now(count)) => Reply {
            note: count.map(|n| format!("the guest agent froze {n} filesystems")),
            delay,
            ..Reply::ok()
        },
        Ok(Froze::AlreadyFrozen) => Reply {
            note: Some(
                "already frozen: nothing changed; the first freeze's safety timer runs on".into(),
            ),
            delay,
            ..Reply::ok()
        },
        Err(GuestError::Agent(error)) => {
            Reply::virt_handler_refused(&format!("the guest agent failed the freeze: {error}"))
        }
        Err(GuestError::Api(error)) => {
            Reply::internal(&format!("setting the VMI's freeze status: {error}"))
        }
    }
}

/// Pure: what the record says of an unfreeze.
fn unfreeze_note(was_frozen: bool, thawed: Option<u64>) -> Option<String> {
    match (was_frozen, thawed) {
        (true, None) => None,
        (false, None) => Some("was not frozen".into()),
        (true, Some(n)) => Some(format!("the guest agent thawed {n} filesystems")),
        (false, Some(n)) => Some(format!(
            "was not frozen by this stand-in; the guest agent thawed {n} filesystems"
        )),
    }
}

/// Pure: the `unfreezeTimeout` of a freeze body, as nanoseconds and as written, or virt-handler's
/// reason to refuse it. Like virt-handler's decoder: an empty body or one without the field is
/// "not set"; anything after the first JSON value is ignored; unknown fields are ignored.
pub fn parse_freeze_body(bytes: &[u8]) -> Result<(i128, String), String> {
    const NOT_SET: &str = "Unfreeze timeout in freeze request is not set";
    const UNREADABLE: &str = "failed to unmarshal unfreeze timeout";
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(NOT_SET.into());
    }
    let first = serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .next();
    let value = match first {
        Some(Ok(value)) => value,
        Some(Err(error)) => return Err(format!("{UNREADABLE}: {error}")),
        None => return Err(NOT_SET.into()),
    };
    let field = match &value {
        Value::Null => None,
        Value::Object(map) => map.get("unfreezeTimeout"),
        other => return Err(format!("{UNREADABLE}: the body is {other}, not an object")),
    };
    match field {
        None | Some(Value::Null) => Err(NOT_SET.into()),
        Some(Value::String(text)) => parse_go_duration(text)
            .map(|nanos| (nanos, text.clone()))
            .map_err(|e| format!("{UNREADABLE}: {e}")),
        Some(other) => Err(format!(
            "{UNREADABLE}: unfreezeTimeout is {other}, not a duration string"
        )),
    }
}

/// Pure: the `unfreezeTimeout` string a body carries, if it is one (for the record).
fn timeout_text(bytes: &[u8]) -> Option<String> {
    let value = serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .next()?
        .ok()?;
    value.get("unfreezeTimeout")?.as_str().map(str::to_string)
}

fn ok() -> Answer {
    let mut answer = Response::new(Full::new(Bytes::new()));
    *answer.status_mut() = StatusCode::OK;
    answer
}

fn text(code: StatusCode, body: &'static str) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *answer.status_mut() = code;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    answer
}

fn object(code: StatusCode, value: Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(value.to_string())));
    *answer.status_mut() = code;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

/// A `Status` failure.
fn failure(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Answer {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let (Some(details), Some(map)) = (details, status.as_object_mut()) {
        map.insert("details".into(), details);
    }
    object(code, status)
}

fn openapi_v2() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "KubeVirt virt-api stand-in (livedisk tests)", "version": VERSION},
        "paths": {},
    })
}

fn group() -> Value {
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [{"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION}],
        "preferredVersion": {"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION},
    })
}

fn group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]})
}

/// Only the two subresources the stand-in serves (virt-api lists many more).
fn resource_list() -> Value {
    let subresource = |name: &str| {
        json!({
            "name": format!("virtualmachineinstances/{name}"),
            "singularName": "",
            "namespaced": true,
            "kind": "",
            "verbs": ["update"],
        })
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [subresource("freeze"), subresource("unfreeze")],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freeze_bodies_are_read_as_virt_handler_reads_them() {
        assert_eq!(
            parse_freeze_body(br#"{"unfreezeTimeout": "5m0s"}"#),
            Ok((300_000_000_000, "5m0s".to_string()))
        );
        assert_eq!(
            parse_freeze_body(br#"{"unfreezeTimeout":"2s","other":1} trailing"#),
            Ok((2_000_000_000, "2s".to_string()))
        );
        for not_set in [
            &b""[..],
            b"  ",
            b"{}",
            b"null",
            br#"{"unfreezeTimeout":null}"#,
        ] {
            let error = parse_freeze_body(not_set).expect_err("not set");
            assert!(error.contains("not set"), "{error}");
        }
        for unreadable in [
            &br#"{"unfreezeTimeout": 5}"#[..],
            br#"{"unfreezeTimeout": "soon"}"#,
            b"[1]",
            b"{not json",
        ] {
            let error = parse_freeze_body(unreadable).expect_err("unreadable");
            assert!(error.contains("failed to unmarshal"), "{error}");
        }
    }

    #[test]
    fn failures_are_status_objects() {
        let reply = Reply::failure(StatusCode::CONFLICT, "Conflict", "VM is not running", None);
        assert_eq!(reply.answer.status(), StatusCode::CONFLICT);
        assert_eq!(reply.note.as_deref(), Some("VM is not running"));
        let reply = Reply::virt_handler_refused("x");
        assert_eq!(reply.answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            reply.note.as_deref().is_some_and(
                |n| n.starts_with("Internal error occurred: unexpected return code 400")
            ),
            "{:?}",
            reply.note
        );
    }

    #[test]
    fn discovery_lists_both_subresources() {
        let list = resource_list();
        let names: Vec<&str> = list["resources"]
            .as_array()
            .map(|r| r.iter().filter_map(|r| r["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            names,
            [
                "virtualmachineinstances/freeze",
                "virtualmachineinstances/unfreeze"
            ]
        );
        assert_eq!(group_list()["groups"][0]["name"], GROUP);
    }

    #[test]
    fn the_record_takes_the_timeout_as_written() {
        assert_eq!(
            timeout_text(br#"{"unfreezeTimeout":"2s"}"#).as_deref(),
            Some("2s")
        );
        assert_eq!(timeout_text(b"{}"), None);
        assert_eq!(timeout_text(b"nonsense"), None);
    }
}
