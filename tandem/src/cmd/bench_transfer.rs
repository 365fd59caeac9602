//! `tandem bench transfer`: the KV transfer path alone, per codec, over a loopback gRPC stream: pre-encoded chunks
//! pushed by the real sender to the real receiver (which checks, decodes and hands each chunk to a sink that drops
//! it). It reports the uncompressed (f32) megabytes per second moved and the bytes on the wire, and, beside them,
//! how fast the sender encodes, so the two can be compared: a codec is never the bottleneck of a transfer when it
//! encodes faster than the link carries the uncompressed cache. `--transport nccl` measures the GPU-to-GPU path
//! instead ([`super::bench_transfer_nccl`]).

use super::serve::{bind, runtime, stopped};
use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tandem_engine::kv::codec::{Codec, Fill, KeyRotation};
use tandem_engine::kv::{BlockId, KvFormat};
use tandem_engine::model::dummy::NamedShape;
use tandem_kv_transfer::chunk::{self, BlockData, ChunkHeader, ChunkLayout, Encoding};
use tandem_kv_transfer::link::{LinkListener, LinkSender};
use tandem_kv_transfer::{Delivered, KvTransferService, Sender, SessionId, Sessions};
use tandem_prefill_node::runtime::serve_grpc;

/// Which KV transport `tandem bench transfer` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Host chunks over a loopback gRPC stream, for every codec.
    Grpc,
    /// The gRPC rate (the baseline) and, in the same run, the same chunks with their payloads on a same-host Unix
    /// socket link beside the gRPC stream (docs/kv-links.md).
    Unix,
    /// Staged GPU blocks over NCCL between two processes on two GPUs of one host.
    Nccl,
}

#[derive(clap::Args, Debug)]
pub struct TransferBenchArgs {
    /// The transport to measure: grpc (loopback, host chunks, every codec; the flags above `--shape`), unix (the
    /// same, then again with payloads on a Unix socket link, against gRPC) or nccl (GPU to GPU between two
    /// processes; needs two GPUs; the flags from `--shape` on).
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    pub transport: Transport,
    /// Uncompressed (f32) mebibytes of KV to move per codec.
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
    /// Codecs to measure (comma list).
    #[arg(long, value_delimiter = ',', value_parser = super::parse_codec,
          default_values_t = Codec::ALL.to_vec())]
    pub codecs: Vec<Codec>,
    /// Blocks per chunk (a prefill step's worth of one layer).
    #[arg(long, default_value_t = 32)]
    pub blocks_per_chunk: usize,
    /// Also apply the lossless stage (rANS or LZ4, the smaller) to every chunk where it pays.
    #[arg(long)]
    pub lossless: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nccl: super::bench_transfer_nccl::NcclBenchArgs,
}

/// Pushes `chunks` (already encoded) for `session` through a fresh sender, with payloads on `link` if given;
/// returns the seconds until the last ack.
async fn push_all(
    channel: tonic::transport::Channel,
    session: SessionId,
    chunks: Vec<tandem_proto::v1::KvChunk>,
    link: Option<Arc<LinkSender>>,
) -> Result<f64> {
    let started = Instant::now();
    let sender = Sender::open(
        channel,
        session,
        Instant::now() + Duration::from_secs(600),
        link,
    );
    let pusher = sender.pusher();
    for c in chunks {
        pusher.push(c);
    }
    drop(pusher);
    sender.finish().await?;
    Ok(started.elapsed().as_secs_f64())
}

/// The default model's block shape (3 KV heads of 64 dims, 16-token blocks, 30 layers) and RoPE.
fn default_layout() -> ChunkLayout {
    let rope = NamedShape::SmolLM2_135M.config().rope;
    ChunkLayout {
        kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        dtype: KvFormat::F32,
        keys: std::sync::Arc::new(KeyRotation::new(&rope, 64, 16)),
    }
}
const LAYERS: usize = 30;

#[derive(Debug, serde::Serialize)]
struct Row {
    codec: String,
    raw_mb_s: f64,
    /// The same chunks with payloads on a Unix socket link (`--transport unix`).
    link_mb_s: Option<f64>,
    wire_mb: f64,
    raw_mb: f64,
    encode_mb_s: f64,
}

/// Deterministic KV-like values: mostly small, with a few large channels as real keys have.
fn block(seed: usize, n: usize) -> BlockData {
    let mut x = (seed as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(1);
    let mut next = move |i: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        if i % 64 == 3 { u * 40.0 } else { u * 4.0 }
    };
    BlockData {
        k: (0..n).map(&mut next).collect(),
        v: (0..n).map(&mut next).collect(),
    }
}

