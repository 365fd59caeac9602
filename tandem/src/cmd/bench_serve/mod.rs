//! `tandem bench serve`: a load generator against the serving path, open loop (Poisson arrivals at `--rate`) or
//! closed loop (`--concurrency` streams), reporting TTFT, TPOT, ITL and end-to-end latency percentiles, throughput,
//! goodput under an SLO and KV bytes moved per request, as a table, JSON and an SVG of latency against load.
//!
//! By default it starts a cluster in this process (the `tandem up` options apply) and runs the same seeded
//! workload on a baseline in the same run: `--baseline colocated` (a cluster without prefill workers, the setup
//! disaggregation is measured against) or `--baseline direct` (requests sent to the decode worker itself, so the
//! difference is what the router adds). Requests ask for exactly their output length (`ignore_eos`).

mod mock;
mod report;
mod workload;

use super::serve::runtime;
use super::up::{ClusterArgs, LocalCluster};
use anyhow::{Context, Result};
use report::{Point, Sample, Slo};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tandem_proto::v1;
use tonic::transport::{Channel, Endpoint};
use workload::{BenchRequest, Dist, WorkloadSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// Only the main setup.
    None,
    /// The same workload on a colocated cluster (decode workers prefill locally).
    Colocated,
    /// The same workload sent straight to the decode worker, bypassing the router.
    Direct,
    /// The same cluster with the router's `--policy round-robin`.
    RoundRobin,
}

#[derive(clap::Args, Debug)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Measure a running router (its gRPC URL, e.g. http://127.0.0.1:8001) instead of starting a cluster here.
    #[arg(long)]
    pub target: Option<String>,
    /// What to measure beside the main setup on the same workload (ignored with --target).
    #[arg(long, value_enum, default_value = "colocated")]
    pub baseline: Baseline,
    /// Measured requests per load point.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Closed loop: this many requests in flight at all times (comma list = one point each).
    #[arg(long, value_delimiter = ',', default_values_t = [4usize])]
    pub concurrency: Vec<usize>,
    /// Open loop: Poisson arrivals at this many requests per second (comma list; replaces --concurrency).
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Prompt length in tokens: N or A..B (uniform).
    #[arg(long, default_value = "128")]
    pub prompt_tokens: Dist,
    /// Output length in tokens: N or A..B (uniform).
    #[arg(long, default_value = "128")]
    pub output_tokens: Dist,
    /// Tokens every prompt starts with (a shared system prompt), on top of --prompt-tokens.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Distinct shared prefixes of --shared-prefix-tokens each; every request starts with one drawn uniformly.
    #[arg(long, default_value_t = 1)]
    pub shared_prefixes: usize,
    /// Goodput SLO: time to first token, in milliseconds.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    /// Goodput SLO: time per output token after the first, in milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    /// Seed of the workload (same seed, same requests).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG of latency against offered load here.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
    /// Measure the router alone: serve from a model-free decode worker that streams tokens on a fixed clock
    /// (--mock-ttft-ms, --mock-itl-ms) and compare with calling that worker directly. Only the model's tokenizer is
    /// loaded; --baseline is ignored.
    #[arg(long)]
    pub mock_workers: bool,
    /// With --mock-workers: the mock's time to first token, in milliseconds.
    #[arg(long, default_value_t = 10.0)]
    pub mock_ttft_ms: f64,
    /// With --mock-workers: the mock's time between tokens, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub mock_itl_ms: f64,
}

/// Where requests go.
#[derive(Clone)]
enum Target {
    Router(Channel),
    /// A decode worker, told to use this prefill worker (as the router would).
    Decode(Channel, Option<String>),
}

fn channel(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL {url:?}"))?
        .tcp_nodelay(true)
        .connect_lazy())
}

async fn send(target: &Target, r: &BenchRequest) -> Sample {
    let stop = v1::StopConditions {
        max_tokens: r.output_tokens as u32,
        ignore_eos: true,
        ..Default::default()
    };
    let started = Instant::now();
    let stream = match target {
        Target::Router(c) => {
            v1::generation_client::GenerationClient::new(c.clone())
                .generate(v1::GenerateRequest {
                    input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                        ids: r.prompt.clone(),
                    })),
                    stop: Some(stop),
                    ..Default::default()
                })
                .await
        }
        Target::Decode(c, prefill) => {
            v1::decode_worker_client::DecodeWorkerClient::new(c.clone())
                .generate(v1::DecodeRequest {
                    prompt_token_ids: r.prompt.clone(),
                    stop: Some(stop),
                    prefill_endpoint: prefill.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await
        }
    };
    let mut s = Sample::default();
    let mut stream = match stream {
        Ok(x) => x.into_inner(),
        Err(e) => {
            s.error = Some(e.message().to_string());
            return s;
        }
    };
    let mut last = None;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let now = Instant::now();
                match last {
                    None => s.ttft = now - started,
                    Some(prev) => s.itl.push(now - prev),
                }
                last = Some(now);
                s.output_tokens += m.token_ids.len();
                if let Some(t) = m.timings {
                    s.kv_bytes = t.kv_bytes_transferred;
                    s.prefilled_locally = t.prefilled_locally;
                }
            }
            Ok(None) => break,
            Err(e) => {
                s.error = Some(e.message().to_string());
                break;
            }
        }
    }
    s.e2e = started.elapsed();
    s
}

