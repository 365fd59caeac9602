//! `tandem bench transfer --transport nccl`: the GPU-to-GPU KV data path of decision 0015 alone, between two
//! processes on two GPUs of one host. The sending process gathers each layer's blocks of one prompt from its paged
//! cache into a staging buffer and sends it over a two-rank NCCL link; the receiving process receives each layer
//! and scatters it into other blocks of its own cache, then acknowledges the prompt with a 16-byte message. A round
//! is timed on the sender from the first gather to that acknowledgement, so it holds both staging copies and the
//! link. The command runs both ends as child processes of itself, with NVLink multicast off (`NCCL_NVLS_ENABLE=0`,
//! ../GPU.md), the sender first since the NCCL id must come from a process that outlives the peer's join; before
//! them it measures a peer copy of the same bytes between the two GPUs, the ceiling the transfer is judged against
//! (the GPU issue's target: 70% of it). The receiver then checks that its blocks read back as the sender's.
//! `--with-prefill` adds the disaggregated request's other figure: a real prefill of the prompt on seeded dummy
//! weights, alone and with each layer's blocks sent from the engine's layer observer as soon as they are stored, up
//! to the receiver's acknowledgement (target: at most 10% above prefill alone).

use super::bench_gpu::{bench_prompt, time_prefills};
use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_engine::backend::Backend;
use tandem_engine::backend::cuda::{
    CudaBackend, CudaKvStore, DeviceBytes, LinkRank, NcclId, NcclLink, peer_copy_rate,
};
use tandem_engine::kv::codec::KeyRotation;
use tandem_engine::kv::{KvFormat, KvLayout};
use tandem_engine::model::ModelSource;
use tandem_engine::model::dummy::DummyWeights;
use tandem_engine::model::dummy::NamedShape;
use tandem_engine::{Engine, EngineConfig, LogitsWanted, StepItem};

/// The bytes the receiver answers each round with.
const ACK_BYTES: usize = 16;

/// Which end of the link a child process is (set by the parent; not for direct use).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

#[derive(clap::Args, Debug, Clone)]
pub struct NcclBenchArgs {
    /// Model whose KV shape the prompt's cache has (nccl): llama-3.1-8b, qwen2.5-7b or smollm2-135m.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub shape: String,
    /// Cache format at both ends (nccl): f32, f16, int8, fp8 or int4; blocks cross as the cache stores them.
    #[arg(long, default_value = "f16", value_parser = super::parse_kv_format)]
    pub kv_format: KvFormat,
    /// Prompt tokens whose KV crosses each round (nccl); a multiple of the 16-token block.
    #[arg(long, default_value_t = 2048)]
    pub prompt_tokens: usize,
    /// Timed rounds (nccl), after one untimed warm-up round.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// The sending and the receiving GPU (nccl).
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 1])]
    pub gpus: Vec<usize>,
    /// Also time a real prefill of the prompt (nccl) on seeded dummy weights of `--shape`, alone and then with
    /// each layer's blocks gathered and sent as soon as the layer has stored them: time to the receiver's last
    /// scatter against prefill alone (the GPU issue's target: at most 10% above).
    #[arg(long)]
    pub with_prefill: bool,
    /// Internal: this process is one end of the link.
    #[arg(long, hide = true)]
    pub nccl_role: Option<Role>,
    /// Internal: the link's NCCL id (the receiver's).
    #[arg(long, hide = true)]
    pub nccl_id: Option<String>,
}

/// What one end reports on its last stdout line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct EndReport {
    /// Seconds per timed round (sender): staging copies and link, then the link alone.
    round_s: Vec<f64>,
    link_round_s: Vec<f64>,
    /// Bytes staged and sent per round (sender).
    bytes_per_round: usize,
    /// Blocks checked and those that differ from the sender's (receiver).
    checked_blocks: usize,
    mismatched_blocks: usize,
    /// Seconds per prefill alone, and per prefill whose layers cross to the receiver, up to its acknowledgement
    /// (sender, with `--with-prefill`).
    #[serde(default)]
    prefill_alone_s: Vec<f64>,
    #[serde(default)]
    prefill_sent_s: Vec<f64>,
}

struct Cache {
    layout: KvLayout,
    keys: KeyRotation,
}

