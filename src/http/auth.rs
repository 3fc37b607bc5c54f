//! Bearer-token authentication.
//!
//! The expected token is kept only as its SHA-256 digest; a presented token is hashed and the
//! digests are compared in constant time, so neither the token's contents nor its length leak
//! through timing. Logs only ever see [`fingerprint`]s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// One API key: the name jobs are owned under, and the token that presents it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub token: String,
}

impl ApiKey {
    pub fn new(name: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            token: token.into(),
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("token", &fingerprint(&self.token))
            .finish()
    }
}

/// Who made a request: the name of the key it presented (empty without authentication). Jobs
/// belong to it: another caller is told they do not exist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller(pub Arc<str>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    /// The caller the token check recorded; anonymous on a route without it.
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_default())
    }
}

/// What requests must present: one of the keys, each kept only as its digest. No keys:
/// authentication is off (loopback only, enforced at startup).
#[derive(Clone)]
pub struct ApiAuth {
    keys: Vec<(Arc<str>, [u8; 32])>,
    /// Wrong-key warnings are logged at most once per [`WARN_EVERY`], so a client hammering
    /// with a bad key cannot flood the log.
    warnings: Arc<RateLimit>,
}

const WARN_EVERY: Duration = Duration::from_secs(10);

/// When a warning was last written, and how many were held back since.
#[derive(Default)]
struct RateLimit {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// `Some(held back since the last one)` when a warning may be written now.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only, as `ApiKey` shows them: the digests and the warning limiter stay out.
        let names: Vec<&str> = self.keys.iter().map(|(name, _)| &**name).collect();
        f.debug_struct("ApiAuth")
            .field("keys", &names)
            .finish_non_exhaustive()
    }
}

impl ApiAuth {
    /// One key (named `default`), or none.
    pub fn new(expected_token: Option<&str>) -> Self {
        Self::with_keys(
            &expected_token
                .map(|t| vec![ApiKey::new("default", t)])
                .unwrap_or_default(),
        )
    }

    pub fn with_keys(keys: &[ApiKey]) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|k| (Arc::from(k.name.as_str()), digest(&k.token)))
                .collect(),
            warnings: Arc::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks the `Authorization` header of a request; returns who made it.
    pub fn check(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if self.keys.is_empty() {
            return Ok(Caller::default());
        }
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let first = values.next();
        if values.next().is_some() {
            // Which of several would count is a proxy's or a client's guess: refuse them all.
            return Err(ApiError::InvalidApiKey);
        }
        let presented = first
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or(ApiError::MissingApiKey)?;
        let presented_digest = digest(presented);
        // Every key is compared, so the time taken does not tell which one (if any) matched.
        let matched = self.keys.iter().fold(None, |found, (name, key)| {
            if constant_time_eq(&presented_digest, key) {
                Some(name.clone())
            } else {
                found
            }
        });
        if let Some(name) = matched {
            Ok(Caller(name))
        } else {
            if let Some(held_back) = self.warnings.admit(Instant::now()) {
                tracing::warn!(
                    presented = %fingerprint(presented),
                    held_back,
                    "rejected a request with an invalid API key"
                );
            }
            Err(ApiError::InvalidApiKey)
        }
    }
}

/// `Bearer <token>` (scheme case-insensitive) → the token; `None` for any other shape.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The first 8 hex digits of the token's SHA-256: enough to tell tokens apart in logs, useless
/// for recovering one.
pub fn fingerprint(token: &str) -> String {
    digest(token)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Axum middleware: every route it wraps requires the token.
pub async fn require_token(
    State(auth): State<Arc<ApiAuth>>,
    request: Request,
    next: Next,
) -> Response {
    let mut request = request;
    match auth.check(request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn more_than_one_authorization_header_is_refused_whatever_the_order() {
        let auth = ApiAuth::new(Some("s3cret"));
        for pair in [
            ["Bearer s3cret", "Bearer wrong"],
            ["Bearer wrong", "Bearer s3cret"],
        ] {
            let mut h = HeaderMap::new();
            for v in pair {
                h.append(header::AUTHORIZATION, HeaderValue::from_static(v));
            }
            let got = auth.check(&h).map_err(|e| e.code());
            assert_eq!(got, Err("INVALID_API_KEY"), "{pair:?}");
        }
    }

    #[test]
    fn wrong_key_warnings_are_rate_limited() {
        let limit = RateLimit::default();
        let t0 = Instant::now();
        assert_eq!(limit.admit(t0), Some(0));
        assert_eq!(limit.admit(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.admit(t0 + Duration::from_secs(2)), None);
        assert_eq!(limit.admit(t0 + WARN_EVERY), Some(2));
    }

    #[test]
    fn header_table() {
        let auth = ApiAuth::new(Some("s3cret"));
        let cases: &[(Option<&str>, &str)] = &[
            (None, "MISSING_API_KEY"),
            (Some(""), "MISSING_API_KEY"),
            (Some("Bearer"), "MISSING_API_KEY"),
            (Some("Bearer "), "MISSING_API_KEY"),
            (Some("Basic czNjcmV0"), "MISSING_API_KEY"),
            (Some("s3cret"), "MISSING_API_KEY"),
            (Some("Bearer wrong"), "INVALID_API_KEY"),
            (Some("Bearer s3cret2"), "INVALID_API_KEY"),
            (Some("Bearer s3cre"), "INVALID_API_KEY"),
            (Some("Bearer s3cret"), "ok"),
            (Some("bearer s3cret"), "ok"),
            (Some("Bearer  s3cret "), "ok"),
        ];
        for (value, want) in cases {
            let got = match auth.check(&headers(*value)) {
                Ok(_) => "ok",
                Err(e) => e.code(),
            };
            assert_eq!(got, *want, "Authorization: {value:?}");
        }
    }

    #[test]
    fn disabled_auth_accepts_anything() {
        let auth = ApiAuth::new(None);
        assert!(auth.check(&headers(None)).is_ok());
        assert!(auth.check(&headers(Some("Bearer x"))).is_ok());
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        assert_eq!(fingerprint("abc"), "ba7816bf");
        assert_ne!(fingerprint("abc"), fingerprint("abd"));
    }
}
