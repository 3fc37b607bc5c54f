//! [`JsonObject`]: the request body as a JSON object, with the body-level errors (415, 413,
//! malformed JSON) mapped to [`ApiError`] here rather than to axum's plain-text rejections;
//! [`path_text`]: a route's path parameter, for each API to refuse in its own shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde_json::{Map, Value};

use super::error::ApiError;

/// The largest request body accepted. Prompts are bounded by the context (at most a few
/// hundred KiB of text for 8192 positions); 2 MiB leaves room without inviting abuse.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                }
            } else {
                ApiError::bad_body(format!("cannot read the request body: {}", r.body_text()))
            }
        })?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::bad_body("the request body must be a JSON object")),
            Err(e) => Err(ApiError::bad_body(json_error_message(&e))),
        }
    }
}

/// The route's one path parameter as text, or axum's reason why it is not (it is not UTF-8
/// once percent-decoded): each API turns the reason into a 400 in its own shape rather than
/// axum's plain-text rejection.
pub async fn path_text<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, String> {
    match Path::<String>::from_request_parts(parts, state).await {
        Ok(Path(text)) => Ok(text),
        Err(rejection) => Err(rejection.body_text()),
    }
}

/// serde_json names an unpaired UTF-16 surrogate escape (`"\ud800"`) by the parser state it
/// stopped in ("unexpected end of hex escape", "lone leading surrogate" for a trailing one);
/// these are its only sources, so both are said as what the client sent.
fn json_error_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("unexpected end of hex escape")
        || text.starts_with("lone leading surrogate")
    {
        return format!(
            "the request body is not valid JSON: an unpaired UTF-16 surrogate escape \\uD800 to \\uDFFF \
             at line {} column {} (a string holds Unicode characters; one beyond U+FFFF is \
             written as a pair of escapes, high then low)",
            e.line(),
            e.column()
        );
    }
    format!("the request body is not valid JSON: {e}")
}

/// `application/json`, optionally with parameters (`; charset=utf-8`), or any `+json` type.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> String {
        let e = serde_json::from_str::<Value>(body).expect_err("not JSON");
        json_error_message(&e)
    }

    #[test]
    fn an_unpaired_surrogate_is_named_as_such() {
        for body in [
            r#"{"a": "\ud800"}"#,
            r#"{"a": "\ud800x"}"#,
            r#"{"a": "\ud800\n"}"#,
            r#"{"a": "\ud800\u0041"}"#,
            r#"{"a": "\udc00"}"#,
        ] {
            let m = message(body);
            assert!(m.contains("unpaired UTF-16 surrogate"), "{body}: {m}");
            assert!(m.contains("line 1 column"), "{body}: {m}");
        }
        // A pair is a character; other errors keep serde_json's words.
        assert!(serde_json::from_str::<Value>(r#"{"a": "\ud83d\ude00"}"#).is_ok());
        let m = message(r#"{"a": "\u12"}"#);
        assert!(!m.contains("surrogate"), "{m}");
        assert!(message("{").contains("EOF while parsing"));
    }
}
