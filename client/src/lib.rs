//! The Rust SDK for Tandem's client API (`tandem.v1.Generation`, served by routers).
//!
//! [`Client::connect`] opens a channel (retrying connection failures with backoff); [`GenerateRequest`] is a typed
//! builder; [`Client::generate`] returns a [`TokenStream`] of text chunks, ending with the finish reason and usage.
//! Dropping the stream cancels the request on every node. A deadline set on the request (or the client's default)
//! travels as the gRPC timeout; a call that fails to connect is retried, one that reached a server is not (the
//! server may have started generating).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_client::ClientError> {
//! use tandem_client::{Client, GenerateRequest};
//! let client = Client::connect("http://127.0.0.1:8001").await?;
//! let mut stream = client
//!     .generate(GenerateRequest::chat().user("Name three rivers.").max_tokens(32).temperature(0.0))
//!     .await?;
//! while let Some(chunk) = stream.next().await? {
//!     print!("{}", chunk.text);
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;
use tandem_proto::v1;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// What went wrong, by cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URL.
    #[error("endpoint {0:?} is not a valid URL")]
    BadEndpoint(String),
    /// No connection could be made (after the configured retries).
    #[error("cannot reach {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    /// The server refused the request; the message names the field.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The deadline passed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// Any other failure reported by the server.
    #[error("server error ({code:?}): {message}")]
    Server { code: Code, message: String },
}

impl ClientError {
    fn from_status(s: Status) -> Self {
        match s.code() {
            Code::InvalidArgument | Code::NotFound | Code::ResourceExhausted => {
                Self::Invalid(s.message().to_string())
            }
            Code::DeadlineExceeded => Self::DeadlineExceeded(s.message().to_string()),
            code => Self::Server {
                code,
                message: s.message().to_string(),
            },
        }
    }
}

/// Client options.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Deadline for requests that set none; `None` = no deadline.
    pub default_deadline: Option<Duration>,
    /// Extra connection attempts after the first fails.
    pub connect_retries: u32,
    /// Wait before the first retry; doubles each time.
    pub retry_backoff: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            default_deadline: None,
            connect_retries: 3,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// A connection to a router.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: String,
    channel: Channel,
    config: ClientConfig,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_prompt_tokens: u32,
}

/// One piece of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Set on the last chunk.
    pub finish_reason: Option<FinishReason>,
    /// Set on the last chunk.
    pub usage: Option<Usage>,
}

/// A generation request, built step by step.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    wire: v1::GenerateRequest,
    deadline: Option<Duration>,
}

impl GenerateRequest {
    /// A chat; add messages with [`GenerateRequest::system`], [`GenerateRequest::user`], [`GenerateRequest::assistant`].
    pub fn chat() -> Self {
        Self::with_input(v1::generate_request::Input::Chat(
            v1::ChatMessages::default(),
        ))
    }
    /// Raw text, completed as is.
    pub fn prompt(text: impl Into<String>) -> Self {
        Self::with_input(v1::generate_request::Input::Prompt(text.into()))
    }
    /// Token ids, completed as is.
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self::with_input(v1::generate_request::Input::TokenIds(v1::TokenIds { ids }))
    }
    fn with_input(input: v1::generate_request::Input) -> Self {
        Self {
            wire: v1::GenerateRequest {
                input: Some(input),
                sampling: Some(v1::SamplingParams::default()),
                stop: Some(v1::StopConditions::default()),
                ..Default::default()
            },
            deadline: None,
        }
    }
    fn message(mut self, role: v1::ChatRole, content: impl Into<String>) -> Self {
        if let Some(v1::generate_request::Input::Chat(c)) = &mut self.wire.input {
            c.messages.push(v1::ChatMessage {
                role: role as i32,
                content: content.into(),
            });
        }
        self
    }
    /// Adds a system message (chat requests only; ignored otherwise).
    pub fn system(self, content: impl Into<String>) -> Self {
        self.message(v1::ChatRole::System, content)
    }
    pub fn user(self, content: impl Into<String>) -> Self {
        self.message(v1::ChatRole::User, content)
    }
    pub fn assistant(self, content: impl Into<String>) -> Self {
        self.message(v1::ChatRole::Assistant, content)
    }
    /// The model id (default: the one the router serves).
    pub fn model(mut self, id: impl Into<String>) -> Self {
        self.wire.model = id.into();
        self
    }
    fn sampling(&mut self) -> &mut v1::SamplingParams {
        self.wire.sampling.get_or_insert_with(Default::default)
    }
    fn stop_conditions(&mut self) -> &mut v1::StopConditions {
        self.wire.stop.get_or_insert_with(Default::default)
    }
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.stop_conditions().max_tokens = n;
        self
    }
    /// 0 = greedy (the default).
    pub fn temperature(mut self, t: f32) -> Self {
        self.sampling().temperature = t;
        self
    }
    pub fn top_p(mut self, p: f32) -> Self {
        self.sampling().top_p = p;
        self
    }
    pub fn top_k(mut self, k: u32) -> Self {
        self.sampling().top_k = k;
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.sampling().seed = Some(seed);
        self
    }
    /// Keep generating past the model's end-of-sequence tokens (until `max_tokens` or a stop string).
    pub fn ignore_eos(mut self) -> Self {
        self.stop_conditions().ignore_eos = true;
        self
    }
    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop_conditions().stop.push(s.into());
        self
    }
    /// Cancels the request on every node if it has not finished within `d`.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }
    /// A caller-chosen id, for logs and traces across nodes.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.wire.request_id = id.into();
        self
    }
}

