//! Conversions between `tandem.v1` messages and the engine's domain types, in both directions, in one place.
//!
//! Wire defaults follow protobuf: an unset number is 0, so fields whose neutral value is not 0 (`top_p`,
//! `repetition_penalty`) treat 0 as "off". Enum values the receiver does not know, and `UNSPECIFIED` where a value is
//! required, are refused with a [`ConvertError`] naming the field. Range checks that need the model (context length,
//! vocabulary) belong to the engine's own `validate`.

use crate::v1;
use tandem_engine::generate::{FinishReason, StopConditions};
use tandem_engine::kv::codec::Codec;
use tandem_engine::kv::evict::{Budget, Eviction, EvictionPolicy};
use tandem_engine::kv::{BlockHash, KvEvent, KvFormat};
use tandem_engine::sampling::SamplingParams;
use tandem_engine::tokenizer::chat::{ChatMessage, Role};

/// A wire message that cannot become a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: &'static str,
    pub reason: String,
}

impl ConvertError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

pub fn sampling_from_wire(p: &v1::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        min_p: p.min_p,
        repetition_penalty: if p.repetition_penalty == 0.0 {
            1.0
        } else {
            p.repetition_penalty
        },
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        logprobs: p.logprobs.map(|n| n as usize),
    }
}

pub fn sampling_to_wire(p: &SamplingParams) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k.min(u32::MAX as usize) as u32,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        logprobs: p.logprobs.map(|n| n.min(u32::MAX as usize) as u32),
    }
}

pub fn stop_from_wire(s: &v1::StopConditions) -> StopConditions {
    StopConditions {
        max_tokens: s.max_tokens as usize,
        stop_token_ids: s.stop_token_ids.clone(),
        stop_strings: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    }
}

pub fn stop_to_wire(s: &StopConditions) -> v1::StopConditions {
    v1::StopConditions {
        max_tokens: s.max_tokens.min(u32::MAX as usize) as u32,
        stop_token_ids: s.stop_token_ids.clone(),
        stop: s.stop_strings.clone(),
        ignore_eos: s.ignore_eos,
    }
}

pub fn finish_reason_to_wire(r: FinishReason) -> v1::FinishReason {
    match r {
        FinishReason::Stop => v1::FinishReason::Stop,
        FinishReason::Length => v1::FinishReason::Length,
    }
}

pub fn finish_reason_from_wire(r: i32) -> Result<FinishReason, ConvertError> {
    match v1::FinishReason::try_from(r) {
        Ok(v1::FinishReason::Stop) => Ok(FinishReason::Stop),
        Ok(v1::FinishReason::Length) => Ok(FinishReason::Length),
        _ => Err(ConvertError::new(
            "finish_reason",
            format!("{r} is not stop or length"),
        )),
    }
}

/// The wire element type of uncompressed blocks from a cache in format `f` (see `KvFormat::raw_wire`).
pub fn kv_format_to_wire(f: KvFormat) -> v1::KvDtype {
    match f.raw_wire() {
        KvFormat::F32 => v1::KvDtype::F32,
        _ => v1::KvDtype::F16,
    }
}

pub fn kv_format_from_wire(d: i32) -> Result<KvFormat, ConvertError> {
    match v1::KvDtype::try_from(d) {
        Ok(v1::KvDtype::F32) => Ok(KvFormat::F32),
        Ok(v1::KvDtype::F16) => Ok(KvFormat::F16),
        _ => Err(ConvertError::new(
            "layout.dtype",
            format!("{d} is not f32 or f16"),
        )),
    }
}

pub fn kv_codec_to_wire(c: Codec) -> v1::KvCodec {
    match c {
        Codec::None => v1::KvCodec::None,
        Codec::Fp8 => v1::KvCodec::Fp8,
        Codec::Int8 => v1::KvCodec::Int8,
        Codec::Int4 => v1::KvCodec::Int4,
        Codec::Kivi2 => v1::KvCodec::Kivi2,
    }
}

/// A wire codec; `Ok(None)` for UNSPECIFIED (the receiver's default applies).
pub fn kv_codec_from_wire(c: i32) -> Result<Option<Codec>, ConvertError> {
    Ok(Some(match v1::KvCodec::try_from(c) {
        Ok(v1::KvCodec::Unspecified) => return Ok(None),
        Ok(v1::KvCodec::None) => Codec::None,
        Ok(v1::KvCodec::Fp8) => Codec::Fp8,
        Ok(v1::KvCodec::Int8) => Codec::Int8,
        Ok(v1::KvCodec::Int4) => Codec::Int4,
        Ok(v1::KvCodec::Kivi2) => Codec::Kivi2,
        Err(_) => {
            return Err(ConvertError::new(
                "kv_codec",
                format!("{c} is not a codec this build knows (none, fp8, int8, int4, kivi2)"),
            ));
        }
    }))
}

