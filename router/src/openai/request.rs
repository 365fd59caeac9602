//! Parsing OpenAI request bodies into [`GenerateParams`], field by field, so every error names its field and the
//! accepted range (serde's derive would say only "invalid type at column 57"). Unknown fields are ignored, as
//! OpenAI-compatible servers do; `null` means absent.
//!
//! Defaults follow OpenAI: temperature 1, top_p 1, completions `max_tokens` 16, chat `max_tokens` whatever the
//! context leaves. vLLM's extensions `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are accepted too, and
//! Tandem's own `kv_codec` (how the prompt's KV cache is compressed between prefill and decode worker) and
//! `kv_eviction` (`policy:budget`, e.g. `snapkv:0.5`: which prompt tokens keep their K/V before the transfer).

use crate::error::RouterError;
use crate::frontend::{GenerateParams, Input, KvTransfer};
use serde_json::{Map, Value};
use tandem_engine::generate::StopConditions;
use tandem_engine::kv::codec::Codec;
use tandem_engine::kv::evict::Eviction;
use tandem_engine::sampling::{MAX_TOP_LOGPROBS, SamplingParams};
use tandem_engine::tokenizer::chat::{ChatMessage, Role};

/// Which endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub params: GenerateParams,
    pub stream: bool,
    /// `stream_options.include_usage`: send a last chunk with usage.
    pub include_usage: bool,
    /// Logprobs were asked for.
    pub logprobs: bool,
}

struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A number, refused by name where f32 cannot hold it (it would turn into infinity or zero and be judged as
    /// that).
    fn f32(&self, name: &str) -> Result<Option<f32>, RouterError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v
            .as_f64()
            .ok_or_else(|| RouterError::invalid(format!("{name} must be a number"), name))?;
        let y = x as f32;
        if y.is_infinite() || (y == 0.0 && x != 0.0) {
            return Err(RouterError::invalid(
                format!("{name} {x:e} is out of range"),
                name,
            ));
        }
        Ok(Some(y))
    }

    /// A non-negative integer; negative or fractional values are refused by name.
    fn uint(&self, name: &str) -> Result<Option<u64>, RouterError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => {
                if let Some(x) = v.as_u64() {
                    Ok(Some(x))
                } else if v.as_i64().is_some() {
                    Err(RouterError::invalid(
                        format!("{name} must not be negative (got {v})"),
                        name,
                    ))
                } else {
                    Err(RouterError::invalid(
                        format!("{name} must be an integer (got {v})"),
                        name,
                    ))
                }
            }
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, RouterError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| RouterError::invalid(format!("{name} must be true or false"), name)),
        }
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, RouterError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| RouterError::invalid(format!("{name} must be a string"), name)),
        }
    }
}

