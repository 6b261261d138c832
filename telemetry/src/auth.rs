//! Who may read `/metrics`: the bearer of a token the API server accepts (a `TokenReview`) whose
//! user may `get` the non-resource URL `/metrics` (a `SubjectAccessReview`), as
//! controller-runtime's secure metrics decide it. So a Prometheus with a ServiceAccount bound to
//! the chart's `livedisk-metrics-reader` ClusterRole may scrape, and nobody else.
//!
//! Decisions are cached briefly by the token's SHA-256 (never the token itself), so a scrape every
//! few seconds costs the API server two reviews a minute, not two per scrape. Errors talking to
//! the API server are not cached.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::error::TelemetryError;

/// The path and verb a scraper must be allowed (the RBAC `nonResourceURLs` rule).
pub const METRICS_PATH: &str = "/metrics";
pub const METRICS_VERB: &str = "get";

/// How long a decision is reused: an allowed token for a minute (its grant may be revoked; the
/// scraper sees that within a minute), a refused one for a few seconds (a grant just added works
/// almost at once, and a flood of bad tokens still costs the API server little).
pub const ALLOWED_TTL: Duration = Duration::from_secs(60);
pub const REFUSED_TTL: Duration = Duration::from_secs(5);

/// At most this many tokens are remembered (there are a handful of scrapers).
pub const CACHE_CAPACITY: usize = 256;

/// What a request to `/metrics` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No token, or one the API server does not accept: 401.
    Unauthenticated,
    /// A valid token whose user may not `get /metrics`: 403.
    Forbidden,
}

impl Decision {
    /// How long this decision may be reused.
    pub fn ttl(self) -> Duration {
        match self {
            Decision::Allowed => ALLOWED_TTL,
            Decision::Unauthenticated | Decision::Forbidden => REFUSED_TTL,
        }
    }
}

/// Pure: the token of an `Authorization: Bearer <token>` header value (the scheme is
/// case-insensitive, as RFC 7235 says).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The cache key of a token.
pub type TokenKey = [u8; 32];

pub fn token_key(token: &str) -> TokenKey {
    Sha256::digest(token.as_bytes()).into()
}

/// Recent decisions by token, each until its expiry. Pure: the caller passes the time.
#[derive(Debug, Default)]
pub struct DecisionCache {
    entries: HashMap<TokenKey, (Decision, Instant)>,
}

impl DecisionCache {
    /// The decision still valid at `now`, if any.
    pub fn get(&self, key: &TokenKey, now: Instant) -> Option<Decision> {
        self.entries
            .get(key)
            .filter(|(_, expires)| now < *expires)
            .map(|(decision, _)| *decision)
    }

    /// Remembers `decision` for its TTL. When full, expired entries go first, then the ones that
    /// expire soonest.
    pub fn put(&mut self, key: TokenKey, decision: Decision, now: Instant) {
        if self.entries.len() >= CACHE_CAPACITY && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, expires)| now < *expires);
            while self.entries.len() >= CACHE_CAPACITY {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, expires))| *expires)
                    .map(|(k, _)| *k);
                match soonest {
                    Some(k) => self.entries.remove(&k),
                    None => break,
                };
            }
        }
        self.entries.insert(key, (decision, now + decision.ttl()));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Pure: the review of a token, asking for the API server's own audiences (those of the
/// ServiceAccount tokens it issues).
pub fn token_review(token: &str) -> TokenReview {
    TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: None,
        },
        ..Default::default()
    }
}

/// Pure: the user a token review accepted, or `None` (401).
pub fn accepted_user(
    status: Option<&TokenReviewStatus>,
) -> Option<&k8s_openapi::api::authentication::v1::UserInfo> {
    let status = status?;
    if status.authenticated != Some(true) {
        return None;
    }
    status.user.as_ref().filter(|u| u.username.is_some())
}

/// Pure: may this user `get /metrics`?
pub fn metrics_access_review(
    user: &k8s_openapi::api::authentication::v1::UserInfo,
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some(METRICS_PATH.to_string()),
                verb: Some(METRICS_VERB.to_string()),
            }),
            resource_attributes: None,
        },
        ..Default::default()
    }
}

/// Pure: allowed only when the authorizer said allowed and not denied.
pub fn access_decision(status: Option<&SubjectAccessReviewStatus>) -> Decision {
    match status {
        Some(s) if s.allowed && s.denied != Some(true) => Decision::Allowed,
        _ => Decision::Forbidden,
    }
}