pub fn kv_eviction_to_wire(e: &Eviction) -> v1::KvEviction {
    use v1::KvEvictionPolicy as P;
    let policy = match e.policy {
        EvictionPolicy::Streaming => P::Streaming,
        EvictionPolicy::SnapKv => P::Snapkv,
        EvictionPolicy::H2o => P::H2o,
        EvictionPolicy::Block => P::Block,
    };
    v1::KvEviction {
        policy: policy as i32,
        budget: Some(match e.budget {
            Budget::Tokens(t) => v1::kv_eviction::Budget::Tokens(t),
            Budget::Fraction(f) => v1::kv_eviction::Budget::Fraction(f),
        }),
    }
}

/// A wire eviction; `Ok(None)` when absent. A message with an unknown policy or a budget out of range is refused.
pub fn kv_eviction_from_wire(
    e: Option<&v1::KvEviction>,
    field: &'static str,
) -> Result<Option<Eviction>, ConvertError> {
    use v1::KvEvictionPolicy as P;
    let Some(e) = e else { return Ok(None) };
    let policy = match P::try_from(e.policy) {
        Ok(P::Streaming) => EvictionPolicy::Streaming,
        Ok(P::Snapkv) => EvictionPolicy::SnapKv,
        Ok(P::H2o) => EvictionPolicy::H2o,
        Ok(P::Block) => EvictionPolicy::Block,
        _ => {
            return Err(ConvertError::new(
                field,
                format!(
                    "policy {} is not one this build knows (streaming, snapkv, h2o, block)",
                    e.policy
                ),
            ));
        }
    };
    let budget = match e.budget {
        Some(v1::kv_eviction::Budget::Tokens(t)) => Budget::Tokens(t),
        Some(v1::kv_eviction::Budget::Fraction(f)) => Budget::Fraction(f),
        None => {
            return Err(ConvertError::new(
                field,
                "budget (tokens or fraction) is required",
            ));
        }
    };
    Eviction::new(policy, budget)
        .map(Some)
        .map_err(|err| ConvertError::new(field, err.to_string()))
}

pub fn kv_event_to_wire(e: &KvEvent) -> v1::KvEvent {
    let (seq, kind) = match e {
        KvEvent::Stored { seq, hashes } => {
            (*seq, v1::kv_event::Kind::Stored(hashes_to_wire(hashes)))
        }
        KvEvent::Removed { seq, hashes } => {
            (*seq, v1::kv_event::Kind::Removed(hashes_to_wire(hashes)))
        }
    };
    v1::KvEvent {
        sequence_number: seq,
        kind: Some(kind),
    }
}

pub fn kv_event_from_wire(e: &v1::KvEvent) -> Result<KvEvent, ConvertError> {
    let seq = e.sequence_number;
    match &e.kind {
        Some(v1::kv_event::Kind::Stored(h)) => Ok(KvEvent::Stored {
            seq,
            hashes: hashes_from_wire(h),
        }),
        Some(v1::kv_event::Kind::Removed(h)) => Ok(KvEvent::Removed {
            seq,
            hashes: hashes_from_wire(h),
        }),
        None => Err(ConvertError::new("kind", "neither stored nor removed")),
    }
}

/// A worker's cache snapshot (`Engine::kv_snapshot`) on the wire.
pub fn kv_snapshot_to_wire((seq, hashes): (u64, Vec<BlockHash>)) -> v1::KvSnapshotResponse {
    v1::KvSnapshotResponse {
        sequence_number: seq,
        hashes: hashes.into_iter().map(|h| h.0).collect(),
    }
}

fn hashes_to_wire(h: &[BlockHash]) -> v1::BlockHashes {
    v1::BlockHashes {
        hashes: h.iter().map(|h| h.0).collect(),
    }
}

fn hashes_from_wire(h: &v1::BlockHashes) -> Vec<BlockHash> {
    h.hashes.iter().copied().map(BlockHash).collect()
}

pub fn role_to_wire(r: Role) -> v1::ChatRole {
    match r {
        Role::System => v1::ChatRole::System,
        Role::User => v1::ChatRole::User,
        Role::Assistant => v1::ChatRole::Assistant,
        Role::Tool => v1::ChatRole::Tool,
    }
}

pub fn chat_from_wire(m: &v1::ChatMessages) -> Result<Vec<ChatMessage>, ConvertError> {
    m.messages
        .iter()
        .map(|m| {
            let role = match v1::ChatRole::try_from(m.role) {
                Ok(v1::ChatRole::System) => Role::System,
                Ok(v1::ChatRole::User) => Role::User,
                Ok(v1::ChatRole::Assistant) => Role::Assistant,
                Ok(v1::ChatRole::Tool) => Role::Tool,
                _ => {
                    return Err(ConvertError::new(
                        "chat.messages.role",
                        format!("{} is not system, user, assistant or tool", m.role),
                    ));
                }
            };
            Ok(ChatMessage::new(role, m.content.clone()))
        })
        .collect()
}

