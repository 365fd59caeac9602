//! `tandem simulate`: the router's real prefix index and policies against a simulated cluster, for every workload
//! and policy asked for. Step times come from a latency model fitted to measured engine runs (stated in the
//! output; `--measure` refits it on this machine). Reports TTFT/TPOT percentiles, the prefix hit rate against an
//! oracle that sees every cache, load imbalance (max / mean busy time per role) and the router's CPU time per
//! decision, as a table or JSON.

mod cluster;
pub mod latency;
mod workload;

use crate::cmd::ModelArgs;
use anyhow::{Result, bail};
use cluster::{ClusterSpec, Outcome};
use latency::LatencyModel;
use std::path::PathBuf;
use std::time::Instant;
use tandem_router::policy::{CostModel, Policy, PolicyKind, Spread};
use workload::WorkloadKind;

#[derive(clap::Args, Debug)]
pub struct SimulateArgs {
    /// Workloads to run (comma list of shared-prefix, multi-turn, rag, uniform).
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [WorkloadKind::SharedPrefix, WorkloadKind::MultiTurn, WorkloadKind::Rag, WorkloadKind::Uniform])]
    pub workloads: Vec<WorkloadKind>,
    /// Routing policies to compare (comma list of round-robin, least-loaded, prefix, cost).
    #[arg(long, value_delimiter = ',', default_values_t = PolicyKind::ALL)]
    pub policies: Vec<PolicyKind>,
    /// Requests per workload (turns, for multi-turn).
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    #[arg(long, default_value_t = 4)]
    pub decode_workers: usize,
    #[arg(long, default_value_t = 4)]
    pub prefill_workers: usize,
    /// Offered load as a fraction of the prefill pool's capacity for the workload's prompts with no cache hits.
    #[arg(long, default_value_t = 0.7)]
    pub load: f64,
    /// KV blocks per decode worker.
    #[arg(long, default_value_t = 2048)]
    pub decode_kv_blocks: usize,
    /// KV blocks per prefill worker.
    #[arg(long, default_value_t = 2048)]
    pub prefill_kv_blocks: usize,
    /// KV bytes per prompt token on the wire (default: SmolLM2-135M's f32 cache, codec none).
    #[arg(long, default_value_t = 46080.0)]
    pub kv_bytes_per_token: f64,
    /// Prefill-to-decode link bandwidth, bytes per second.
    #[arg(long, default_value_t = 1e9)]
    pub link_bytes_per_s: f64,
    /// Delay from a worker's cache change to the router's index seeing it, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub event_delay_ms: f64,
    #[command(flatten)]
    pub cost: crate::cmd::CostArgs,
    /// A latency model JSON (as `--measure` writes); default: the one measured on the development machine.
    #[arg(long)]
    pub latency_model: Option<PathBuf>,
    /// Measure the engine on this machine, fit the latency model, and use it.
    #[arg(long)]
    pub measure: bool,
    /// Where `--measure` writes the fitted model.
    #[arg(long)]
    pub write_latency_model: Option<PathBuf>,
    /// The model `--measure` times (its `--block-size` is also the simulated workers' block size).
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    workload: &'static str,
    policy: PolicyKind,
    requests: usize,
    ttft_p50_s: f64,
    ttft_p90_s: f64,
    ttft_p99_s: f64,
    tpot_p50_s: f64,
    tpot_p99_s: f64,
    hit_rate: f64,
    oracle_hit_rate: f64,
    hit_vs_oracle: f64,
    imbalance_decode: f64,
    /// `None` when the prefill pool computed under 5% of the prompts (a max/mean over a handful says nothing).
    imbalance_prefill: Option<f64>,
    local_prefill_share: f64,
    kv_gib_moved: f64,
    decision_p50_us: f64,
    decision_p99_us: f64,
    decisions_per_s: f64,
    index_entries: usize,
    index_mib: f64,
    simulated_s: f64,
    wall_s: f64,
}