/// Runs the workload once against `target`: closed loop with `concurrency` streams, or open loop by `send_at`.
async fn run_point(
    target: &Target,
    reqs: &[BenchRequest],
    concurrency: Option<usize>,
) -> (Vec<Sample>, Duration) {
    let reqs: Arc<Vec<BenchRequest>> = Arc::new(reqs.to_vec());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match concurrency {
        Some(n) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..n {
                let (t, reqs, next) = (target.clone(), reqs.clone(), next.clone());
                tasks.spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = reqs.get(i) else { return out };
                        out.push(send(&t, r).await);
                    }
                });
            }
        }
        None => {
            for i in 0..reqs.len() {
                let at = started + Duration::from_secs_f64(reqs[i].send_at.unwrap_or(0.0));
                tokio::time::sleep_until(at.into()).await;
                let (t, reqs) = (target.clone(), reqs.clone());
                tasks.spawn(async move { vec![send(&t, &reqs[i]).await] });
            }
        }
    }
    let mut samples = Vec::new();
    while let Some(r) = tasks.join_next().await {
        samples.extend(r.unwrap_or_default());
    }
    (samples, started.elapsed())
}

struct Plan<'a> {
    args: &'a ServeBenchArgs,
    slo: Slo,
}

/// A setup measured on a cluster that already served the workload gets fresh prompts of the same shape (another
/// seed), or its prefix cache would make it look faster than it is.
const SECOND_PASS_SEED: u64 = 0x5eed;

impl Plan<'_> {
    fn spec(&self, rate: Option<f64>, requests: usize, seed: u64) -> WorkloadSpec {
        WorkloadSpec {
            requests,
            prompt_tokens: self.args.prompt_tokens,
            output_tokens: self.args.output_tokens,
            shared_prefix_tokens: self.args.shared_prefix_tokens,
            shared_prefixes: self.args.shared_prefixes,
            rate,
            seed,
            // SmolLM2's special tokens sit at the bottom of the vocabulary; ordinary text tokens above 1000.
            token_range: (1000, 40000),
        }
    }

    /// Every load point on one target, after two unmeasured warm-up requests.
    async fn measure(&self, setup: &str, target: &Target, seed: u64) -> Vec<Point> {
        let warm = workload::build(&self.spec(None, 2, self.args.seed ^ 0xdead));
        run_point(target, &warm, Some(1)).await;
        let mut points = Vec::new();
        let loads: Vec<(Option<f64>, Option<usize>)> = if self.args.rate.is_empty() {
            self.args
                .concurrency
                .iter()
                .map(|&c| (None, Some(c.max(1))))
                .collect()
        } else {
            self.args.rate.iter().map(|&r| (Some(r), None)).collect()
        };
        for (i, (rate, conc)) in loads.into_iter().enumerate() {
            // Each point gets its own prompts, so no point is served from an earlier point's prefix cache.
            let reqs =
                workload::build(&self.spec(rate, self.args.requests, seed.wrapping_add(i as u64)));
            eprintln!(
                "{setup}: {} requests at {}",
                reqs.len(),
                load_name(rate, conc)
            );
            let (samples, wall) = run_point(target, &reqs, conc).await;
            if let Some(e) = samples.iter().find_map(|s| s.error.as_ref()) {
                eprintln!("{setup}: some requests failed, e.g. {e}");
            }
            let value = rate.unwrap_or(conc.unwrap_or(1) as f64);
            points.push(report::summarize(
                setup,
                load_name(rate, conc),
                value,
                &samples,
                wall,
                self.slo,
            ));
        }
        points
    }
}

fn load_name(rate: Option<f64>, conc: Option<usize>) -> String {
    match (rate, conc) {
        (Some(r), _) => format!("rate {r}/s"),
        (_, Some(c)) => format!("concurrency {c}"),
        _ => "unknown".into(),
    }
}

fn setup_name(c: &ClusterArgs) -> String {
    if c.colocated {
        format!("colocated {}D", c.decode)
    } else {
        let o = &c.decode_options;
        let evict = c.kv_eviction.map_or_else(String::new, |e| format!("+{e}"));
        format!(
            "disaggregated {}P+{}D {}{evict} {}",
            c.prefill, c.decode, o.kv_codec, c.routing.policy
        )
    }
}