/// Decides requests with the API server's reviews, through the cache.
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<DecisionCache>,
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
        }
    }

    /// The decision for a request's `Authorization` header value.
    pub async fn decide(&self, authorization: Option<&str>) -> Result<Decision, TelemetryError> {
        let Some(token) = authorization.and_then(bearer_token) else {
            return Ok(Decision::Unauthenticated);
        };
        let key = token_key(token);
        if let Some(decision) = self.cache.lock().await.get(&key, Instant::now()) {
            return Ok(decision);
        }
        let decision = self.review(token).await?;
        self.cache.lock().await.put(key, decision, Instant::now());
        Ok(decision)
    }

    async fn review(&self, token: &str) -> Result<Decision, TelemetryError> {
        let params = PostParams::default();
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&params, &token_review(token))
            .await?;
        let Some(user) = accepted_user(reviewed.status.as_ref()) else {
            return Ok(Decision::Unauthenticated);
        };
        let access = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&params, &metrics_access_review(user))
            .await?;
        Ok(access_decision(access.status.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    #[test]
    fn only_a_bearer_header_with_a_token_carries_one() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn decisions_expire_after_their_ttl() {
        let mut cache = DecisionCache::default();
        let now = Instant::now();
        let (good, bad) = (token_key("good"), token_key("bad"));
        cache.put(good, Decision::Allowed, now);
        cache.put(bad, Decision::Forbidden, now);
        assert_eq!(cache.get(&good, now), Some(Decision::Allowed));
        assert_eq!(cache.get(&bad, now), Some(Decision::Forbidden));
        let later = now + REFUSED_TTL;
        assert_eq!(cache.get(&good, later), Some(Decision::Allowed));
        assert_eq!(
            cache.get(&bad, later),
            None,
            "a refusal is kept only briefly"
        );
        assert_eq!(cache.get(&good, now + ALLOWED_TTL), None);
        assert_eq!(cache.get(&token_key("other"), now), None);
    }

    #[test]
    fn a_full_cache_drops_expired_then_soonest_expiring_entries() {
        let mut cache = DecisionCache::default();
        let start = Instant::now();
        for i in 0..CACHE_CAPACITY {
            cache.put(token_key(&format!("t{i}")), Decision::Allowed, start);
        }
        // A refusal expires before every allowed entry: it is the one dropped next.
        let later = start + Duration::from_secs(1);
        cache.put(token_key("refused"), Decision::Forbidden, later);
        assert_eq!(cache.len(), CACHE_CAPACITY);
        cache.put(token_key("new"), Decision::Allowed, later);
        assert_eq!(cache.len(), CACHE_CAPACITY);
        assert_eq!(cache.get(&token_key("refused"), later), None);
        assert_eq!(cache.get(&token_key("new"), later), Some(Decision::Allowed));
        // Once everything expired, one insert clears them all.
        cache.put(
            token_key("fresh"),
            Decision::Allowed,
            start + ALLOWED_TTL * 3,
        );
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_cache_key_is_a_digest_not_the_token() {
        let key = token_key("secret-token");
        assert_ne!(&key[..12], b"secret-token");
        assert_eq!(key, token_key("secret-token"));
        assert_ne!(key, token_key("secret-token2"));
    }

    fn user() -> UserInfo {
        UserInfo {
            username: Some("system:serviceaccount:monitoring:prometheus".into()),
            uid: Some("u-1".into()),
            groups: Some(vec!["system:serviceaccounts".into()]),
            extra: None,
        }
    }

    #[test]
    fn only_an_authenticated_review_with_a_user_accepts_the_token() {
        let ok = TokenReviewStatus {
            authenticated: Some(true),
            user: Some(user()),
            ..Default::default()
        };
        assert_eq!(accepted_user(Some(&ok)), Some(&user()));
        let refused = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token expired".into()),
            ..Default::default()
        };
        assert_eq!(accepted_user(Some(&refused)), None);
        assert_eq!(accepted_user(None), None);
        let nameless = TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo::default()),
            ..Default::default()
        };
        assert_eq!(accepted_user(Some(&nameless)), None);
    }

    #[test]
    fn the_access_review_asks_for_get_on_the_metrics_url_as_the_user() {
        let review = metrics_access_review(&user());
        let spec = review.spec;
        assert_eq!(spec.user, user().username);
        assert_eq!(spec.groups, user().groups);
        assert_eq!(spec.uid, user().uid);
        let url = spec.non_resource_attributes.expect("a non-resource review");
        assert_eq!(url.path.as_deref(), Some("/metrics"));
        assert_eq!(url.verb.as_deref(), Some("get"));
        assert!(spec.resource_attributes.is_none());
    }

    #[test]
    fn access_is_allowed_only_when_allowed_and_not_denied() {
        let status = |allowed, denied| SubjectAccessReviewStatus {
            allowed,
            denied,
            ..Default::default()
        };
        assert_eq!(
            access_decision(Some(&status(true, None))),
            Decision::Allowed
        );
        assert_eq!(
            access_decision(Some(&status(true, Some(true)))),
            Decision::Forbidden
        );
        assert_eq!(
            access_decision(Some(&status(false, None))),
            Decision::Forbidden
        );
        assert_eq!(access_decision(None), Decision::Forbidden);
    }
}
