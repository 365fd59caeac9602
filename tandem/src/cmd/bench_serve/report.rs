//! Turning per-request timings into what a serving benchmark reports: TTFT, TPOT, ITL and end-to-end latency
//! percentiles, throughput, goodput under an SLO, KV bytes moved, as a table, JSON, and an SVG of latency against
//! offered load.

use serde::Serialize;
use std::time::Duration;

/// What one request saw.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub ttft: Duration,
    pub e2e: Duration,
    /// Gaps between consecutive streamed tokens.
    pub itl: Vec<Duration>,
    pub output_tokens: usize,
    pub kv_bytes: u64,
    pub prefilled_locally: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// Milliseconds of `v`, by nearest rank.
pub fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    }
}

/// The service level a request must meet to count as goodput.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tpot_ms: f64,
}

/// One measured point (one load level on one setup).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub setup: String,
    /// "concurrency 4" or "rate 2.0/s".
    pub load: String,
    /// Concurrency or rate, as a number for plotting.
    pub load_value: f64,
    pub requests: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub goodput_requests_per_s: f64,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub kv_bytes_per_request: f64,
    pub prefilled_locally: usize,
}

pub fn summarize(
    setup: &str,
    load: String,
    load_value: f64,
    samples: &[Sample],
    wall: Duration,
    slo: Slo,
) -> Point {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tpot = |s: &Sample| {
        if s.output_tokens > 1 {
            ms(s.e2e - s.ttft) / (s.output_tokens - 1) as f64
        } else {
            0.0
        }
    };
    let secs = wall.as_secs_f64().max(1e-9);
    let good = ok
        .iter()
        .filter(|s| ms(s.ttft) <= slo.ttft_ms && tpot(s) <= slo.tpot_ms)
        .count();
    Point {
        setup: setup.to_string(),
        load,
        load_value,
        requests: samples.len(),
        failed: samples.len() - ok.len(),
        duration_s: secs,
        requests_per_s: ok.len() as f64 / secs,
        output_tokens_per_s: ok.iter().map(|s| s.output_tokens).sum::<usize>() as f64 / secs,
        goodput_requests_per_s: good as f64 / secs,
        ttft_ms: percentiles(ok.iter().map(|s| ms(s.ttft)).collect()),
        tpot_ms: percentiles(ok.iter().map(|s| tpot(s)).collect()),
        itl_ms: percentiles(
            ok.iter()
                .flat_map(|s| s.itl.iter().map(|&d| ms(d)))
                .collect(),
        ),
        e2e_ms: percentiles(ok.iter().map(|s| ms(s.e2e)).collect()),
        kv_bytes_per_request: if ok.is_empty() {
            0.0
        } else {
            ok.iter().map(|s| s.kv_bytes as f64).sum::<f64>() / ok.len() as f64
        },
        prefilled_locally: ok.iter().filter(|s| s.prefilled_locally).count(),
    }
}

pub fn table(points: &[Point]) -> String {
    let mut out = format!(
        "{:<26} {:<16} {:>5} {:>7} {:>8} {:>8} {:>17} {:>17} {:>17} {:>9}\n",
        "setup",
        "load",
        "ok",
        "req/s",
        "out tok/s",
        "goodput",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "ITL p50/p99 ms",
        "KV KiB/req"
    );
    for p in points {
        out.push_str(&format!(
            "{:<26} {:<16} {:>5} {:>7.2} {:>8.1} {:>8.2} {:>17} {:>17} {:>17} {:>9.0}\n",
            p.setup,
            p.load,
            p.requests - p.failed,
            p.requests_per_s,
            p.output_tokens_per_s,
            p.goodput_requests_per_s,
            format!("{:.1}/{:.1}", p.ttft_ms.p50, p.ttft_ms.p99),
            format!("{:.1}/{:.1}", p.tpot_ms.p50, p.tpot_ms.p99),
            format!("{:.1}/{:.1}", p.itl_ms.p50, p.itl_ms.p99),
            p.kv_bytes_per_request / 1024.0,
        ));
    }
    out
}

/// Reads one plotted number off a point.
type Metric = fn(&Point) -> f64;

/// An SVG line chart of TTFT and TPOT (p50 and p99) against offered load, one line per setup and metric.
pub fn svg(points: &[Point]) -> String {
    let (w, h, m) = (760.0, 420.0, 60.0);
    let xs: Vec<f64> = points.iter().map(|p| p.load_value).collect();
    let (xmin, xmax) = (
        xs.iter().cloned().fold(f64::INFINITY, f64::min),
        xs.iter().cloned().fold(0.0, f64::max),
    );
    let series: Vec<(&str, Metric)> = vec![
        ("TTFT p50", |p| p.ttft_ms.p50),
        ("TTFT p99", |p| p.ttft_ms.p99),
        ("TPOT p50", |p| p.tpot_ms.p50),
        ("TPOT p99", |p| p.tpot_ms.p99),
    ];
    let ymax = points
        .iter()
        .flat_map(|p| series.iter().map(move |(_, f)| f(p)))
        .fold(1.0, f64::max)
        * 1.1;
    let sx = |x: f64| m + (x - xmin) / (xmax - xmin).max(1e-9) * (w - 2.0 * m);
    let sy = |y: f64| h - m - y / ymax * (h - 2.0 * m);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">offered load</text>\n\
         <text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">latency (ms)</text>\n",
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 15.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=4 {
        let y = ymax * i as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.0}</text>\n",
            m - 5.0,
            sy(y) + 4.0
        ));
    }
    for x in &xs {
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x}</text>\n",
            sx(*x),
            h - m + 16.0
        ));
    }
    let mut setups: Vec<&str> = points.iter().map(|p| p.setup.as_str()).collect();
    setups.dedup();
    let mut k = 0;
    for setup in &setups {
        for (name, f) in &series {
            let pts: Vec<String> = points
                .iter()
                .filter(|p| p.setup == *setup)
                .map(|p| format!("{:.1},{:.1}", sx(p.load_value), sy(f(p))))
                .collect();
            let c = colors[k % colors.len()];
            s.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
                pts.join(" ")
            ));
            s.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{setup} {name}</text>\n",
                m + 10.0,
                m + 14.0 * k as f64
            ));
            k += 1;
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(p.mean, 50.5);
        assert_eq!(percentiles(vec![]).p99, 0.0);
    }

    #[test]
    fn goodput_counts_only_requests_within_the_slo() {
        let s = |ttft_ms: u64, e2e_ms: u64| Sample {
            ttft: Duration::from_millis(ttft_ms),
            e2e: Duration::from_millis(e2e_ms),
            output_tokens: 11,
            ..Default::default()
        };
        let slo = Slo {
            ttft_ms: 100.0,
            tpot_ms: 20.0,
        };
        // TPOT = (e2e - ttft) / 10.
        let p = summarize(
            "x",
            "c1".into(),
            1.0,
            &[s(50, 150), s(150, 250), s(50, 500)],
            Duration::from_secs(1),
            slo,
        );
        assert_eq!(p.goodput_requests_per_s, 1.0);
        assert_eq!(p.output_tokens_per_s, 33.0);
    }
}