pub fn run(a: ServeBenchArgs, threads: usize) -> Result<()> {
    if a.requests == 0 || a.shared_prefixes == 0 {
        anyhow::bail!("--requests and --shared-prefixes must be at least 1");
    }
    if a.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        anyhow::bail!("--rate values must be positive");
    }
    for (flag, ms) in [
        ("--mock-ttft-ms", a.mock_ttft_ms),
        ("--mock-itl-ms", a.mock_itl_ms),
    ] {
        if !(ms.is_finite() && (0.0..=60_000.0).contains(&ms)) {
            anyhow::bail!("{flag} must be between 0 and 60000, got {ms}");
        }
    }
    let plan = Plan {
        args: &a,
        slo: Slo {
            ttft_ms: a.slo_ttft_ms,
            tpot_ms: a.slo_tpot_ms,
        },
    };
    let points = runtime()?.block_on(async {
        let mut points = Vec::new();
        if let Some(url) = &a.target {
            points.extend(
                plan.measure("target", &Target::Router(channel(url)?), a.seed)
                    .await,
            );
            return Ok::<_, anyhow::Error>(points);
        }
        if a.mock_workers {
            let m = mock::MockSetup::start(&a).await?;
            let router = Target::Router(m.router.clone());
            points.extend(plan.measure("router -> mock decode", &router, a.seed).await);
            let direct = Target::Decode(m.decode.clone(), None);
            points.extend(plan.measure("mock decode direct", &direct, a.seed).await);
            m.stop().await?;
            return Ok(points);
        }
        let loopback = "127.0.0.1:0".parse().expect("valid address");
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let c = LocalCluster::start(&a.cluster, loopback, loopback, threads, stop).await?;
        let name = setup_name(&a.cluster);
        let router = Target::Router(channel(&format!("http://{}", c.grpc))?);
        points.extend(plan.measure(&name, &router, a.seed).await);
        if a.baseline == Baseline::Direct {
            let decode =
                Target::Decode(channel(&c.decode_urls[0])?, c.prefill_urls.first().cloned());
            let seed = a.seed ^ SECOND_PASS_SEED;
            points.extend(plan.measure(&format!("{name} direct"), &decode, seed).await);
        }
        let _ = stop_tx.send(true);
        c.join().await?;
        let other = match a.baseline {
            Baseline::Colocated if !a.cluster.colocated => Some(ClusterArgs {
                colocated: true,
                ..a.cluster.clone()
            }),
            Baseline::RoundRobin => {
                let mut c = a.cluster.clone();
                c.routing.policy = tandem_router::PolicyKind::RoundRobin;
                Some(c)
            }
            _ => None,
        };
        if let Some(other) = other {
            let (stop_tx, stop) = tokio::sync::watch::channel(false);
            let c = LocalCluster::start(&other, loopback, loopback, threads, stop).await?;
            let target = Target::Router(channel(&format!("http://{}", c.grpc))?);
            points.extend(plan.measure(&setup_name(&other), &target, a.seed).await);
            let _ = stop_tx.send(true);
            c.join().await?;
        }
        Ok(points)
    })?;
    let comparisons = compare(&points);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"points": points, "comparisons": comparisons})
        );
    } else {
        print!("{}", report::table(&points));
        for c in &comparisons {
            println!("{c}");
        }
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, report::svg(&points))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// One line per load point comparing the main setup (first) with each other setup at the same load.
fn compare(points: &[Point]) -> Vec<String> {
    let Some(main) = points.first().map(|p| p.setup.clone()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in points.iter().filter(|p| p.setup == main) {
        for b in points
            .iter()
            .filter(|b| b.setup != main && b.load == p.load)
        {
            out.push(format!(
                "{} vs {} at {}: output tok/s x{:.2}, TTFT p50 {:+.2} ms (x{:.2} faster), TTFT p99 {:+.2} ms, ITL p50 {:+.2} ms, ITL p99 {:+.2} ms, e2e p99 {:+.2} ms",
                p.setup,
                b.setup,
                p.load,
                p.output_tokens_per_s / b.output_tokens_per_s.max(1e-9),
                p.ttft_ms.p50 - b.ttft_ms.p50,
                b.ttft_ms.p50 / p.ttft_ms.p50.max(1e-9),
                p.ttft_ms.p99 - b.ttft_ms.p99,
                p.itl_ms.p50 - b.itl_ms.p50,
                p.itl_ms.p99 - b.itl_ms.p99,
                p.e2e_ms.p99 - b.e2e_ms.p99,
            ));
        }
    }
    out
}
