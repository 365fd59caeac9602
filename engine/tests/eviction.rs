//! Eviction on the real model: scored prefills sum real attention probabilities, a budget that keeps everything
//! changes nothing, and a sequence whose prompt was evicted continues at the prompt's true positions.

mod common;

use tandem_engine::backend::cpu::CpuBackend;
use tandem_engine::kv::BlockId;
use tandem_engine::kv::evict::{self, Eviction, SNAPKV_WINDOW};
use tandem_engine::sampling::log_sum_exp;
use tandem_engine::{Engine, EngineConfig, LogitsWanted, SeqId, StepItem};

fn engine(max_batch_tokens: usize) -> Engine<CpuBackend> {
    let (src, _) = common::open_model();
    let config = EngineConfig {
        num_blocks: 256,
        max_batch_tokens,
        ..Default::default()
    };
    Engine::new(CpuBackend::with_all_cores(), &src, config, |_, _| {}).unwrap()
}

fn prompt() -> Vec<u32> {
    let (_, tok) = common::open_model();
    let text = "The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clock, \
                and wrote in his log the weather, the ships that passed and the birds that rested on the rail. "
        .repeat(4);
    tok.encode(&text).unwrap()
}

/// Moves `seq`'s prompt K/V into a new sequence of `prompt` as `plan` compacts it.
fn move_evicted(
    e: &mut Engine<CpuBackend>,
    from: SeqId,
    prompt: &[u32],
    plan: &evict::KeepPlan,
) -> SeqId {
    let layers = e.kv_layout().layers;
    let per_layer: Vec<_> = (0..layers)
        .map(|l| e.compact_layer(from, plan, l).unwrap())
        .collect();
    let t = e.add_sequence_evicted(prompt, plan.kept).unwrap();
    for (l, blocks) in per_layer.iter().enumerate() {
        let data: Vec<(&[f32], &[f32])> = blocks.iter().map(|b| (&b.k[..], &b.v[..])).collect();
        // Refused before anything is written (the continuation below would show a stray write): a block that is
        // not this sequence's destination, and fewer data than blocks.
        let mut wrong = t.blocks.clone();
        wrong[0] = BlockId(u32::MAX);
        let e1 = e
            .write_transferred_blocks(t.seq, l, &wrong, &data)
            .unwrap_err();
        assert!(
            e1.to_string().contains("not a transfer destination"),
            "{e1}"
        );
        let e2 = e
            .write_transferred_blocks(t.seq, l, &t.blocks, &data[1..])
            .unwrap_err();
        assert!(e2.to_string().contains("blocks of data"), "{e2}");
        if t.blocks.len() > 1 {
            let mut twice = t.blocks.clone();
            twice[1] = twice[0];
            let e3 = e
                .write_transferred_blocks(t.seq, l, &twice, &data)
                .unwrap_err();
            assert!(e3.to_string().contains("named twice"), "{e3}");
        }
        // Odd layers block by block, even layers all at once: both must give the same sequence.
        if l % 2 == 1 {
            for (&dest, (k, v)) in t.blocks.iter().zip(&data) {
                e.write_transferred_block(t.seq, l, dest, k, v).unwrap();
            }
        } else {
            e.write_transferred_blocks(t.seq, l, &t.blocks, &data)
                .unwrap();
        }
    }
    e.complete_transfer(t.seq, false).unwrap();
    t.seq
}

/// Log-probabilities of every row of `cont` computed on top of `seq`.
fn continue_with(e: &mut Engine<CpuBackend>, seq: SeqId, cont: &[u32]) -> Vec<Vec<f32>> {
    for &t in cont {
        e.append_token(seq, t).unwrap();
    }
    let item = StepItem {
        seq,
        n_tokens: cont.len(),
        logits: LogitsWanted::All,
    };
    let rows = e.step(&[item]).unwrap().pop().unwrap();
    let vocab = e.model.config.vocab;
    rows.chunks_exact(vocab)
        .map(|r| {
            let lse = log_sum_exp(r);
            r.iter().map(|x| x - lse).collect()
        })
        .collect()
}

fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    let total: f64 = p
        .iter()
        .zip(q)
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| f64::from(x).exp() * f64::from(x - y))
                .sum::<f64>()
        })
        .sum();
    total / p.len() as f64
}

#[test]
fn scored_prefill_sums_one_per_query_row_and_head() {
    let p = prompt();
    let from = p.len() - SNAPKV_WINDOW;
    // Chunks of 64 put the window across two steps.
    let mut e = engine(64);
    let seq = e.add_sequence_scored(&p, from).unwrap();
    e.prefill(seq).unwrap();
    let s = e.attention_scores(seq).unwrap().unwrap().clone();
    let c = &e.model.config;
    let group = (c.heads / c.kv_heads) as f32;
    for layer in 0..c.layers {
        for h in 0..c.kv_heads {
            let sum: f32 = s.head(layer, h).iter().sum();
            let want = SNAPKV_WINDOW as f32 * group;
            assert!(
                (sum - want).abs() < 1e-2 * want,
                "layer {layer} head {h}: {sum} vs {want}"
            );
        }
    }
    // One step or several: the same sums.
    let mut one = engine(1024);
    let seq1 = one.add_sequence_scored(&p, from).unwrap();
    one.prefill(seq1).unwrap();
    let s1 = one.attention_scores(seq1).unwrap().unwrap();
    let worst = s
        .sums
        .iter()
        .zip(&s1.sums)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-3,
        "chunked and one-shot scores differ by {worst}"
    );
}

#[test]
fn evicted_sequences_continue_at_true_positions() {
    let p = prompt();
    let (ctx, cont) = p.split_at(p.len() - 24);
    let mut e = engine(512);
    let full = e.add_sequence(ctx).unwrap();
    e.prefill(full).unwrap();
    let reference = continue_with(&mut e, full, cont);
    // Only the context's K/V is moved: a fresh prefill of it, scored for h2o.
    e.remove_sequence(full).unwrap();
    e.reset_prefix_cache();
    let src = e.add_sequence_scored(ctx, 0).unwrap();
    e.prefill(src).unwrap();
    let scores = e.attention_scores(src).unwrap().cloned();
    let c = e.model.config.clone();
    let bs = e.kv_layout().block_size;
    let plan_for = |spec: &str| {
        evict::plan(
            &Eviction::parse(spec).unwrap(),
            ctx.len(),
            bs,
            c.layers,
            c.kv_heads,
            scores.as_ref(),
        )
        .unwrap()
    };

    // Keeping everything through the evicted path reproduces the full run exactly.
    let all = plan_for("h2o:1.0");
    assert_eq!(all.kept, ctx.len());
    let seq = move_evicted(&mut e, src, ctx, &all);
    let same = continue_with(&mut e, seq, cont);
    e.remove_sequence(seq).unwrap();
    assert!(mean_kl(&reference, &same) < 1e-6);

    // Dropping a quarter: the continuation runs at positions ctx.len().., which beats the same cache with the
    // positions restarting right after the kept tokens (what a slot-indexed position would give).
    let plan = plan_for("streaming:0.75");
    let seq = move_evicted(&mut e, src, ctx, &plan);
    let evicted = continue_with(&mut e, seq, cont);
    e.remove_sequence(seq).unwrap();
    let shifted_prompt = &ctx[ctx.len() - plan.kept..];
    let seq = move_evicted(&mut e, src, shifted_prompt, &plan);
    let shifted = continue_with(&mut e, seq, cont);
    e.remove_sequence(seq).unwrap();
    let (good, bad) = (mean_kl(&reference, &evicted), mean_kl(&reference, &shifted));
    assert!(
        good > 0.0 && good < bad,
        "KL at true positions {good}, at shifted positions {bad}"
    );
    assert!(good < 0.5, "streaming:0.75 drifted too far: KL {good}");
    e.remove_sequence(src).unwrap();
    assert_eq!(
        e.pool_stats().free + e.pool_stats().cached,
        256,
        "every block came back"
    );
}