pub fn run(a: SimulateArgs, threads: usize) -> Result<()> {
    if a.decode_workers == 0 {
        bail!("--decode-workers must be at least 1");
    }
    if a.requests == 0 || a.model.block_size == 0 || a.workloads.is_empty() || a.policies.is_empty()
    {
        bail!("--requests, --block-size, --workloads and --policies must not be zero or empty");
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(a.load) || !positive(a.link_bytes_per_s) || a.kv_bytes_per_token < 0.0 {
        bail!("--load and --link-bytes-per-s must be positive, --kv-bytes-per-token not negative");
    }
    let lat = if a.measure {
        let m = latency::measure(&a.model, threads)?;
        if let Some(p) = &a.write_latency_model {
            std::fs::write(p, serde_json::to_string_pretty(&m)? + "\n")?;
            eprintln!("latency model written to {}", p.display());
        }
        m
    } else if let Some(p) = &a.latency_model {
        LatencyModel::load(p)?
    } else {
        LatencyModel::builtin()
    };
    let cost = a
        .cost
        .apply(cost_model(&lat, a.link_bytes_per_s, a.model.block_size))?;
    let spec = ClusterSpec {
        decode_workers: a.decode_workers,
        prefill_workers: a.prefill_workers,
        decode_kv_blocks: a.decode_kv_blocks,
        prefill_kv_blocks: a.prefill_kv_blocks,
        block_size: a.model.block_size,
        kv_bytes_per_token: a.kv_bytes_per_token,
        link_bytes_per_s: a.link_bytes_per_s,
        layers: 30,
        event_delay_s: a.event_delay_ms / 1e3,
    };
    let mut rows = Vec::new();
    let pb = crate::progress::bar((a.workloads.len() * a.policies.len()) as u64, "simulating");
    for &kind in &a.workloads {
        let computing = a.prefill_workers.max(1) as f64;
        let mut rate =
            a.load * computing / lat.prefill_s(workload::mean_prompt_tokens(kind) as usize, 0);
        if kind == WorkloadKind::MultiTurn {
            rate /= 5.0; // sessions per second; five turns on average
        }
        let work = workload::generate(kind, a.requests, rate, a.seed);
        // A request larger than a worker's KV pool could never run: it would vanish from the results.
        let largest = |tokens: &dyn Fn(&workload::SimRequest) -> usize| {
            let bs = a.model.block_size;
            work.requests
                .iter()
                .map(|r| tokens(r).div_ceil(bs))
                .max()
                .unwrap_or(0)
        };
        for (flag, blocks, largest) in [
            (
                "--decode-kv-blocks",
                a.decode_kv_blocks,
                largest(&|r| r.prompt.len() + r.output.len()),
            ),
            (
                "--prefill-kv-blocks",
                a.prefill_kv_blocks,
                largest(&|r| r.prompt.len()),
            ),
        ] {
            if blocks < largest {
                bail!(
                    "{flag} {blocks} is less than the {largest} blocks the largest request of the {kind:?} workload needs"
                );
            }
        }
        for &p in &a.policies {
            let t = Instant::now();
            let policy = Policy::new(p, cost, a.seed);
            let out = cluster::run(spec, &lat, &work, policy);
            rows.push(row(kind, p, &out, t.elapsed().as_secs_f64()));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "latency_model": lat.describe(),
                "decode_workers": a.decode_workers,
                "prefill_workers": a.prefill_workers,
                "load": a.load,
                "rows": rows,
            })
        );
        return Ok(());
    }
    println!("latency model: {}", lat.describe());
    println!(
        "cluster: {} decode + {} prefill workers, {} + {} KV blocks of {} tokens, link {:.2} GB/s, {} KV B/token, load {}",
        a.decode_workers,
        a.prefill_workers,
        a.decode_kv_blocks,
        a.prefill_kv_blocks,
        a.model.block_size,
        a.link_bytes_per_s / 1e9,
        a.kv_bytes_per_token,
        a.load
    );
    println!(
        "{:<14} {:<13} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>7}",
        "workload",
        "policy",
        "ttft p50",
        "ttft p99",
        "tpot p50",
        "tpot p99",
        "hit",
        "oracle",
        "ratio",
        "imb d",
        "imb p",
        "dec p50",
        "dec p99",
        "dec/s",
        "wall s"
    );
    for r in &rows {
        println!(
            "{:<14} {:<13} {:>8.3} {:>8.3} {:>8.4} {:>8.4} {:>6.3} {:>6.3} {:>6.3} {:>6.2} {:>6} {:>6.1}us {:>6.1}us {:>9.0} {:>7.2}",
            r.workload,
            r.policy.name(),
            r.ttft_p50_s,
            r.ttft_p99_s,
            r.tpot_p50_s,
            r.tpot_p99_s,
            r.hit_rate,
            r.oracle_hit_rate,
            r.hit_vs_oracle,
            r.imbalance_decode,
            r.imbalance_prefill
                .map_or_else(|| "-".to_string(), |x| format!("{x:.2}")),
            r.decision_p50_us,
            r.decision_p99_us,
            r.decisions_per_s,
            r.wall_s
        );
    }
    for &kind in &a.workloads {
        let find = |p| {
            rows.iter()
                .find(|r| r.workload == kind.name() && r.policy == p)
        };
        if let (Some(c), Some(rr)) = (find(PolicyKind::Cost), find(PolicyKind::RoundRobin)) {
            println!(
                "{}: cost vs round-robin TTFT p50 {:.3} s vs {:.3} s ({:.2}x)",
                kind.name(),
                c.ttft_p50_s,
                rr.ttft_p50_s,
                rr.ttft_p50_s / c.ttft_p50_s
            );
        }
    }
    Ok(())
}

