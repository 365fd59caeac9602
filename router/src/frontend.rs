//! The router's core, shared by the HTTP and gRPC front ends: turn a request into prompt tokens (chat template,
//! tokenizer), check it against the model, pick a decode and a prefill worker, and open the decode worker's token
//! stream. Dropping the returned [`TokenStream`] cancels the call, which cancels the work on every node.
//!
//! A decode worker that fails mid-stream (its connection breaks, or it ends the stream without a last message) is
//! replaced without the client noticing: the stream re-opens the request on another decode worker with the tokens
//! already relayed as `resume_token_ids`; that worker prefills prompt and those tokens and streams only what
//! follows. The router fixes the sampling seed up front, so a resumed sampled stream continues the same draw.

use crate::admission::{Admission, Ticket};
use crate::error::RouterError;
use crate::index::PrefixIndex;
use crate::policy::{Policy, RequestShape};
use crate::workers::{Lease, Workers};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tandem_engine::generate::StopConditions;
use tandem_engine::kv::codec::{BlockShape, Codec, Fill, encoded_len};
use tandem_engine::kv::evict::Eviction;
use tandem_engine::kv::{KvFormat, block_hashes};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::tokenizer::Tokenizer;
use tandem_engine::tokenizer::chat::{ChatMessage, ChatTemplate};
use tandem_proto::{convert, v1};
use tokio_stream::Stream;
use tonic::Streaming;

/// The model this router serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The id clients name in `model`.
    pub id: String,
    pub context_len: usize,
    /// Layers, KV heads and head size, for the bytes a prompt's KV takes on the wire (`None`: unknown, counted 0).
    pub kv_dims: Option<KvDims>,
}

/// The shape of a model's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvDims {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl ModelInfo {
    /// Bytes one prompt token's KV takes between prefill and decode worker under `kv` (an f32 cache, as the
    /// workers keep by default, through the codec; eviction keeps its share of a `prompt_len` prompt), averaged over
    /// the prompt's blocks as the prefill worker sends them (kivi2 sends the first and newest full block in f16).
    pub fn wire_bytes_per_token(
        &self,
        kv: KvTransfer,
        prompt_len: usize,
        block_size: usize,
    ) -> f64 {
        let Some(d) = self.kv_dims.filter(|_| block_size > 0) else {
            return 0.0;
        };
        let shape = BlockShape {
            kv_heads: d.kv_heads,
            block_size,
            head_dim: d.head_dim,
        };
        let codec = kv.codec.unwrap_or(Codec::None);
        let moved = kv
            .eviction
            .map_or(prompt_len, |e| e.kept_tokens(prompt_len, block_size));
        let bytes: usize = (0..moved.div_ceil(block_size))
            .map(|i| {
                encoded_len(
                    codec,
                    KvFormat::F32,
                    shape,
                    Fill::of_block(i, moved, block_size),
                )
            })
            .sum();
        d.layers as f64 * bytes as f64 / prompt_len.max(1) as f64
    }
}

/// What to complete.
#[derive(Debug, Clone)]
pub enum Input {
    /// Raw text, no template.
    Text(String),
    /// Chat messages, rendered with the model's template and an open assistant turn.
    Chat(Vec<ChatMessage>),
    Tokens(Vec<u32>),
}

/// A generation request as both front ends hand it over.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// `None` or empty = the served model.
    pub model: Option<String>,
    pub input: Input,
    pub sampling: SamplingParams,
    /// `max_tokens` of `None` = as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub stop: StopConditions,
    pub request_id: Option<String>,
    /// The caller's API key, for per-key rate limits.
    pub api_key: Option<String>,
    /// How the prompt's K/V moves between prefill and decode worker; unset parts take the router's defaults.
    pub kv: KvTransfer,
}

/// How a prompt's K/V moves from the prefill to the decode worker: codec and token eviction. A request's unset
/// parts take the router's, and the router's unset codec the decode worker's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KvTransfer {
    pub codec: Option<Codec>,
    pub eviction: Option<Eviction>,
}

impl KvTransfer {
    /// `self`, with unset parts taken from `defaults`.
    pub fn or(self, defaults: KvTransfer) -> KvTransfer {
        KvTransfer {
            codec: self.codec.or(defaults.codec),
            eviction: self.eviction.or(defaults.eviction),
        }
    }
}

/// Decode workers tried for one request before its stream opens (each unavailable one is marked unhealthy until
/// it answers a load poll again).
const OPEN_ATTEMPTS: usize = 3;

/// Other prefill workers a decode worker may turn to when the chosen one is unavailable.
const PREFILL_ALTERNATES: usize = 2;

/// Times one request's stream may move to another decode worker after the one serving it failed.
const MAX_RESUMES: usize = 2;

