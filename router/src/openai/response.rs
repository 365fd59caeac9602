//! OpenAI response bodies: whole completions, streaming chunks, logprobs in both endpoints' shapes, usage, and
//! the error body. Built as `serde_json::Value`s from the wire messages the decode worker streams.

use crate::error::RouterError;
use crate::openai::request::Endpoint;
use serde_json::{Value, json};
use tandem_proto::v1;

/// What identifies one response across its chunks.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn finish_reason(m: &v1::GenerateResponse) -> Option<&'static str> {
    match v1::FinishReason::try_from(m.finish_reason) {
        Ok(v1::FinishReason::Stop) => Some("stop"),
        Ok(v1::FinishReason::Length) => Some("length"),
        _ => None,
    }
}

pub fn usage(u: &v1::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// Logprobs gathered over a response, rendered per endpoint.
#[derive(Debug, Default, Clone)]
pub struct Logprobs {
    entries: Vec<v1::TokenLogprob>,
}

impl Logprobs {
    pub fn extend(&mut self, m: &v1::GenerateResponse) {
        self.entries.extend(m.logprobs.iter().cloned());
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Chat shape: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    pub fn chat(&self) -> Value {
        let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
        json!({"content": self.entries.iter().map(|e| {
            let mut v = entry(&e.text, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|t| entry(&t.text, t.logprob)).collect();
            v
        }).collect::<Vec<_>>()})
    }

    /// Completions shape: parallel arrays; `text_offset` counts bytes from `offset`.
    pub fn completion(&self, mut offset: usize) -> Value {
        let mut text_offset = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            text_offset.push(offset);
            offset += e.text.len();
        }
        json!({
            "tokens": self.entries.iter().map(|e| e.text.clone()).collect::<Vec<_>>(),
            "token_logprobs": self.entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
            "top_logprobs": self.entries.iter().map(|e| {
                e.top.iter().map(|t| (t.text.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>(),
            "text_offset": text_offset,
        })
    }
}

/// A whole (non-streamed) response.
pub fn whole(
    meta: &Meta,
    text: &str,
    finish: Option<&str>,
    logprobs: Option<&Logprobs>,
    usage_v: Value,
) -> Value {
    match meta.endpoint {
        Endpoint::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs.map(Logprobs::chat),
                "finish_reason": finish,
            }],
            "usage": usage_v,
        }),
        Endpoint::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": logprobs.map(|l| l.completion(0)),
                "finish_reason": finish,
            }],
            "usage": usage_v,
        }),
    }
}

/// One streamed chunk carrying `text` (and the chat role on the first chunk).
pub fn chunk(
    meta: &Meta,
    text: &str,
    first: bool,
    finish: Option<&str>,
    logprobs: Option<Value>,
) -> Value {
    match meta.endpoint {
        Endpoint::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else if text.is_empty() && finish.is_some() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({
                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            })
        }
        Endpoint::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }),
    }
}

/// The last chunk when `stream_options.include_usage` is set: no choices, only usage.
pub fn usage_chunk(meta: &Meta, usage_v: Value) -> Value {
    let object = match meta.endpoint {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
    };
    json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model, "choices": [], "usage": usage_v})
}

/// OpenAI's error body.
pub fn error_body(e: &RouterError) -> Value {
    json!({"error": {"message": e.to_string(), "type": e.kind(), "param": e.param(), "code": e.code()}})
}