fn cache(a: &NcclBenchArgs) -> Result<Cache> {
    let shape: NamedShape = a.shape.parse()?;
    let cfg = shape.config();
    let block_size = 16;
    ensure!(
        a.prompt_tokens > 0 && a.prompt_tokens.is_multiple_of(block_size),
        "--prompt-tokens must be a positive multiple of {block_size}, got {}",
        a.prompt_tokens
    );
    ensure!(
        a.kv_format != KvFormat::Kivi2,
        "--kv-format kivi2 cannot cross over NCCL (its open blocks' keys live in a pool of their own)"
    );
    Ok(Cache {
        layout: KvLayout {
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_size,
            num_blocks: a.prompt_tokens / block_size,
            format: a.kv_format,
        },
        keys: KeyRotation::new(&cfg.rope, cfg.head_dim, block_size),
    })
}

/// The layers whose blocks are filled with data and checked after the transfer (the rest cross as zeros, which
/// moves the same bytes).
fn checked_layers(layout: &KvLayout) -> [usize; 2] {
    [0, layout.layers - 1]
}

/// Seeded K and V of one block: the same on both ends.
fn pattern(layer: usize, block: u32, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut x = (((layer as u64 + 1) * 0x9e37_79b9_7f4a_7c15) ^ (u64::from(block) << 20)) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
    };
    let k = (0..n).map(|_| next()).collect();
    let v = (0..n).map(|_| next()).collect();
    (k, v)
}

fn filled(b: &CudaBackend, c: &Cache) -> Result<CudaKvStore> {
    let mut kv = b.alloc_kv(&c.layout, &c.keys)?;
    for l in checked_layers(&c.layout) {
        for blk in 0..c.layout.num_blocks as u32 {
            let (k, v) = pattern(l, blk, c.layout.block_elems());
            b.write_kv_block(&mut kv, l, blk, &k, &v);
        }
    }
    b.check()?;
    Ok(kv)
}

pub fn run(a: NcclBenchArgs, json: bool) -> Result<()> {
    ensure!(
        a.gpus.len() == 2 && a.gpus[0] != a.gpus[1],
        "--gpus takes two different GPUs (sender,receiver), got {:?}",
        a.gpus
    );
    ensure!(a.rounds > 0, "--rounds must be positive");
    match a.nccl_role {
        Some(Role::Sender) => send(&a),
        Some(Role::Receiver) => receive(&a),
        None => drive(&a, json),
    }
}

