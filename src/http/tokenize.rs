//! `POST /tokenize` and `POST /detokenize`, in the shapes llama-server users know.
//!
//! - `/tokenize {"content", "add_special"?: false, "parse_special"?: true, "with_pieces"?: false}`
//!   → `{"tokens": [ids]}`, or with `with_pieces` `{"tokens": [{"id", "piece"}]}` where `piece`
//!   is the token's text, or its bytes as a number array when they are not valid UTF-8 on
//!   their own.
//! - `/detokenize {"tokens": [ids]}` → `{"content"}`, special tokens rendered as their text.
//!
//! Errors use the OpenAI shape, as llama-server's do.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::{Value, json};

use super::AppState;
use super::openai::run::{off_the_runtime, ready};
use super::openai::{OpenAiError, OpenAiJson};

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Piece {
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Serialize)]
struct TokenWithPiece {
    id: u32,
    piece: Piece,
}

fn flag(
    body: &serde_json::Map<String, Value>,
    name: &str,
    default: bool,
) -> Result<bool, OpenAiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(OpenAiError::invalid(name, "must be a boolean")),
    }
}

pub async fn tokenize(
    State(app): State<AppState>,
    OpenAiJson(body): OpenAiJson,
) -> Result<Json<Value>, OpenAiError> {
    let served = ready(&app)?;
    let content = match body.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(OpenAiError::invalid("content", "must be a string")),
        None => return Err(OpenAiError::invalid("content", "required")),
    };
    let add_special = flag(&body, "add_special", false)?;
    let parse_special = flag(&body, "parse_special", true)?;
    let with_pieces = flag(&body, "with_pieces", false)?;
    let tokenizer = served.meta.tokenizer.clone();
    off_the_runtime(content.len(), move || {
        let ids = tokenizer
            .encode_with_special(&content, parse_special, add_special)
            .map_err(|e| OpenAiError::invalid("content", format!("cannot be tokenized: {e}")))?;
        if !with_pieces {
            return Ok(Json(json!({ "tokens": ids })));
        }
        let tokens: Vec<TokenWithPiece> = ids
            .into_iter()
            .map(|id| {
                let bytes = tokenizer.token_bytes(id, true);
                let piece = match std::str::from_utf8(bytes) {
                    Ok(text) => Piece::Text(text.to_string()),
                    Err(_) => Piece::Bytes(bytes.to_vec()),
                };
                TokenWithPiece { id, piece }
            })
            .collect();
        Ok(Json(json!({ "tokens": tokens })))
    })
    .await?
}

pub async fn detokenize(
    State(app): State<AppState>,
    OpenAiJson(body): OpenAiJson,
) -> Result<Json<Value>, OpenAiError> {
    let served = ready(&app)?;
    let ids: Vec<u32> = match body.get("tokens") {
        Some(Value::Array(items)) => {
            let mut ids = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                match v.as_u64().and_then(|id| u32::try_from(id).ok()) {
                    Some(id) => ids.push(id),
                    None => {
                        return Err(OpenAiError::invalid(
                            &format!("tokens[{i}]"),
                            "must be a token id",
                        ));
                    }
                }
            }
            ids
        }
        Some(_) => {
            return Err(OpenAiError::invalid(
                "tokens",
                "must be an array of token ids",
            ));
        }
        None => return Err(OpenAiError::invalid("tokens", "required")),
    };
    let tokenizer = served.meta.tokenizer.clone();
    off_the_runtime(ids.len() * 4, move || {
        tokenizer
            .decode(&ids, true)
            .map(|content| Json(json!({ "content": content })))
            .map_err(|e| OpenAiError::invalid("tokens", e.to_string()))
    })
    .await?
}