/// Parses a body sent to `endpoint`.
pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<Parsed, RouterError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| RouterError::Invalid {
        message: format!("the body is not valid JSON: {e}"),
        param: None,
    })?;
    let Some(obj) = value.as_object() else {
        return Err(RouterError::Invalid {
            message: "the body must be a JSON object".into(),
            param: None,
        });
    };
    let f = Fields(obj);
    let model = f.string("model")?.map(str::to_string);
    if model.is_none() {
        return Err(RouterError::invalid("model is required", "model"));
    }
    if let Some(n) = f.uint("n")?
        && n != 1
    {
        return Err(RouterError::invalid(format!("n must be 1 (got {n})"), "n"));
    }
    let input = match endpoint {
        Endpoint::Chat => Input::Chat(messages(f.get("messages"))?),
        Endpoint::Completions => prompt(f.get("prompt"))?,
    };
    let max_tokens = match endpoint {
        Endpoint::Chat => match f.uint("max_completion_tokens")? {
            Some(n) => Some(n),
            None => f.uint("max_tokens")?,
        },
        Endpoint::Completions => Some(f.uint("max_tokens")?.unwrap_or(16)),
    };
    let max_tokens = max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let top_logprobs = match endpoint {
        Endpoint::Chat => match f.bool("logprobs")? {
            Some(true) => Some(f.uint("top_logprobs")?.unwrap_or(0)),
            _ => {
                if f.get("top_logprobs").is_some() {
                    return Err(RouterError::invalid(
                        "top_logprobs needs logprobs: true",
                        "top_logprobs",
                    ));
                }
                None
            }
        },
        Endpoint::Completions => f.uint("logprobs")?,
    };
    if let Some(n) = top_logprobs
        && n > MAX_TOP_LOGPROBS as u64
    {
        let name = if endpoint == Endpoint::Chat {
            "top_logprobs"
        } else {
            "logprobs"
        };
        return Err(RouterError::invalid(
            format!("{name} must be at most {MAX_TOP_LOGPROBS} (got {n})"),
            name,
        ));
    }
    let sampling = SamplingParams {
        temperature: f.f32("temperature")?.unwrap_or(1.0),
        top_p: f.f32("top_p")?.unwrap_or(1.0),
        top_k: f.uint("top_k")?.unwrap_or(0) as usize,
        min_p: f.f32("min_p")?.unwrap_or(0.0),
        repetition_penalty: f.f32("repetition_penalty")?.unwrap_or(1.0),
        presence_penalty: f.f32("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: f.f32("frequency_penalty")?.unwrap_or(0.0),
        seed: match f.get("seed") {
            None => None,
            // OpenAI seeds may be negative; any integer names a stream.
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_i64().map(|x| x as u64))
                    .ok_or_else(|| RouterError::invalid("seed must be an integer", "seed"))?,
            ),
        },
        logprobs: top_logprobs.map(|n| n as usize),
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(RouterError::invalid(
                "stream_options must be an object",
                "stream_options",
            ));
        }
    };
    let stop = StopConditions {
        max_tokens: 0,
        stop_token_ids: Vec::new(),
        stop_strings: stop_strings(f.get("stop"))?,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
    };
    let kv_codec = match f.string("kv_codec")? {
        None => None,
        Some(name) => {
            Some(Codec::parse(name).map_err(|e| RouterError::invalid(e.to_string(), "kv_codec"))?)
        }
    };
    let eviction = match f.string("kv_eviction")? {
        None => None,
        Some(spec) => Some(
            Eviction::parse(spec)
                .map_err(|e| RouterError::invalid(e.to_string(), "kv_eviction"))?,
        ),
    };
    Ok(Parsed {
        params: GenerateParams {
            model,
            input,
            sampling,
            max_tokens,
            stop,
            request_id: None,
            api_key: None,
            kv: KvTransfer {
                codec: kv_codec,
                eviction,
            },
        },
        stream,
        include_usage,
        logprobs: top_logprobs.is_some(),
    })
}

fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, RouterError> {
    let bad = || RouterError::invalid("stop must be a string or an array of strings", "stop");
    match v {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, RouterError> {
    let Some(Value::Array(items)) = v else {
        return Err(RouterError::invalid(
            "messages must be an array of {role, content} objects",
            "messages",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let bad = |what: &str| RouterError::Invalid {
                message: format!("{param}: {what}"),
                param: Some(param.clone()),
            };
            let Some(o) = m.as_object() else {
                return Err(bad("must be an object with role and content"));
            };
            let role = match o.get("role").and_then(Value::as_str) {
                Some("system") | Some("developer") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("tool") => Role::Tool,
                Some(other) => {
                    return Err(bad(&format!(
                        "role {other:?} is not system, developer, user, assistant or tool"
                    )));
                }
                None => return Err(bad("role is required (a string)")),
            };
            let content = match o.get("content") {
                Some(Value::String(s)) => s.clone(),
                // Content parts: only text parts are supported.
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => return Err(bad("only text content parts are supported")),
                        }
                    }
                    text
                }
                None | Some(Value::Null) if role == Role::Assistant => String::new(),
                _ => return Err(bad("content must be a string or an array of text parts")),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn prompt(v: Option<&Value>) -> Result<Input, RouterError> {
    let bad = |m: &str| RouterError::invalid(m, "prompt");
    match v {
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(Input::Tokens(
            a.iter()
                .map(|x| u32::try_from(x.as_u64().unwrap_or(u64::MAX)).unwrap_or(u32::MAX))
                .collect(),
        )),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Input::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if a.len() > 1 => Err(bad(
            "batched prompts are not supported; send one prompt per request",
        )),
        None => Err(bad("prompt is required")),
        _ => Err(bad("prompt must be a string, or an array of token ids")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str, e: Endpoint) -> RouterError {
        parse(body.as_bytes(), e).unwrap_err()
    }

    #[test]
    fn chat_request_with_every_option() {
        let p = parse(
            br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
                "max_tokens":7,"temperature":0,"top_p":0.5,"seed":-1,"stop":"END","logprobs":true,"top_logprobs":2,
                "stream":true,"stream_options":{"include_usage":true},"unknown_field":1}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert!(p.stream && p.include_usage && p.logprobs);
        assert_eq!(p.params.max_tokens, Some(7));
        assert_eq!(p.params.sampling.temperature, 0.0);
        assert_eq!(p.params.sampling.top_p, 0.5);
        assert_eq!(p.params.sampling.seed, Some(u64::MAX));
        assert_eq!(p.params.sampling.logprobs, Some(2));
        assert_eq!(p.params.stop.stop_strings, vec!["END".to_string()]);
        let Input::Chat(m) = &p.params.input else {
            panic!("chat input")
        };
        assert_eq!(m[1], ChatMessage::new(Role::User, "hi"));
    }

    #[test]
    fn completion_defaults_and_token_prompts() {
        let p = parse(br#"{"model":"m","prompt":"Hello"}"#, Endpoint::Completions).unwrap();
        assert_eq!(p.params.max_tokens, Some(16));
        assert_eq!(p.params.sampling.temperature, 1.0);
        assert!(!p.stream && !p.logprobs);
        let p = parse(
            br#"{"model":"m","prompt":[1,2,3],"logprobs":3}"#,
            Endpoint::Completions,
        )
        .unwrap();
        assert!(matches!(p.params.input, Input::Tokens(ref t) if t == &[1, 2, 3]));
        assert_eq!(p.params.sampling.logprobs, Some(3));
    }

    #[test]
    fn errors_name_the_field() {
        let c = Endpoint::Chat;
        assert!(err("{not json", c).to_string().contains("not valid JSON"));
        assert_eq!(err(r#"[1]"#, c).param(), None);
        assert_eq!(err(r#"{"messages":[]}"#, c).param(), Some("model"));
        let e = err(r#"{"model":"m","messages":[],"max_tokens":-5}"#, c);
        assert_eq!(e.param(), Some("max_tokens"));
        assert!(e.to_string().contains("negative"), "{e}");
        assert_eq!(
            err(r#"{"model":"m","messages":[],"temperature":"hot"}"#, c).param(),
            Some("temperature")
        );
        // Numbers f32 cannot hold are refused as given, not judged as infinity or zero.
        let e = err(r#"{"model":"m","messages":[],"top_p":1e-50}"#, c);
        assert_eq!(e.param(), Some("top_p"));
        assert!(e.to_string().contains("out of range"), "{e}");
        assert_eq!(
            err(r#"{"model":"m","messages":[],"temperature":1e39}"#, c).param(),
            Some("temperature")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":"hi"}"#, c).param(),
            Some("messages")
        );
        assert_eq!(
            err(
                r#"{"model":"m","messages":[{"role":"pirate","content":"x"}]}"#,
                c
            )
            .param(),
            Some("messages[0]")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[],"stop":5}"#, c).param(),
            Some("stop")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[],"n":2}"#, c).param(),
            Some("n")
        );
        assert_eq!(
            err(
                r#"{"model":"m","messages":[],"logprobs":true,"top_logprobs":50}"#,
                c
            )
            .param(),
            Some("top_logprobs")
        );
        let p = Endpoint::Completions;
        let e = err(r#"{"model":"m","prompt":"x","kv_codec":"int3"}"#, p);
        assert_eq!(e.param(), Some("kv_codec"));
        assert!(e.to_string().contains("int4"), "{e}");
        assert_eq!(
            err(r#"{"model":"m","prompt":"x","kv_codec":4}"#, p).param(),
            Some("kv_codec")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":["a","b"]}"#, p).param(),
            Some("prompt")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":{}}"#, p).param(),
            Some("prompt")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":"x","max_tokens":1.5}"#, p).param(),
            Some("max_tokens")
        );
    }
}