pub fn chat_to_wire(m: &[ChatMessage]) -> v1::ChatMessages {
    v1::ChatMessages {
        messages: m
            .iter()
            .map(|m| v1::ChatMessage {
                role: role_to_wire(m.role) as i32,
                content: m.content.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_round_trips_and_zero_means_off() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: -0.5,
            seed: Some(7),
            logprobs: Some(3),
        };
        assert_eq!(sampling_from_wire(&sampling_to_wire(&p)), p);
        assert_eq!(
            sampling_from_wire(&sampling_to_wire(&SamplingParams::default())),
            SamplingParams::default()
        );
        // An empty wire message is greedy with no penalties, not top_p 0.
        assert_eq!(
            sampling_from_wire(&v1::SamplingParams::default()),
            SamplingParams::default()
        );
    }

    #[test]
    fn stop_round_trips() {
        let s = StopConditions {
            max_tokens: 12,
            stop_token_ids: vec![2, 3],
            stop_strings: vec!["END".into()],
            ignore_eos: true,
        };
        assert_eq!(stop_from_wire(&stop_to_wire(&s)), s);
    }

    #[test]
    fn enums_round_trip_and_unknown_values_are_refused() {
        for r in [FinishReason::Stop, FinishReason::Length] {
            assert_eq!(
                finish_reason_from_wire(finish_reason_to_wire(r) as i32),
                Ok(r)
            );
        }
        assert_eq!(
            finish_reason_from_wire(0).unwrap_err().field,
            "finish_reason"
        );
        assert_eq!(
            finish_reason_from_wire(99).unwrap_err().field,
            "finish_reason"
        );
        for f in [KvFormat::F32, KvFormat::F16] {
            assert_eq!(kv_format_from_wire(kv_format_to_wire(f) as i32), Ok(f));
        }
        assert!(kv_format_from_wire(0).is_err());
        for c in Codec::ALL {
            assert_eq!(kv_codec_from_wire(kv_codec_to_wire(c) as i32), Ok(Some(c)));
        }
        assert_eq!(kv_codec_from_wire(0), Ok(None));
        assert_eq!(kv_codec_from_wire(42).unwrap_err().field, "kv_codec");
    }

    #[test]
    fn evictions_round_trip_and_bad_ones_are_refused() {
        for s in ["streaming:64", "snapkv:0.5", "h2o:0.25", "block:1"] {
            let e = Eviction::parse(s).unwrap();
            let w = kv_eviction_to_wire(&e);
            assert_eq!(kv_eviction_from_wire(Some(&w), "eviction"), Ok(Some(e)));
        }
        assert_eq!(kv_eviction_from_wire(None, "eviction"), Ok(None));
        let bad = |policy: i32, budget| v1::KvEviction { policy, budget };
        use v1::kv_eviction::Budget as B;
        for (w, why) in [
            (bad(0, Some(B::Tokens(5))), "policy"),
            (bad(99, Some(B::Tokens(5))), "policy"),
            (bad(2, None), "budget"),
            (bad(2, Some(B::Tokens(0))), "at least 1"),
            (bad(2, Some(B::Fraction(1.5))), "(0, 1]"),
            (bad(2, Some(B::Fraction(f32::NAN))), "(0, 1]"),
        ] {
            let e = kv_eviction_from_wire(Some(&w), "kv_eviction").unwrap_err();
            assert_eq!(e.field, "kv_eviction");
            assert!(e.reason.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn kv_events_round_trip() {
        for e in [
            KvEvent::Stored {
                seq: 4,
                hashes: vec![BlockHash(1), BlockHash(u64::MAX)],
            },
            KvEvent::Removed {
                seq: 5,
                hashes: vec![BlockHash(9)],
            },
        ] {
            assert_eq!(kv_event_from_wire(&kv_event_to_wire(&e)), Ok(e));
        }
        assert!(kv_event_from_wire(&v1::KvEvent::default()).is_err());
    }

    #[test]
    fn chat_round_trips_and_unset_role_is_refused() {
        let m = vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "hi"),
            ChatMessage::new(Role::Assistant, "hello"),
            ChatMessage::new(Role::Tool, "{}"),
        ];
        assert_eq!(chat_from_wire(&chat_to_wire(&m)), Ok(m));
        let bad = v1::ChatMessages {
            messages: vec![v1::ChatMessage {
                role: 0,
                content: "x".into(),
            }],
        };
        assert_eq!(
            chat_from_wire(&bad).unwrap_err().field,
            "chat.messages.role"
        );
    }
}
