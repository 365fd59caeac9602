//! The streamed (SSE) form of a completion: a `Stream` of events polled by the HTTP connection itself, turning each
//! decode-worker message into zero to three events (a chunk, the usage chunk, `[DONE]`). No task sits in between:
//! a token costs one wake-up, and when the client goes away the connection drops this stream, which drops the
//! token stream and so cancels the work on every node.

use super::request::{Endpoint, Parsed};
use super::response::{self, Logprobs, Meta};
use crate::error::RouterError;
use crate::frontend::TokenStream;
use axum::response::sse::Event;
use serde_json::Value;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tandem_proto::v1;
use tokio_stream::Stream;

pub struct SseRelay {
    stream: TokenStream,
    meta: Meta,
    logprobs: bool,
    include_usage: bool,
    /// No chunk sent yet (the first carries the role).
    first: bool,
    /// Bytes of completion text sent so far (completion logprobs report text offsets).
    offset: usize,
    queued: VecDeque<Event>,
    done: bool,
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl SseRelay {
    pub fn new(stream: TokenStream, meta: Meta, parsed: &Parsed) -> Self {
        Self {
            stream,
            meta,
            logprobs: parsed.logprobs,
            include_usage: parsed.include_usage,
            first: true,
            offset: 0,
            queued: VecDeque::new(),
            done: false,
        }
    }

    fn on_message(&mut self, m: &v1::GenerateResponse) {
        let finish = response::finish_reason(m);
        let lp = self.logprobs.then(|| {
            let mut l = Logprobs::default();
            l.extend(m);
            match self.meta.endpoint {
                Endpoint::Chat => l.chat(),
                Endpoint::Completions => l.completion(self.offset),
            }
        });
        self.offset += m.text.len();
        if self.first || !m.text.is_empty() || finish.is_some() || lp.is_some() {
            let c = response::chunk(&self.meta, &m.text, self.first, finish, lp);
            self.first = false;
            self.queued.push_back(data(&c));
        }
        if let Some(u) = &m.usage {
            if self.include_usage {
                let c = response::usage_chunk(&self.meta, response::usage(u));
                self.queued.push_back(data(&c));
            }
            self.queued.push_back(Event::default().data("[DONE]"));
            self.done = true;
        }
    }
}

impl Stream for SseRelay {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
                Some(Ok(m)) => this.on_message(&m),
                Some(Err(status)) => {
                    let e = RouterError::from_worker(&status);
                    this.queued.push_back(data(&response::error_body(&e)));
                    this.done = true;
                }
                None => this.done = true,
            }
        }
    }
}
