//! The `tandem eval kv` report: derived numbers per codec, a table, and an SVG of perplexity change against bytes
//! per token (one labelled point per codec).

use super::CodecResult;
use std::fmt::Write;

/// Fills the derived fields; `results[0]` is the `none` reference.
pub fn finish(results: &mut [CodecResult], f16_bytes_per_token: f64) {
    let per_token = |r: &CodecResult| r.bytes as f64 / r.tokens_moved.max(1) as f64;
    let none_bytes = results.first().map_or(1.0, per_token);
    let none_ppl = results
        .first()
        .map_or(1.0, |r| (r.nll / r.scored.max(1) as f64).exp());
    for r in results.iter_mut() {
        r.bytes_per_token = per_token(r);
        r.ratio_vs_none = none_bytes / r.bytes_per_token.max(1e-9);
        r.ratio_vs_f16 = f16_bytes_per_token / r.bytes_per_token.max(1e-9);
        r.perplexity = (r.nll / r.scored.max(1) as f64).exp();
        r.perplexity_change_pct = (r.perplexity / none_ppl - 1.0) * 100.0;
        r.top1_agreement = r.agree as f64 / r.scored.max(1) as f64;
        r.mean_kl = r.kl / r.scored.max(1) as f64;
        let mb = r.raw_bytes as f64 / 1e6;
        r.encode_mb_s = mb / r.encode.as_secs_f64().max(1e-9);
        r.decode_mb_s = mb / r.decode.as_secs_f64().max(1e-9);
        r.lossless_bytes_per_token = r.lossless_bytes as f64 / r.tokens_moved.max(1) as f64;
        r.lossless_ratio_vs_f16 = f16_bytes_per_token / r.lossless_bytes_per_token.max(1e-9);
        r.lossless_compress_mb_s = mb / r.compress.as_secs_f64().max(1e-9);
        r.lossless_decompress_mb_s = mb / r.decompress.as_secs_f64().max(1e-9);
    }
}

pub fn table(results: &[CodecResult]) -> String {
    let mut s = format!(
        "{:<18} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8} {:>9} {:>10} {:>10} {:>8}\n",
        "codec",
        "B/token",
        "x none",
        "x f16",
        "ppl",
        "ppl %",
        "top-1",
        "mean KL",
        "enc MB/s",
        "dec MB/s",
        "passkey"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:<18} {:>10.1} {:>8.2} {:>8.2} {:>10.4} {:>+8.2} {:>8.4} {:>9.5} {:>10.0} {:>10.0} {:>8}",
            r.codec,
            r.bytes_per_token,
            r.ratio_vs_none,
            r.ratio_vs_f16,
            r.perplexity,
            r.perplexity_change_pct,
            r.top1_agreement,
            r.mean_kl,
            r.encode_mb_s,
            r.decode_mb_s,
            format!("{}/{}", r.passkey_found, r.passkey_total),
        );
    }
    let _ = writeln!(
        s,
        "\nwith the lossless stage (each layer's blocks entropy-coded as one chunk):\n{:<18} {:>10} {:>8} {:>12} {:>14}",
        "codec", "B/token", "x f16", "comp MB/s", "decomp MB/s"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:<18} {:>10.1} {:>8.2} {:>12.0} {:>14.0}",
            r.codec,
            r.lossless_bytes_per_token,
            r.lossless_ratio_vs_f16,
            r.lossless_compress_mb_s,
            r.lossless_decompress_mb_s,
        );
    }
    s
}

pub fn svg(results: &[CodecResult]) -> String {
    let (w, h, m) = (720.0, 420.0, 70.0);
    let xmax = results
        .iter()
        .map(|r| r.bytes_per_token)
        .fold(1.0, f64::max)
        * 1.1;
    let ymax = results
        .iter()
        .map(|r| r.perplexity_change_pct)
        .fold(0.5, f64::max)
        * 1.2;
    let ymin = results
        .iter()
        .map(|r| r.perplexity_change_pct)
        .fold(0.0, f64::min);
    let sx = |x: f64| m + x / xmax * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - ymin) / (ymax - ymin).max(1e-9) * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{xl}\" text-anchor=\"middle\">KV bytes per token moved</text>\n\
         <text x=\"18\" y=\"{cy}\" transform=\"rotate(-90 18 {cy})\" text-anchor=\"middle\">perplexity change (%)</text>\n\
         <text x=\"{cx}\" y=\"30\" text-anchor=\"middle\">KV codecs: quality against size</text>\n",
        b = h - m,
        r = w - m,
        cx = w / 2.0,
        xl = h - 25.0,
        cy = h / 2.0,
    );
    for i in 0..=4 {
        let (x, y) = (xmax * i as f64 / 4.0, ymin + (ymax - ymin) * i as f64 / 4.0);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x:.0}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>",
            sx(x),
            h - m + 16.0,
            m - 6.0,
            sy(y) + 4.0
        );
    }
    for r in results {
        let (x, y) = (sx(r.bytes_per_token), sy(r.perplexity_change_pct));
        let _ = writeln!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"#1f77b4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{} ({:.1}x)</text>",
            x + 8.0,
            y - 8.0,
            r.codec,
            r.ratio_vs_none
        );
    }
    s.push_str("</svg>\n");
    s
}