/// The cost policy's figures, read off the latency model (prefill per token at a mid-size context; a decode
/// step's growth per sequence at 512 tokens of context); the softmax temperature is one block's prefill.
fn cost_model(lat: &LatencyModel, link: f64, block_size: usize) -> CostModel {
    let per_token = lat.prefill.b + lat.prefill.c * 512.0;
    let spread = Spread::Softmax {
        temperature_s: CostModel::default_temperature(per_token, block_size),
    };
    CostModel {
        prefill_s_per_token: per_token,
        local_prefill_s_per_token: per_token,
        transfer_s_per_byte: 1.0 / link,
        decode_s_per_request: lat.decode.b + lat.decode.c * 512.0,
        spread,
        ..CostModel::default()
    }
}

fn row(kind: WorkloadKind, policy: PolicyKind, o: &Outcome, wall_s: f64) -> Row {
    let ratio = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    let hit = ratio(o.hit_tokens, o.prompt_tokens);
    let oracle = ratio(o.oracle_tokens, o.prompt_tokens);
    let mut ns: Vec<f64> = o.decision_ns.iter().map(|&x| x as f64).collect();
    let mean_ns = ns.iter().sum::<f64>() / ns.len().max(1) as f64;
    Row {
        workload: kind.name(),
        policy,
        requests: o.ttft_s.len(),
        ttft_p50_s: percentile(&mut o.ttft_s.clone(), 0.50),
        ttft_p90_s: percentile(&mut o.ttft_s.clone(), 0.90),
        ttft_p99_s: percentile(&mut o.ttft_s.clone(), 0.99),
        tpot_p50_s: percentile(&mut o.tpot_s.clone(), 0.50),
        tpot_p99_s: percentile(&mut o.tpot_s.clone(), 0.99),
        hit_rate: hit,
        oracle_hit_rate: oracle,
        hit_vs_oracle: if oracle > 0.0 { hit / oracle } else { 1.0 },
        imbalance_decode: imbalance(&o.decode_busy_s),
        imbalance_prefill: (o.local_prefills as f64 <= 0.95 * o.ttft_s.len() as f64)
            .then(|| imbalance(&o.prefill_busy_s)),
        local_prefill_share: o.local_prefills as f64 / o.ttft_s.len().max(1) as f64,
        kv_gib_moved: o.kv_bytes_moved / (1u64 << 30) as f64,
        decision_p50_us: percentile(&mut ns, 0.50) / 1e3,
        decision_p99_us: percentile(&mut ns, 0.99) / 1e3,
        decisions_per_s: if mean_ns > 0.0 { 1e9 / mean_ns } else { 0.0 },
        index_entries: o.index_entries,
        index_mib: o.index_memory_bytes as f64 / (1u64 << 20) as f64,
        simulated_s: o.makespan_s,
        wall_s,
    }
}

/// Nearest-rank percentile (0 for an empty list).
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Busiest worker's busy time over the mean (1 when nobody worked).
fn imbalance(busy: &[f64]) -> f64 {
    let mean = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
    if mean <= 0.0 {
        return 1.0;
    }
    busy.iter().copied().fold(0.0, f64::max) / mean
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's published algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_imbalance() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.99), 5.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        assert_eq!(imbalance(&[1.0, 1.0, 4.0]), 2.0);
        assert_eq!(imbalance(&[0.0, 0.0]), 1.0);
        assert_eq!(today().len(), 10);
    }

    /// The whole loop on a small cluster: every request completes, the prefix policy finds what the oracle finds
    /// on a shared-prefix workload, and round-robin finds less.
    #[test]
    fn a_small_cluster_completes_every_request_and_prefix_routing_finds_the_cache() {
        let lat = LatencyModel::builtin();
        let spec = ClusterSpec {
            decode_workers: 4,
            prefill_workers: 4,
            decode_kv_blocks: 2048,
            prefill_kv_blocks: 2048,
            block_size: 16,
            kv_bytes_per_token: 46080.0,
            link_bytes_per_s: 1e9,
            layers: 30,
            event_delay_s: 0.005,
        };
        let rate = 0.5 * 4.0 / lat.prefill_s(1200, 0);
        let work = workload::generate(WorkloadKind::SharedPrefix, 600, rate, 5);
        let cost = cost_model(&lat, 1e9, 16);
        let mut hits = Vec::new();
        for p in [PolicyKind::RoundRobin, PolicyKind::Cost] {
            let o = cluster::run(spec, &lat, &work, Policy::new(p, cost, 1));
            assert_eq!(o.ttft_s.len(), 600, "{p}: every request got a first token");
            assert_eq!(o.tpot_s.len(), 600);
            assert_eq!(o.index_errors, 0);
            assert!(o.ttft_s.iter().all(|&t| t > 0.0 && t.is_finite()));
            hits.push((
                o.hit_tokens as f64 / o.prompt_tokens as f64,
                o.oracle_tokens as f64 / o.prompt_tokens as f64,
            ));
        }
        let (rr, cost) = (hits[0], hits[1]);
        assert!(
            cost.0 >= 0.95 * cost.1,
            "cost hit {} vs oracle {}",
            cost.0,
            cost.1
        );
        assert!(
            cost.0 > rr.0 + 0.1,
            "cost {} vs round-robin {}",
            cost.0,
            rr.0
        );
    }
}
