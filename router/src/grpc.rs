//! The client gRPC API (`tandem.v1.Generation`): the same core as the HTTP API, with the wire's own defaults
//! (greedy when `temperature` is 0, `max_tokens` 0 = as many as the context leaves).

use crate::frontend::{Frontend, GenerateParams, Input, KvTransfer};
use std::sync::Arc;
use tandem_proto::{convert, v1};
use tonic::{Request, Response, Status};

pub struct GenerationService {
    frontend: Arc<Frontend>,
}

impl GenerationService {
    pub fn new(frontend: Arc<Frontend>) -> Self {
        Self { frontend }
    }
}

fn input(
    chat: Option<&v1::ChatMessages>,
    prompt: Option<&str>,
    tokens: Option<&v1::TokenIds>,
) -> Result<Input, Status> {
    if let Some(c) = chat {
        return convert::chat_from_wire(c)
            .map(Input::Chat)
            .map_err(|e| Status::invalid_argument(e.to_string()));
    }
    if let Some(p) = prompt {
        return Ok(Input::Text(p.to_string()));
    }
    if let Some(t) = tokens {
        return Ok(Input::Tokens(t.ids.clone()));
    }
    Err(Status::invalid_argument(
        "input: one of prompt, chat or token_ids is required",
    ))
}

#[tonic::async_trait]
impl v1::generation_server::Generation for GenerationService {
    type GenerateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::GenerateResponse, Status>> + Send>,
    >;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        use v1::generate_request::Input as I;
        let api_key = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(crate::admission::api_key);
        let r = request.into_inner();
        let input = match &r.input {
            Some(I::Prompt(p)) => input(None, Some(p), None),
            Some(I::Chat(c)) => input(Some(c), None, None),
            Some(I::TokenIds(t)) => input(None, None, Some(t)),
            None => input(None, None, None),
        }?;
        let stop_wire = r.stop.unwrap_or_default();
        let params = GenerateParams {
            model: Some(r.model),
            input,
            sampling: convert::sampling_from_wire(&r.sampling.unwrap_or_default()),
            max_tokens: (stop_wire.max_tokens > 0).then_some(stop_wire.max_tokens as usize),
            stop: convert::stop_from_wire(&stop_wire),
            request_id: Some(r.request_id),
            api_key,
            kv: KvTransfer {
                codec: convert::kv_codec_from_wire(r.kv_codec)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
                eviction: convert::kv_eviction_from_wire(r.kv_eviction.as_ref(), "kv_eviction")
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            },
        };
        let stream = self
            .frontend
            .generate(params)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(Box::pin(stream.into_stream())))
    }

    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        use v1::tokenize_request::Input as I;
        let r = request.into_inner();
        self.frontend
            .check_model(Some(&r.model))
            .map_err(|e| e.to_status())?;
        let input = match &r.input {
            Some(I::Prompt(p)) => input(None, Some(p), None),
            Some(I::Chat(c)) => input(Some(c), None, None),
            None => input(None, None, None),
        }?;
        let (token_ids, text) = self.frontend.tokenize(&input).map_err(|e| e.to_status())?;
        Ok(Response::new(v1::TokenizeResponse { token_ids, text }))
    }

    async fn list_models(
        &self,
        _: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let m = &self.frontend.model;
        Ok(Response::new(v1::ListModelsResponse {
            models: vec![v1::ModelInfo {
                id: m.id.clone(),
                context_length: m.context_len as u32,
            }],
        }))
    }
}