/// A request's id across nodes, in logs and traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct Frontend {
    pub tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    pub model: ModelInfo,
    pub workers: Arc<Workers>,
    /// Which worker holds which blocks, kept by one `sync::follow` task per worker.
    pub index: Arc<Mutex<PrefixIndex>>,
    policy: Mutex<Policy>,
    pub admission: Admission,
    /// Codec and eviction for requests that name none.
    pub default_kv: KvTransfer,
    next_id: AtomicU64,
}

/// The decode worker's token stream, holding the worker leases until it ends.
pub struct TokenStream {
    pub request_id: RequestId,
    pub prompt_tokens: usize,
    state: State,
    ticket: Ticket,
    /// The drain's cut was reported (the stream ends after it).
    cut_sent: bool,
    decode: Lease,
    _prefill: Option<Lease>,
    resume: Resume,
}

type Streamed = Streaming<v1::GenerateResponse>;
type Reopening = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Streamed, Lease), RouterError>> + Send>,
>;

enum State {
    Streaming(Box<Streamed>),
    /// The decode worker failed; the request is being re-opened on another.
    Reopening(Reopening),
    Done,
}

/// What re-opening the request elsewhere needs.
struct Resume {
    frontend: Arc<Frontend>,
    request: v1::DecodeRequest,
    /// Token ids relayed to the client so far.
    sent: Vec<u32>,
    /// The last message (with its finish reason) was relayed.
    finished: bool,
    left: usize,
}

/// A decode worker's failure that another worker can take over from: its connection broke or it gave up, as
/// opposed to refusing the request.
fn worker_failed(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted
    )
}

impl TokenStream {
    /// The next message, or `None` after the last.
    pub async fn next(&mut self) -> Result<Option<v1::GenerateResponse>, RouterError> {
        tokio_stream::StreamExt::next(self)
            .await
            .transpose()
            .map_err(|s| RouterError::from_worker(&s))
    }

    /// The stream as a `Stream` of wire messages (for the gRPC relay). It polls the decode worker's stream in the
    /// caller's task: no task or channel in between, so relaying a token costs no extra wake-up.
    pub fn into_stream(
        self,
    ) -> impl Stream<Item = Result<v1::GenerateResponse, tonic::Status>> + Send + 'static {
        self
    }

    /// Starts moving the request to another decode worker, if it may; otherwise `None`.
    fn reopen(&mut self, why: &str) -> Option<Reopening> {
        let r = &mut self.resume;
        if r.left == 0 || r.finished {
            return None;
        }
        r.left -= 1;
        let failed = &self.decode.worker;
        failed.mark_unhealthy();
        failed.failed();
        tracing::warn!(
            request_id = %self.request_id,
            endpoint = %failed.endpoint,
            relayed = r.sent.len(),
            "decode worker failed mid-stream ({why}); resuming on another"
        );
        let mut request = r.request.clone();
        request.prefill_endpoint.clear();
        request.resume_token_ids = r.sent.clone();
        let f = r.frontend.clone();
        Some(Box::pin(async move { f.resume(request).await }))
    }
}

impl Stream for TokenStream {
    type Item = Result<v1::GenerateResponse, tonic::Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.ticket.is_cut() {
            if this.cut_sent {
                return Poll::Ready(None);
            }
            this.cut_sent = true;
            return Poll::Ready(Some(Err(RouterError::ShuttingDown.to_status())));
        }
        loop {
            let failure = match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Reopening(f) => match std::task::ready!(f.as_mut().poll(cx)) {
                    Ok((inner, lease)) => {
                        this.decode = lease;
                        this.state = State::Streaming(Box::new(inner));
                        continue;
                    }
                    Err(e) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e.to_status())));
                    }
                },
                State::Streaming(inner) => {
                    match std::task::ready!(std::pin::Pin::new(&mut **inner).poll_next(cx)) {
                        Some(Ok(m)) => {
                            this.resume.sent.extend_from_slice(&m.token_ids);
                            if m.finish_reason != 0 {
                                this.resume.finished = true;
                                this.decode.worker.succeeded();
                            }
                            return Poll::Ready(Some(Ok(m)));
                        }
                        Some(Err(s)) if worker_failed(&s) => Err(s),
                        Some(Err(s)) => return Poll::Ready(Some(Err(s))),
                        None if this.resume.finished => return Poll::Ready(None),
                        None => Ok(()),
                    }
                }
            };
            let why = match &failure {
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
                Ok(()) => "the stream ended before its last message".into(),
            };
            match this.reopen(&why) {
                Some(f) => this.state = State::Reopening(f),
                None => {
                    this.state = State::Done;
                    let s = failure.err().unwrap_or_else(|| {
                        tonic::Status::unavailable("the decode worker ended the stream early")
                    });
                    return Poll::Ready(Some(Err(s)));
                }
            }
        }
    }
}