/// The sending end: prints the link's id, joins, then times each round up to the receiver's acknowledgement.
fn send(a: &NcclBenchArgs) -> Result<()> {
    let c = cache(a)?;
    let b = CudaBackend::new(a.gpus[0]).context("opening the sending GPU")?;
    let kv = filled(&b, &c)?;
    let id = NcclId::new()?;
    println!("nccl-id {}", id.to_hex());
    let link = NcclLink::join(&b, LinkRank::Sender, id)?;
    let blocks: Vec<u32> = (0..c.layout.num_blocks as u32).collect();
    let shape = kv.staging_shape(&b, 1, blocks.len())?;
    let bytes = shape.bytes();
    let s = b.stream();
    let mut staging = s.alloc_zeros::<u8>(bytes)?;
    let mut ack = s.alloc_zeros::<u8>(ACK_BYTES)?;
    // Each round: every layer (gathered first when `gather`) sent, then the receiver's acknowledgement awaited.
    let mut timed_rounds = |gather: bool| -> Result<Vec<f64>> {
        let mut times = Vec::new();
        for round in 0..=a.rounds {
            s.synchronize()?;
            let t = Instant::now();
            for l in 0..c.layout.layers {
                if gather {
                    b.gather_kv(&kv, l..l + 1, &blocks, &mut staging)?;
                }
                link.send(&staging, bytes)?;
            }
            link.recv(&mut ack, ACK_BYTES)?;
            s.synchronize()?;
            if round > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(times)
    };
    let round_s = timed_rounds(true)?;
    // The link alone: the same messages without the staging copies.
    let link_round_s = timed_rounds(false)?;
    drop((kv, staging));
    let (prefill_alone_s, prefill_sent_s) = if a.with_prefill {
        prefill_rounds(a, b, &link, &mut ack, bytes)?
    } else {
        (Vec::new(), Vec::new())
    };
    report(&EndReport {
        round_s,
        link_round_s,
        bytes_per_round: bytes * c.layout.layers,
        checked_blocks: 0,
        mismatched_blocks: 0,
        prefill_alone_s,
        prefill_sent_s,
    })
}

/// `--with-prefill` on the sender: the prompt prefilled by an engine on the same GPU, `rounds` times alone, then
/// `rounds` times with a layer observer that gathers the layer's blocks of the prompt and sends them (on the
/// compute stream, so the send of layer l runs before layer l + 1's kernels: an upper bound on what a separate
/// transfer stream would cost). Each run has a fresh prompt (no prefix-cache hits) and one untimed warm-up.
fn prefill_rounds(
    a: &NcclBenchArgs,
    b: CudaBackend,
    link: &NcclLink,
    ack: &mut DeviceBytes,
    layer_bytes: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let shape: NamedShape = a.shape.parse()?;
    let started = Instant::now();
    let src = ModelSource::Dummy(DummyWeights::new(shape, 7));
    let bs = 16;
    let n_blocks = a.prompt_tokens / bs;
    let config = EngineConfig {
        block_size: bs,
        num_blocks: n_blocks + 1,
        kv_format: a.kv_format,
        max_batch_tokens: a.prompt_tokens,
        ..Default::default()
    };
    let mut engine = Engine::new(b, &src, config, |_, _| {})?;
    drop(src);
    eprintln!(
        "sender: dummy {} weights on the GPU in {:.1} s",
        shape.name(),
        started.elapsed().as_secs_f64()
    );
    let alone = time_prefills(&mut engine, a.prompt_tokens, 0, a.rounds)?;
    let mut staging = engine.backend.stream().alloc_zeros::<u8>(layer_bytes)?;
    let mut sent = Vec::new();
    let vocab = shape.config().vocab;
    for round in 0..=a.rounds {
        // Prompts after the ones timed alone: none hits the prefix cache.
        let prompt = bench_prompt(a.rounds + 1 + round, a.prompt_tokens, vocab);
        let seq = engine.add_sequence(&prompt)?;
        let t = Instant::now();
        let mut failed = None;
        engine.step_observed(
            &[StepItem {
                seq,
                n_tokens: prompt.len(),
                logits: LogitsWanted::Last,
            }],
            &mut |layer, view| {
                if failed.is_some() {
                    return;
                }
                let blocks: Vec<u32> = (0..n_blocks)
                    .filter_map(|i| view.seq_block(seq, i).map(|b| b.0))
                    .collect();
                let (b, kv) = view.device();
                let r = if blocks.len() == n_blocks {
                    b.gather_kv(kv, layer..layer + 1, &blocks, &mut staging)
                        .and_then(|_| link.send(&staging, layer_bytes))
                } else {
                    Err(tandem_engine::EngineError::InvalidRequest(format!(
                        "the prompt holds {} blocks, {n_blocks} expected",
                        blocks.len()
                    )))
                };
                if let Err(e) = r {
                    failed = Some(e);
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        link.recv(ack, ACK_BYTES)?;
        engine.backend.stream().synchronize()?;
        if round > 0 {
            sent.push(t.elapsed().as_secs_f64());
        }
        engine.remove_sequence(seq)?;
    }
    Ok((alone, sent))
}

/// The receiving end: joins, takes every round into reversed block ids, then compares the checked layers' blocks
/// with the sender's pattern written into a local cache the same way.
fn receive(a: &NcclBenchArgs) -> Result<()> {
    let c = cache(a)?;
    let id = NcclId::from_hex(
        a.nccl_id
            .as_deref()
            .context("the receiver needs --nccl-id")?,
    )?;
    let b = CudaBackend::new(a.gpus[1]).context("opening the receiving GPU")?;
    let mut kv = b.alloc_kv(&c.layout, &c.keys)?;
    let link = NcclLink::join(&b, LinkRank::Receiver, id)?;
    let dest: Vec<u32> = (0..c.layout.num_blocks as u32).rev().collect();
    let bytes = kv.staging_shape(&b, 1, dest.len())?.bytes();
    let s = b.stream();
    let mut staging = s.alloc_zeros::<u8>(bytes)?;
    let ack = s.alloc_zeros::<u8>(ACK_BYTES)?;
    // The sender's rounds as they arrive: every layer received (and scattered when `scatter`), then acknowledged.
    let rounds = |kv: &mut CudaKvStore, staging: &mut DeviceBytes, scatter: bool| -> Result<()> {
        for _ in 0..=a.rounds {
            for l in 0..c.layout.layers {
                link.recv(staging, bytes)?;
                if scatter {
                    b.scatter_kv(kv, l..l + 1, &dest, staging)?;
                }
            }
            link.send(&ack, ACK_BYTES)?;
        }
        Ok(s.synchronize()?)
    };
    rounds(&mut kv, &mut staging, true)?;
    let want = filled(&b, &c)?;
    let (mut checked, mut mismatched) = (0, 0);
    for l in checked_layers(&c.layout) {
        // Staged position i held the sender's block i and went to dest[i].
        for (src, &dst) in dest.iter().enumerate() {
            checked += 1;
            if b.read_kv_block(&kv, l, dst) != b.read_kv_block(&want, l, src as u32) {
                mismatched += 1;
            }
        }
    }
    drop(want);
    // The link alone (the sender's second set of rounds): received, not scattered.
    rounds(&mut kv, &mut staging, false)?;
    if a.with_prefill {
        // The prefill rounds' layers: taken like the others (their data is the model's; nothing to compare).
        rounds(&mut kv, &mut staging, true)?;
    }
    b.check()?;
    report(&EndReport {
        round_s: Vec::new(),
        link_round_s: Vec::new(),
        bytes_per_round: bytes * c.layout.layers,
        checked_blocks: checked,
        mismatched_blocks: mismatched,
        prefill_alone_s: Vec::new(),
        prefill_sent_s: Vec::new(),
    })
}

fn report(r: &EndReport) -> Result<()> {
    println!("{}", serde_json::to_string(r)?);
    Ok(())
}

/// Runs `bench transfer` again as one end of the link, stdout piped (stderr passes through).
fn child(a: &NcclBenchArgs, role: Role, id: Option<&NcclId>) -> Result<std::process::Child> {
    let gpus = format!("{},{}", a.gpus[0], a.gpus[1]);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "bench",
        "transfer",
        "--transport",
        "nccl",
        "--shape",
        &a.shape,
    ])
    .args(["--kv-format", &a.kv_format.to_string(), "--gpus", &gpus])
    .args(["--prompt-tokens", &a.prompt_tokens.to_string()])
    .args(["--rounds", &a.rounds.to_string()])
    .args([
        "--nccl-role",
        if role == Role::Sender {
            "sender"
        } else {
            "receiver"
        },
    ])
    .env("NCCL_NVLS_ENABLE", "0")
    .stdout(Stdio::piped());
    if let Some(id) = id {
        cmd.args(["--nccl-id", &id.to_hex()]);
    }
    if a.with_prefill {
        cmd.arg("--with-prefill");
    }
    cmd.spawn()
        .with_context(|| format!("starting the {role:?} process"))
}

/// Waits for both ends, stopping both as soon as one fails (the other would wait on the link for ever) or when
/// `limit` passes.
fn wait_both(ends: &mut [(Role, std::process::Child); 2], limit: Duration) -> Result<()> {
    let started = Instant::now();
    let mut done = [false; 2];
    loop {
        let mut failed = None;
        for (d, (role, c)) in done.iter_mut().zip(ends.iter_mut()) {
            if *d {
                continue;
            }
            if let Some(status) = c.try_wait()? {
                *d = true;
                if !status.success() {
                    failed = Some(format!("the {role:?} process failed ({status})"));
                }
            }
        }
        if failed.is_none() && done.iter().all(|&d| d) {
            return Ok(());
        }
        if failed.is_none() && started.elapsed() > limit {
            failed = Some(format!(
                "the transfer did not finish within {} s",
                limit.as_secs()
            ));
        }
        if let Some(why) = failed {
            for (_, c) in ends.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            bail!(why);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a child's stdout to its end on a thread of its own (so that the pipe never fills while the parent waits),
/// keeping every line.
fn drain(out: impl BufRead + Send + 'static) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || out.lines().map_while(|l| l.ok()).collect())
}

/// A child's report: the last line it printed that is a JSON object (NCCL's own logging may print to stdout too).
fn report_of(lines: std::thread::JoinHandle<Vec<String>>, role: Role) -> Result<EndReport> {
    let lines = lines
        .join()
        .map_err(|_| anyhow::anyhow!("reading the {role:?} process's output failed"))?;
    let last = lines
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("the {role:?} process printed no report"))?;
    serde_json::from_str(last).with_context(|| format!("the {role:?} process's report: {last}"))
}

fn drive(a: &NcclBenchArgs, json: bool) -> Result<()> {
    let c = cache(a)?;
    let gpus = tandem_engine::backend::cuda::device_count();
    if gpus < 2 || a.gpus.iter().any(|&g| g >= gpus) {
        bail!(
            "the NCCL transfer needs two GPUs of one host (--gpus {:?}); this machine has {gpus}",
            a.gpus
        );
    }
    let b = CudaBackend::new(a.gpus[0]).context("opening the sending GPU")?;
    let kv = b.alloc_kv(&c.layout, &c.keys)?;
    let bytes = kv
        .staging_shape(&b, c.layout.layers, c.layout.num_blocks)?
        .bytes();
    drop((kv, b));
    let peer = peer_copy_rate(a.gpus[0], a.gpus[1], bytes)?;
    eprintln!(
        "peer copy GPU {} -> GPU {}: {:.1} GB/s ({:.0} MiB)",
        a.gpus[0],
        a.gpus[1],
        peer / 1e9,
        bytes as f64 / (1 << 20) as f64
    );
    let mut sender = child(a, Role::Sender, None)?;
    let mut sender_out = BufReader::new(sender.stdout.take().context("sender stdout")?);
    // The sender prints its id before it joins; anything NCCL prints before it is skipped.
    let mut id = None;
    let mut line = String::new();
    while id.is_none() {
        line.clear();
        if sender_out.read_line(&mut line)? == 0 {
            let status = sender.wait()?;
            bail!("the sender process ended ({status}) before it printed its NCCL id");
        }
        if let Some(hex) = line.trim_end().strip_prefix("nccl-id ") {
            id = Some(NcclId::from_hex(hex)?);
        }
    }
    let sender_lines = drain(sender_out);
    let mut receiver = child(a, Role::Receiver, id.as_ref())?;
    let receiver_lines = drain(BufReader::new(
        receiver.stdout.take().context("receiver stdout")?,
    ));
    wait_both(
        &mut [(Role::Sender, sender), (Role::Receiver, receiver)],
        Duration::from_secs(600),
    )?;
    let sent = report_of(sender_lines, Role::Sender)?;
    let got = report_of(receiver_lines, Role::Receiver)?;
    let round = median(sent.round_s.clone());
    let rate = sent.bytes_per_round as f64 / round;
    let link_rate = sent.bytes_per_round as f64 / median(sent.link_round_s.clone());
    let mut row = serde_json::json!({
        "shape": a.shape, "kv_format": a.kv_format.to_string(), "prompt_tokens": a.prompt_tokens,
        "bytes_per_round": sent.bytes_per_round, "round_ms_median": round * 1e3,
        "nccl_gb_s": rate / 1e9, "peer_copy_gb_s": peer / 1e9, "ratio": rate / peer,
        "link_only_gb_s": link_rate / 1e9, "link_only_ratio": link_rate / peer,
        "checked_blocks": got.checked_blocks, "mismatched_blocks": got.mismatched_blocks,
    });
    let ttft = (!sent.prefill_sent_s.is_empty()).then(|| {
        let (alone, with) = (
            median(sent.prefill_alone_s.clone()),
            median(sent.prefill_sent_s.clone()),
        );
        row["prefill_alone_ms"] = (alone * 1e3).into();
        row["prefill_sent_ms"] = (with * 1e3).into();
        row["ttft_vs_prefill"] = (with / alone).into();
        (alone, with)
    });
    if json {
        println!("{row}");
    } else {
        if let Some((alone, with)) = ttft {
            println!(
                "prefill of {} tokens: {:.2} ms alone, {:.2} ms with every layer sent and scattered on the other GPU \
                 (median of {}): {:.3}x",
                a.prompt_tokens,
                alone * 1e3,
                with * 1e3,
                sent.prefill_sent_s.len(),
                with / alone
            );
        }
        println!(
            "{} {} cache, {} tokens: {:.1} MiB per prompt in {:.3} ms (median of {}) = {:.1} GB/s over NCCL \
             with the staging copies ({:.1} GB/s the link alone); peer copy {:.1} GB/s; ratio {:.2} ({:.2} the link \
             alone); receiver blocks {} of {} equal to the sender's",
            a.shape,
            a.kv_format,
            a.prompt_tokens,
            sent.bytes_per_round as f64 / (1 << 20) as f64,
            round * 1e3,
            sent.round_s.len(),
            rate / 1e9,
            link_rate / 1e9,
            peer / 1e9,
            rate / peer,
            link_rate / peer,
            got.checked_blocks - got.mismatched_blocks,
            got.checked_blocks
        );
    }
    ensure!(
        got.mismatched_blocks == 0,
        "{} of {} blocks arrived different from the sender's",
        got.mismatched_blocks,
        got.checked_blocks
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