pub fn run(a: TransferBenchArgs) -> Result<()> {
    if a.transport == Transport::Nccl {
        return super::bench_transfer_nccl::run(a.nccl, a.json);
    }
    if a.mib == 0 || a.blocks_per_chunk == 0 || a.blocks_per_chunk > chunk::MAX_BLOCKS_PER_CHUNK {
        anyhow::bail!(
            "--mib must be positive and --blocks-per-chunk between 1 and {}",
            chunk::MAX_BLOCKS_PER_CHUNK
        );
    }
    let layout = default_layout();
    let n = layout.block_elems();
    let raw_per_chunk = a.blocks_per_chunk * 2 * n * 4;
    let chunks = (a.mib << 20).div_ceil(raw_per_chunk);
    let blocks: Vec<BlockId> = (0..a.blocks_per_chunk as u32).map(BlockId).collect();
    // Distinct data for a few chunks, reused round robin (generating 256 MiB would dominate the run).
    let samples: Vec<Vec<BlockData>> = (0..4)
        .map(|c| {
            (0..a.blocks_per_chunk)
                .map(|b| block(c * 1000 + b, n))
                .collect()
        })
        .collect();
    let rows = runtime()?.block_on(async {
        let sessions = Sessions::new(layout.clone(), LAYERS);
        let listener = bind("127.0.0.1:0".parse()?, "the transfer receiver").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut routes = tonic::service::RoutesBuilder::default();
        // The link's socket lives as long as this block (dropping the listener removes it).
        let listener_link = match a.transport {
            Transport::Unix => Some(LinkListener::bind_temp(Default::default())?),
            _ => None,
        };
        let links = listener_link
            .as_ref()
            .map(LinkListener::links)
            .unwrap_or_default();
        routes.add_service(KvTransferService::new(sessions.clone(), links).into_server());
        let server = tokio::spawn(serve_grpc(
            listener,
            routes,
            &["tandem.v1.KvTransfer"],
            stopped(stop),
        ));
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await?;
        let link = match &listener_link {
            Some(l) => Some(LinkSender::connect(l.path())?),
            None => None,
        };
        let mut rows = Vec::new();
        for &codec in &a.codecs {
            let enc = Encoding {
                codec,
                lossless: a.lossless,
            };
            let received = Arc::new(AtomicUsize::new(0));
            let r2 = received.clone();
            let guard = sessions.open(
                &blocks,
                Instant::now() + Duration::from_secs(600),
                Box::new(move |d| {
                    let Delivered::Host(d) = d else {
                        return Err("a staged chunk on a host transfer".into());
                    };
                    r2.fetch_add(d.data.len(), Ordering::Relaxed);
                    Ok(())
                }),
            );
            let encode_started = Instant::now();
            let encoded: Vec<_> = (0..chunks)
                .map(|i| {
                    let header = ChunkHeader {
                        session: guard.id(),
                        index: i as u32,
                        layers: i % LAYERS..i % LAYERS + 1,
                        blocks: blocks.clone(),
                        fills: vec![Fill::middle(layout.block_size as usize); blocks.len()],
                    };
                    chunk::encode(&header, &layout, enc, &samples[i % samples.len()])
                })
                .collect();
            let encode_s = encode_started.elapsed().as_secs_f64();
            let wire: usize = encoded.iter().map(|c| c.payload.len()).sum();
            let raw_mb = (chunks * raw_per_chunk) as f64 / 1e6;
            let timed = |link: Option<Arc<LinkSender>>| {
                let (chunks_now, received, channel) =
                    (encoded.clone(), received.clone(), channel.clone());
                let session = SessionId(guard.id().0);
                let want = chunks * blocks.len();
                async move {
                    received.store(0, Ordering::Relaxed);
                    let secs = push_all(channel, session, chunks_now, link).await?;
                    anyhow::ensure!(
                        received.load(Ordering::Relaxed) == want,
                        "the receiver did not get every block"
                    );
                    Ok::<_, anyhow::Error>(secs)
                }
            };
            let secs = timed(None).await?;
            eprintln!("{codec}: {raw_mb:.0} MB in {secs:.2} s over gRPC");
            let link_mb_s = match &link {
                Some(l) => {
                    let secs = timed(Some(l.clone())).await?;
                    eprintln!("{codec}: {raw_mb:.0} MB in {secs:.2} s on the Unix socket link");
                    Some(raw_mb / secs)
                }
                None => None,
            };
            rows.push(Row {
                codec: codec.name().into(),
                raw_mb_s: raw_mb / secs,
                link_mb_s,
                wire_mb: wire as f64 / 1e6,
                raw_mb,
                encode_mb_s: raw_mb / encode_s,
            });
        }
        let _ = stop_tx.send(true);
        server.await??;
        Ok::<_, anyhow::Error>(rows)
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "rows": rows, "lossless": a.lossless })
        );
    } else {
        let linked = a.transport == Transport::Unix;
        println!(
            "{:<7} {:>16} {:>10} {:>10} {:>16}{}",
            "codec",
            "moved MB/s (f32)",
            "raw MB",
            "wire MB",
            "encode MB/s (f32)",
            if linked {
                format!(" {:>18} {:>8}", "link MB/s (f32)", "vs gRPC")
            } else {
                String::new()
            }
        );
        for r in &rows {
            let link = r.link_mb_s.map_or(String::new(), |l| {
                format!(" {:>18.0} {:>7.2}x", l, l / r.raw_mb_s)
            });
            println!(
                "{:<7} {:>16.0} {:>10.0} {:>10.1} {:>16.0}{link}",
                r.codec, r.raw_mb_s, r.raw_mb, r.wire_mb, r.encode_mb_s
            );
        }
    }
    Ok(())
}
