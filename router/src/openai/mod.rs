//! The OpenAI-compatible HTTP API: `/v1/chat/completions` and `/v1/completions` (whole or streamed as server-sent
//! events), `/v1/models`, and the `/health` (process up) and `/ready` (workers answering) probes.
//!
//! A handler parses the body ([`request`]), asks the [`Frontend`] for a token stream, and either gathers it into
//! one response or relays it as SSE chunks ([`response`]). The relay watches the client: when the connection
//! goes away the stream is dropped, which cancels the decode call and with it the work on every node.

pub mod request;
pub mod response;
mod sse;

use crate::error::RouterError;
use crate::frontend::{Frontend, TokenStream};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use request::{Endpoint, Parsed};
use response::{Logprobs, Meta};
use serde_json::{Value, json};
use std::sync::Arc;

pub fn routes(frontend: Arc<Frontend>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(not_found)
        .with_state(frontend)
}

fn error_response(e: &RouterError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(response::error_body(e))).into_response();
    if let Some(s) = e.retry_after_s() {
        r.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, s.into());
    }
    r
}

/// The caller's API key: the `Authorization: Bearer` value, if any.
fn api_key(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    Some(crate::admission::api_key(v))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": "no such endpoint", "type": "invalid_request_error", "param": null, "code": "not_found"}})),
    )
        .into_response()
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once there is a decode worker and every worker answered; the body lists the pool either way.
async fn ready(State(f): State<Arc<Frontend>>) -> Response {
    let workers: Vec<Value> = f
        .workers
        .all()
        .iter()
        .map(|w| {
            json!({"role": w.role.as_str(), "endpoint": w.endpoint.0, "healthy": w.is_healthy(),
                   "recent_step_us": w.recent_step_us()})
        })
        .collect();
    if f.workers.all_seen() {
        Json(json!({"status": "ready", "workers": workers})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "waiting for workers", "workers": workers})),
        )
            .into_response()
    }
}

async fn models(State(f): State<Arc<Frontend>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": f.model.id, "object": "model", "created": 0, "owned_by": "tandem", "max_model_len": f.model.context_len,
    }]}))
}

async fn chat(State(f): State<Arc<Frontend>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(f, api_key(&headers), &body, Endpoint::Chat).await
}

async fn completions(State(f): State<Arc<Frontend>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(f, api_key(&headers), &body, Endpoint::Completions).await
}

async fn handle(
    f: Arc<Frontend>,
    key: Option<String>,
    body: &[u8],
    endpoint: Endpoint,
) -> Response {
    let mut parsed = match request::parse(body, endpoint) {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    parsed.params.api_key = key;
    let meta = Meta {
        id: String::new(),
        created: response::now_unix(),
        model: f.model.id.clone(),
        endpoint,
    };
    let stream = match f.generate(parsed.params.clone()).await {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let meta = Meta {
        id: format!("{prefix}-{}", stream.request_id),
        ..meta
    };
    if parsed.stream {
        sse(stream, meta, &parsed).into_response()
    } else {
        whole(stream, meta, &parsed).await
    }
}

async fn whole(mut stream: TokenStream, meta: Meta, parsed: &Parsed) -> Response {
    let mut text = String::new();
    let mut logprobs = Logprobs::default();
    loop {
        match stream.next().await {
            Ok(Some(m)) => {
                text.push_str(&m.text);
                logprobs.extend(&m);
                if let Some(u) = &m.usage {
                    let finish = response::finish_reason(&m);
                    let lp = parsed.logprobs.then_some(&logprobs);
                    return Json(response::whole(
                        &meta,
                        &text,
                        finish,
                        lp,
                        response::usage(u),
                    ))
                    .into_response();
                }
            }
            Ok(None) => {
                return error_response(&RouterError::Worker {
                    code: tonic::Code::Unavailable,
                    message: "the decode worker ended the stream early".into(),
                });
            }
            Err(e) => return error_response(&e),
        }
    }
}

fn sse(stream: TokenStream, meta: Meta, parsed: &Parsed) -> impl IntoResponse {
    Sse::new(sse::SseRelay::new(stream, meta, parsed)).keep_alive(KeepAlive::default())
}