/// A generation in progress; dropping it cancels the request.
pub struct TokenStream {
    inner: tonic::Streaming<v1::GenerateResponse>,
    /// When the whole generation must be done; enforced here, since a gRPC timeout only bounds a stream's start.
    deadline: Option<tokio::time::Instant>,
}

impl TokenStream {
    /// The next chunk, or `None` after the last. Past the deadline this fails (and the stream should be dropped,
    /// which cancels the request).
    pub async fn next(&mut self) -> Result<Option<Chunk>, ClientError> {
        let next = match self.deadline {
            Some(d) => tokio::time::timeout_at(d, self.inner.message())
                .await
                .map_err(|_| {
                    ClientError::DeadlineExceeded("the request's deadline passed".into())
                })?,
            None => self.inner.message().await,
        };
        let Some(m) = next.map_err(ClientError::from_status)? else {
            return Ok(None);
        };
        Ok(Some(Chunk {
            text: m.text,
            token_ids: m.token_ids,
            finish_reason: match v1::FinishReason::try_from(m.finish_reason) {
                Ok(v1::FinishReason::Stop) => Some(FinishReason::Stop),
                Ok(v1::FinishReason::Length) => Some(FinishReason::Length),
                _ => None,
            },
            usage: m.usage.map(|u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                cached_prompt_tokens: u.cached_prompt_tokens,
            }),
        }))
    }

    /// Reads to the end: the whole text, the finish reason and usage.
    pub async fn collect(
        mut self,
    ) -> Result<(String, Option<FinishReason>, Option<Usage>), ClientError> {
        let (mut text, mut finish, mut usage) = (String::new(), None, None);
        while let Some(c) = self.next().await? {
            text.push_str(&c.text);
            finish = c.finish_reason.or(finish);
            usage = c.usage.or(usage);
        }
        Ok((text, finish, usage))
    }
}

impl Client {
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, ClientConfig::default()).await
    }

    /// Connects, retrying failed attempts `connect_retries` times with doubling backoff.
    pub async fn connect_with(endpoint: &str, config: ClientConfig) -> Result<Self, ClientError> {
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|_| ClientError::BadEndpoint(endpoint.to_string()))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true);
        let mut backoff = config.retry_backoff;
        let mut attempt = 0;
        loop {
            match ep.connect().await {
                Ok(channel) => {
                    return Ok(Self {
                        endpoint: endpoint.to_string(),
                        channel,
                        config,
                    });
                }
                Err(e) if attempt >= config.connect_retries => {
                    return Err(ClientError::Connect {
                        endpoint: endpoint.to_string(),
                        message: format!("{e} (after {} attempts)", attempt + 1),
                    });
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn client(&self) -> v1::generation_client::GenerationClient<Channel> {
        v1::generation_client::GenerationClient::new(self.channel.clone())
    }

    /// Starts a generation. Connection failures (the router restarting) are retried before any token was produced.
    pub async fn generate(&self, req: GenerateRequest) -> Result<TokenStream, ClientError> {
        let deadline = effective_deadline(req.deadline, self.config.default_deadline);
        let until = deadline.map(|d| tokio::time::Instant::now() + d);
        let mut backoff = self.config.retry_backoff;
        let mut attempt = 0;
        loop {
            let mut r = tonic::Request::new(req.wire.clone());
            if let Some(d) = deadline {
                r.set_timeout(d);
            }
            match self.client().generate(r).await {
                Ok(s) => {
                    return Ok(TokenStream {
                        inner: s.into_inner(),
                        deadline: until,
                    });
                }
                Err(s) if is_connection_failure(&s) && attempt < self.config.connect_retries => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(s) => return Err(ClientError::from_status(s)),
            }
        }
    }

    /// Token ids of `text` (raw) under the served model's tokenizer.
    pub async fn tokenize(&self, text: &str) -> Result<Vec<u32>, ClientError> {
        let r = self
            .client()
            .tokenize(v1::TokenizeRequest {
                model: String::new(),
                input: Some(v1::tokenize_request::Input::Prompt(text.to_string())),
            })
            .await
            .map_err(ClientError::from_status)?;
        Ok(r.into_inner().token_ids)
    }

    /// Ids and context lengths of the served models.
    pub async fn list_models(&self) -> Result<Vec<(String, u32)>, ClientError> {
        let r = self
            .client()
            .list_models(v1::ListModelsRequest {})
            .await
            .map_err(ClientError::from_status)?;
        Ok(r.into_inner()
            .models
            .into_iter()
            .map(|m| (m.id, m.context_length))
            .collect())
    }
}

/// The call never reached a server (so retrying cannot duplicate work).
fn is_connection_failure(s: &Status) -> bool {
    s.code() == Code::Unavailable && s.metadata().is_empty()
}

/// The longest deadline sent or timed: a longer one (up to `Duration::MAX`) means "none" in practice, and would
/// overflow the clock it is added to.
pub const LONGEST_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// A request's deadline, else the client's default, at most [`LONGEST_DEADLINE`].
fn effective_deadline(request: Option<Duration>, default: Option<Duration>) -> Option<Duration> {
    request.or(default).map(|d| d.min(LONGEST_DEADLINE))
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn any_deadline_can_be_added_to_now() {
        let d = effective_deadline(Some(Duration::MAX), None).unwrap();
        assert_eq!(d, LONGEST_DEADLINE);
        assert!(tokio::time::Instant::now().checked_add(d).is_some());
        let short = Duration::from_millis(5);
        assert_eq!(effective_deadline(None, Some(short)), Some(short));
        assert_eq!(
            effective_deadline(Some(short), Some(Duration::MAX)),
            Some(short)
        );
        assert_eq!(effective_deadline(None, None), None);
    }
}