impl Frontend {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        model: ModelInfo,
        workers: Arc<Workers>,
        policy: Policy,
        admission: Admission,
        default_kv: KvTransfer,
    ) -> Self {
        let template = match tokenizer.chat_template() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "the model has no usable chat template ({e}); chat requests will be refused"
                );
                None
            }
        };
        Self {
            tokenizer,
            template,
            model,
            workers,
            index: Arc::new(Mutex::new(PrefixIndex::new())),
            policy: Mutex::new(policy),
            admission,
            default_kv,
            next_id: AtomicU64::new(0),
        }
    }

    /// Checks the `model` field against the served model.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), RouterError> {
        match model {
            None | Some("") => Ok(()),
            Some(m) if m == self.model.id => Ok(()),
            Some(m) => Err(RouterError::UnknownModel(m.to_string())),
        }
    }

    /// Prompt token ids and the text they came from.
    pub fn tokenize(&self, input: &Input) -> Result<(Vec<u32>, String), RouterError> {
        let text = match input {
            Input::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size();
                if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(RouterError::invalid(
                        format!("token id {t} is outside the vocabulary of {vocab}"),
                        "prompt",
                    ));
                }
                let text = self.tokenizer.decode(ids).unwrap_or_default();
                return Ok((ids.clone(), text));
            }
            Input::Text(t) => t.clone(),
            Input::Chat(messages) => {
                if messages.is_empty() {
                    return Err(RouterError::invalid("messages is empty", "messages"));
                }
                let Some(template) = &self.template else {
                    return Err(RouterError::invalid(
                        "this model has no chat template; use /v1/completions",
                        "messages",
                    ));
                };
                template
                    .render(messages, true)
                    .map_err(|e| RouterError::invalid(e.to_string(), "messages"))?
            }
        };
        let ids = self
            .tokenizer
            .encode(&text)
            .map_err(|e| RouterError::invalid(e.to_string(), "prompt"))?;
        Ok((ids, text))
    }

    fn request_id(&self, given: Option<&str>) -> RequestId {
        match given {
            Some(id) if !id.is_empty() => RequestId(id.to_string()),
            _ => RequestId(format!(
                "req-{:x}-{}",
                std::process::id(),
                self.next_id.fetch_add(1, Ordering::Relaxed)
            )),
        }
    }

    /// Validates, routes and opens the token stream of one request.
    pub async fn generate(self: &Arc<Self>, p: GenerateParams) -> Result<TokenStream, RouterError> {
        self.check_model(p.model.as_deref())?;
        let param = match p.input {
            Input::Chat(_) => "messages",
            _ => "prompt",
        };
        let (prompt, _) = self.tokenize(&p.input)?;
        let ctx = self.model.context_len;
        if prompt.is_empty() {
            return Err(RouterError::invalid("the prompt is empty", param));
        }
        if prompt.len() >= ctx {
            return Err(RouterError::invalid(
                format!(
                    "the prompt is {} tokens; this model's context is {ctx} tokens",
                    prompt.len()
                ),
                param,
            ));
        }
        let room = ctx - prompt.len();
        let max_tokens = p.max_tokens.unwrap_or(room);
        if max_tokens == 0 || max_tokens > room {
            return Err(RouterError::invalid(
                format!(
                    "max_tokens {max_tokens} must be between 1 and {room} (context {ctx} minus {} prompt tokens)",
                    prompt.len()
                ),
                "max_tokens",
            ));
        }
        let mut stop = p.stop;
        stop.max_tokens = max_tokens;
        stop.validate(ctx)
            .map_err(|e| RouterError::invalid(e.to_string(), "stop"))?;
        p.sampling
            .check()
            .map_err(|(field, message)| RouterError::invalid(message, field))?;
        // A fixed seed makes a stream resumed on another worker continue the same draw.
        let mut sampling = p.sampling;
        sampling.seed = Some(
            sampling
                .seed
                .unwrap_or_else(tandem_engine::sampling::fresh_seed),
        );
        let ticket = self
            .admission
            .admit(p.api_key.as_deref(), std::time::Instant::now())?;
        let request_id = self.request_id(p.request_id.as_deref());
        let kv = p.kv.or(self.default_kv);
        let request = v1::DecodeRequest {
            request_id: request_id.0.clone(),
            prompt_token_ids: prompt,
            sampling: Some(convert::sampling_to_wire(&sampling)),
            stop: Some(convert::stop_to_wire(&stop)),
            prefill_endpoint: String::new(),
            codec: kv
                .codec
                .map_or(v1::KvCodec::Unspecified, convert::kv_codec_to_wire)
                as i32,
            eviction: kv.eviction.as_ref().map(convert::kv_eviction_to_wire),
            resume_token_ids: Vec::new(),
            prefill_alternates: Vec::new(),
        };
        let (inner, decode, prefill) = self.open(&request, kv, false).await?;
        Ok(TokenStream {
            request_id,
            prompt_tokens: request.prompt_token_ids.len(),
            state: State::Streaming(Box::new(inner)),
            ticket,
            cut_sent: false,
            decode,
            _prefill: prefill,
            resume: Resume {
                frontend: self.clone(),
                request,
                sent: Vec::new(),
                finished: false,
                left: MAX_RESUMES,
            },
        })
    }

    /// Re-opens a request whose decode worker failed, on another one that prefills it locally.
    async fn resume(&self, request: v1::DecodeRequest) -> Result<(Streamed, Lease), RouterError> {
        let kv = KvTransfer::default();
        let (inner, decode, _) = self.open(&request, kv, true).await?;
        Ok((inner, decode))
    }

    /// Routes `request` (prompt plus any resumed tokens) and opens a decode worker's stream, trying another worker
    /// when the chosen one is unavailable; `local` keeps the prefill on the decode worker.
    async fn open(
        &self,
        request: &v1::DecodeRequest,
        kv: KvTransfer,
        local: bool,
    ) -> Result<(Streamed, Lease, Option<Lease>), RouterError> {
        let naming = self.workers.naming;
        let tokens: Vec<u32> = request
            .prompt_token_ids
            .iter()
            .chain(&request.resume_token_ids)
            .copied()
            .collect();
        let hashes = block_hashes(naming.seed, &tokens, naming.block_size);
        let max_tokens = request.stop.as_ref().map_or(0, |s| s.max_tokens as usize);
        let shape = RequestShape {
            prompt_tokens: tokens.len(),
            max_tokens: max_tokens.saturating_sub(request.resume_token_ids.len()),
            block_size: naming.block_size,
            kv_bytes_per_token: self.model.wire_bytes_per_token(
                kv,
                tokens.len(),
                naming.block_size,
            ),
        };
        let request_id = &request.request_id;
        let mut attempt = 0;
        loop {
            let choice = self
                .workers
                .choose(&self.policy, &self.index, &shape, &hashes)
                .ok_or(RouterError::NoWorker)?;
            let decode = choice.decode;
            let prefill = if local { None } else { choice.prefill };
            let mut request = request.clone();
            request.prefill_endpoint = prefill
                .as_ref()
                .map_or_else(String::new, |l| l.worker.endpoint.0.clone());
            request.prefill_alternates = prefill.as_ref().map_or_else(Vec::new, |l| {
                self.workers
                    .prefill_alternates(&l.worker, PREFILL_ALTERNATES)
                    .into_iter()
                    .map(|e| e.0)
                    .collect()
            });
            tracing::debug!(
                %request_id,
                decode = %decode.worker.endpoint,
                prefill = prefill.as_ref().map_or("local", |l| l.worker.endpoint.0.as_str()),
                prompt_tokens = tokens.len(),
                cached_tokens = choice.decision.cached_tokens,
                "routing"
            );
            let mut client =
                v1::decode_worker_client::DecodeWorkerClient::new(decode.worker.channel.clone());
            match client.generate(request).await {
                Ok(r) => return Ok((r.into_inner(), decode, prefill)),
                // Unreachable or refusing before any token: nothing started there, so another worker may serve it.
                Err(s) if s.code() == tonic::Code::Unavailable && attempt + 1 < OPEN_ATTEMPTS => {
                    tracing::warn!(
                        %request_id,
                        endpoint = %decode.worker.endpoint,
                        "decode worker unavailable ({}); trying another",
                        s.message()
                    );
                    decode.worker.mark_unhealthy();
                    decode.worker.failed();
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
                }
                Err(s) => {
                    if worker_failed(&s) {
                        decode.worker.failed();
                    }
                    return Err(RouterError::from_worker(&s));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_follow_each_block_of_the_prompt() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, f32 cache, 16-token blocks.
        let m = ModelInfo {
            id: "m".into(),
            context_len: 8192,
            kv_dims: Some(KvDims {
                layers: 30,
                kv_heads: 3,
                head_dim: 64,
            }),
        };
        let kv = |codec| KvTransfer {
            codec: Some(codec),
            eviction: None,
        };
        assert_eq!(m.wire_bytes_per_token(kv(Codec::None), 64, 16), 46080.0);
        // kivi2 over 4 full blocks: the first and the newest in f16 (12,288 bytes a layer), two at 2 bits (2,688).
        let want = 30.0 * (2.0 * 12288.0 + 2.0 * 2688.0) / 64.0;
        assert_eq!(m.wire_bytes_per_token(kv(Codec::Kivi2), 64, 16), want);
        assert_eq!(m.wire_bytes_per_token(kv(Codec::Kivi2), 64, 0), 0.0);
    }
}
