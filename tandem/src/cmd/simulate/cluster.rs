//! The simulated cluster: a discrete-event loop in which the router's real index and policy route requests to
//! simulated prefill and decode workers. Each worker has a real engine `BlockPool` (so prefix reuse, LRU eviction
//! and KV events are the engine's own) and a clock from the fitted [`LatencyModel`]; only the model math is absent.
//!
//! A request: the router hashes its prompt, reads the index and every worker's load, and asks the policy. The
//! decode worker reserves blocks for prompt and answer (waiting if it has no room). With a prefill worker, the
//! prompt queues there (FIFO, one at a time), its KV then crosses the link layer by layer (the transfer overlaps
//! the prefill; the last layer's share is paid after it) and the first token is out; without one the decode worker
//! prefills it between its decode steps (prefills first). Decode steps advance every running sequence by one token.
//! Workers' KV events reach the index after `event_delay_s`. The oracle hit rate is, at each decision, the longest
//! prefix held by any worker at that instant (a count of holders per hash, updated with no delay).

use super::latency::LatencyModel;
use super::workload::Workload;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;
use tandem_engine::kv::{BlockHash, BlockId, BlockPool, HashSeed, KvEvent, block_hashes};
use tandem_router::index::{PrefixIndex, WorkerId};
use tandem_router::policy::{Candidate, Load, Policy, RequestShape};

/// The cluster's shape and links.
#[derive(Debug, Clone, Copy)]
pub struct ClusterSpec {
    pub decode_workers: usize,
    pub prefill_workers: usize,
    pub decode_kv_blocks: usize,
    pub prefill_kv_blocks: usize,
    pub block_size: usize,
    pub kv_bytes_per_token: f64,
    pub link_bytes_per_s: f64,
    /// Layers the transfer is pipelined over.
    pub layers: usize,
    pub event_delay_s: f64,
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ttft_s: Vec<f64>,
    pub tpot_s: Vec<f64>,
    pub prompt_tokens: u64,
    /// Prompt tokens the computing worker found cached.
    pub hit_tokens: u64,
    /// Prompt tokens the best-placed worker held at decision time.
    pub oracle_tokens: u64,
    pub decode_busy_s: Vec<f64>,
    pub prefill_busy_s: Vec<f64>,
    pub decision_ns: Vec<u64>,
    pub local_prefills: usize,
    pub kv_bytes_moved: f64,
    pub makespan_s: f64,
    pub index_errors: usize,
    pub index_memory_bytes: usize,
    pub index_entries: usize,
}

struct Flight {
    req: usize,
    hashes: Vec<BlockHash>,
    decode: usize,
    prefill: Option<usize>,
    /// The decode worker's blocks for prompt and answer, and how many leading ones it had cached.
    blocks: Vec<BlockId>,
    decode_hit: usize,
    arrival_s: f64,
    first_token_s: f64,
    generated: usize,
}

#[derive(Default)]
struct DecodeWorker {
    waiting: VecDeque<usize>,
    local: VecDeque<usize>,
    local_tokens: u64,
    running: Vec<usize>,
    awaiting_kv: u32,
    busy: bool,
    busy_s: f64,
}

#[derive(Default)]
struct PrefillWorker {
    queue: VecDeque<usize>,
    queued_tokens: u64,
    busy: bool,
    busy_s: f64,
}

enum Ev {
    Arrive(usize),
    PrefillDone {
        worker: usize,
        flight: usize,
        blocks: Vec<BlockId>,
        hit: usize,
        new: usize,
    },
    KvArrived(usize),
    LocalPrefillDone {
        worker: usize,
        flight: usize,
    },
    StepDone(usize),
    Events(WorkerId, Vec<KvEvent>),
}

struct Scheduled {
    at_ns: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at_ns, self.seq) == (o.at_ns, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at_ns, self.seq).cmp(&(o.at_ns, o.seq))
    }
}

struct Sim<'a> {
    spec: ClusterSpec,
    lat: &'a LatencyModel,
    work: &'a Workload,
    policy: Policy,
    index: PrefixIndex,
    pools: Vec<BlockPool>,
    decode: Vec<DecodeWorker>,
    prefill: Vec<PrefillWorker>,
    flights: Vec<Flight>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    now: f64,
    seq: u64,
    out: Outcome,
    dec_cands: Vec<Candidate>,
    pre_cands: Vec<Candidate>,
    matches: Vec<(WorkerId, usize)>,
    /// How many workers hold each hash, current (no event delay): the oracle's view.
    truth: HashMap<BlockHash, u32>,
}

/// Runs the workload to completion through the cluster under `policy`.
pub fn run(spec: ClusterSpec, lat: &LatencyModel, work: &Workload, policy: Policy) -> Outcome {
    let (nd, np) = (spec.decode_workers, spec.prefill_workers);
    let mut index = PrefixIndex::new();
    let mut pools = Vec::with_capacity(nd + np);
    for w in 0..nd + np {
        let cap = if w < nd {
            spec.decode_kv_blocks
        } else {
            spec.prefill_kv_blocks
        };
        pools.push(BlockPool::new(cap));
        index.add_worker(WorkerId(w as u32), cap);
        index
            .load_snapshot(WorkerId(w as u32), 0, [])
            .expect("an empty snapshot fits");
    }
    let cand = |w: usize| Candidate {
        id: WorkerId(w as u32),
        healthy: true,
        cached_blocks: 0,
        load: Load::default(),
    };
    let mut sim = Sim {
        spec,
        lat,
        work,
        policy,
        index,
        pools,
        decode: (0..nd).map(|_| DecodeWorker::default()).collect(),
        prefill: (0..np).map(|_| PrefillWorker::default()).collect(),
        flights: Vec::with_capacity(work.requests.len()),
        queue: BinaryHeap::new(),
        now: 0.0,
        seq: 0,
        out: Outcome::default(),
        dec_cands: (0..nd).map(cand).collect(),
        pre_cands: (nd..nd + np).map(cand).collect(),
        matches: Vec::new(),
        truth: HashMap::new(),
    };
    for &r in &work.openers {
        sim.at(work.requests[r].arrival_s, Ev::Arrive(r));
    }
    while let Some(Reverse(s)) = sim.queue.pop() {
        sim.now = s.at_ns as f64 * 1e-9;
        sim.handle(s.ev);
    }
    let stats = sim.index.stats();
    let mut out = sim.out;
    out.makespan_s = sim.now;
    out.decode_busy_s = sim.decode.iter().map(|w| w.busy_s).collect();
    out.prefill_busy_s = sim.prefill.iter().map(|w| w.busy_s).collect();
    out.index_memory_bytes = stats.memory_bytes;
    out.index_entries = stats.entries;
    out
}

impl Sim<'_> {
    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at_ns: (t.max(self.now) * 1e9) as u64,
            seq: self.seq,
            ev,
        }));
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(r) => self.arrive(r),
            Ev::PrefillDone {
                worker,
                flight,
                blocks,
                hit,
                new,
            } => {
                self.prefill[worker].queued_tokens -= new as u64;
                self.prefill_done(worker, flight, blocks, hit)
            }
            Ev::KvArrived(f) => {
                let d = self.flights[f].decode;
                self.decode[d].awaiting_kv -= 1;
                self.commit_prompt(f);
                self.first_token(f);
                self.kick_decode(d);
            }
            Ev::LocalPrefillDone { worker, flight } => {
                let fl = &self.flights[flight];
                let lacked = self.work.requests[fl.req]
                    .prompt
                    .len()
                    .saturating_sub(fl.decode_hit * self.spec.block_size);
                self.decode[worker].local_tokens -= lacked as u64;
                self.decode[worker].busy = false;
                self.commit_prompt(flight);
                self.first_token(flight);
                self.kick_decode(worker);
            }
            Ev::StepDone(w) => self.step_done(w),
            Ev::Events(w, events) => {
                for e in &events {
                    if self.index.apply(w, e).is_err() {
                        self.out.index_errors += 1;
                    }
                }
            }
        }
    }

    /// Routes a request (the timed part: hashing, index lookup, loads, policy) and admits it on its decode worker.
    fn arrive(&mut self, r: usize) {
        let req = &self.work.requests[r];
        let bs = self.spec.block_size;
        let nd = self.spec.decode_workers;
        let t0 = Instant::now();
        let hashes = block_hashes(HashSeed::default(), &req.prompt, bs);
        self.index.matches(&hashes, &mut self.matches);
        for (c, w) in self.dec_cands.iter_mut().zip(&self.decode) {
            c.cached_blocks = 0;
            c.load = Load {
                running: w.running.len() as u32,
                waiting: w.waiting.len() as u32 + w.local.len() as u32 + w.awaiting_kv,
                queued_prefill_tokens: w.local_tokens,
                kv_blocks_free: 0,
            };
        }
        for (c, w) in self.pre_cands.iter_mut().zip(&self.prefill) {
            c.cached_blocks = 0;
            c.load = Load {
                running: w.busy as u32,
                waiting: w.queue.len() as u32,
                queued_prefill_tokens: w.queued_tokens,
                kv_blocks_free: u32::MAX,
            };
        }
        for (c, pool) in self.dec_cands.iter_mut().zip(&self.pools) {
            c.load.kv_blocks_free = pool.available() as u32;
        }
        for &(w, n) in &self.matches {
            let w = w.0 as usize;
            if w < nd {
                self.dec_cands[w].cached_blocks = n;
            } else {
                self.pre_cands[w - nd].cached_blocks = n;
            }
        }
        let shape = RequestShape {
            prompt_tokens: req.prompt.len(),
            max_tokens: req.output.len(),
            block_size: bs,
            kv_bytes_per_token: self.spec.kv_bytes_per_token,
        };
        let decision = self
            .policy
            .decide(&shape, &self.dec_cands, &self.pre_cands)
            .expect("simulated workers are always healthy");
        self.out.decision_ns.push(t0.elapsed().as_nanos() as u64);
        // The oracle: the longest prefix any worker holds right now (workers hold whole prefixes, see the index).
        let best = hashes
            .iter()
            .take_while(|h| self.truth.get(h).is_some_and(|&n| n > 0))
            .count();
        self.out.oracle_tokens += cached_tokens(best, bs, req.prompt.len());
        self.out.prompt_tokens += req.prompt.len() as u64;
        let f = self.flights.len();
        self.flights.push(Flight {
            req: r,
            hashes,
            decode: decision.decode,
            prefill: decision.prefill,
            blocks: Vec::new(),
            decode_hit: 0,
            arrival_s: self.now,
            first_token_s: f64::NAN,
            generated: 0,
        });
        self.decode[decision.decode].waiting.push_back(f);
        self.admit(decision.decode);
    }

    /// Admits waiting requests in order while the decode worker has room for them.
    fn admit(&mut self, d: usize) {
        while let Some(&f) = self.decode[d].waiting.front() {
            let req = &self.work.requests[self.flights[f].req];
            let need = (req.prompt.len() + req.output.len()).div_ceil(self.spec.block_size);
            let pool = &mut self.pools[d];
            let mut blocks = pool.acquire_prefix(&self.flights[f].hashes);
            let hit = blocks.len();
            match pool.allocate(need.saturating_sub(hit)) {
                Ok(more) => blocks.extend(more),
                Err(_) => {
                    pool.release(&blocks);
                    break;
                }
            }
            self.decode[d].waiting.pop_front();
            let fl = &mut self.flights[f];
            fl.blocks = blocks;
            fl.decode_hit = hit;
            let prompt = req.prompt.len();
            match fl.prefill {
                Some(p) => {
                    self.decode[d].awaiting_kv += 1;
                    let w = &mut self.prefill[p];
                    w.queue.push_back(f);
                    w.queued_tokens += prompt as u64;
                    self.kick_prefill(p);
                }
                None => {
                    self.out.local_prefills += 1;
                    self.out.hit_tokens += cached_tokens(hit, self.spec.block_size, prompt);
                    let w = &mut self.decode[d];
                    w.local.push_back(f);
                    w.local_tokens += prompt.saturating_sub(hit * self.spec.block_size) as u64;
                    self.kick_decode(d);
                }
            }
            self.publish(d);
        }
    }

    fn kick_prefill(&mut self, p: usize) {
        if self.prefill[p].busy {
            return;
        }
        let Some(f) = self.prefill[p].queue.pop_front() else {
            return;
        };
        let nd = self.spec.decode_workers;
        let bs = self.spec.block_size;
        let prompt = self.work.requests[self.flights[f].req].prompt.len();
        let pool = &mut self.pools[nd + p];
        let mut blocks = pool.acquire_prefix(&self.flights[f].hashes);
        let hit = blocks.len();
        // A prompt that does not fit is computed without being cached.
        if let Ok(more) = pool.allocate(prompt.div_ceil(bs).saturating_sub(hit)) {
            blocks.extend(more);
        }
        self.out.hit_tokens += cached_tokens(hit, bs, prompt);
        let new = prompt.saturating_sub(hit * bs).max(1);
        let dt = self.lat.prefill_s(new, prompt - new);
        let w = &mut self.prefill[p];
        // Queued tokens count the running prompt until it is done, now at what it really computes.
        w.queued_tokens = w.queued_tokens - prompt as u64 + new as u64;
        w.busy = true;
        w.busy_s += dt;
        // The decode worker lacks everything past its own cached prefix; layer l ships once layer l is computed.
        let fl = &self.flights[f];
        let bytes = prompt.saturating_sub(fl.decode_hit * bs) as f64 * self.spec.kv_bytes_per_token;
        self.out.kv_bytes_moved += bytes;
        let transfer = bytes / self.spec.link_bytes_per_s;
        let done = self.now + dt;
        let arrive = done.max(self.now + transfer) + transfer / self.spec.layers.max(1) as f64;
        self.at(
            done,
            Ev::PrefillDone {
                worker: p,
                flight: f,
                blocks,
                hit,
                new,
            },
        );
        self.at(arrive, Ev::KvArrived(f));
        self.publish(nd + p);
    }

    fn prefill_done(&mut self, p: usize, f: usize, blocks: Vec<BlockId>, hit: usize) {
        let nd = self.spec.decode_workers;
        let pool = &mut self.pools[nd + p];
        if blocks.len() > hit {
            for (id, h) in blocks.iter().zip(&self.flights[f].hashes).skip(hit) {
                pool.commit(*id, *h);
            }
        }
        pool.release(&blocks);
        self.prefill[p].busy = false;
        self.publish(nd + p);
        self.kick_prefill(p);
    }

    /// The prompt's complete blocks are now on the decode worker: name them in its cache.
    fn commit_prompt(&mut self, f: usize) {
        let fl = &self.flights[f];
        let pool = &mut self.pools[fl.decode];
        for (id, h) in fl.blocks.iter().zip(&fl.hashes).skip(fl.decode_hit) {
            pool.commit(*id, *h);
        }
        let d = fl.decode;
        self.publish(d);
    }

    fn first_token(&mut self, f: usize) {
        let fl = &mut self.flights[f];
        fl.first_token_s = self.now;
        fl.generated = 1;
        self.out.ttft_s.push(self.now - fl.arrival_s);
        let d = fl.decode;
        if self.work.requests[fl.req].output.len() <= 1 {
            self.finish(f);
        } else {
            self.decode[d].running.push(f);
        }
    }

    /// Starts the decode worker's next operation: a waiting local prefill first, else a decode step.
    fn kick_decode(&mut self, d: usize) {
        if self.decode[d].busy {
            return;
        }
        let bs = self.spec.block_size;
        if let Some(f) = self.decode[d].local.pop_front() {
            let fl = &self.flights[f];
            let prompt = self.work.requests[fl.req].prompt.len();
            let new = prompt.saturating_sub(fl.decode_hit * bs).max(1);
            let dt = self.lat.prefill_s(new, prompt - new);
            let w = &mut self.decode[d];
            w.busy = true;
            w.busy_s += dt;
            self.at(
                self.now + dt,
                Ev::LocalPrefillDone {
                    worker: d,
                    flight: f,
                },
            );
            return;
        }
        if self.decode[d].running.is_empty() {
            return;
        }
        let context: usize = self.decode[d]
            .running
            .iter()
            .map(|&f| {
                self.work.requests[self.flights[f].req].prompt.len() + self.flights[f].generated
            })
            .sum();
        let dt = self.lat.decode_s(self.decode[d].running.len(), context);
        let w = &mut self.decode[d];
        w.busy = true;
        w.busy_s += dt;
        self.at(self.now + dt, Ev::StepDone(d));
    }

    fn step_done(&mut self, d: usize) {
        self.decode[d].busy = false;
        let running = std::mem::take(&mut self.decode[d].running);
        let mut still = Vec::with_capacity(running.len());
        for f in running {
            self.flights[f].generated += 1;
            if self.flights[f].generated >= self.work.requests[self.flights[f].req].output.len() {
                self.finish(f);
            } else {
                still.push(f);
            }
        }
        self.decode[d].running.extend(still);
        self.admit(d);
        self.kick_decode(d);
    }

    /// Records the request, caches its prompt and answer on the decode worker, frees its blocks and sends the
    /// session's next turn after its think time.
    fn finish(&mut self, f: usize) {
        let fl = &self.flights[f];
        let req = &self.work.requests[fl.req];
        let out_len = req.output.len();
        if out_len > 1 {
            self.out
                .tpot_s
                .push((self.now - fl.first_token_s) / (out_len - 1) as f64);
        }
        let mut all = req.prompt.clone();
        all.extend(&req.output);
        let hashes = block_hashes(HashSeed::default(), &all, self.spec.block_size);
        let d = fl.decode;
        let pool = &mut self.pools[d];
        for (id, h) in fl.blocks.iter().zip(&hashes) {
            pool.commit(*id, *h);
        }
        pool.release(&fl.blocks);
        if let Some(next) = req.next_turn {
            self.at(self.now + req.think_s, Ev::Arrive(next));
        }
        self.flights[f].blocks = Vec::new();
        self.publish(d);
        self.admit(d);
    }

    /// Sends the worker's pending KV events to the index, `event_delay_s` from now; the oracle's count of holders
    /// per hash changes at once.
    fn publish(&mut self, w: usize) {
        let events = self.pools[w].drain_events();
        for e in &events {
            match e {
                KvEvent::Stored { hashes, .. } => {
                    for h in hashes {
                        *self.truth.entry(*h).or_default() += 1;
                    }
                }
                KvEvent::Removed { hashes, .. } => {
                    for h in hashes {
                        if let Some(n) = self.truth.get_mut(h) {
                            *n -= 1;
                            if *n == 0 {
                                self.truth.remove(h);
                            }
                        }
                    }
                }
            }
        }
        if !events.is_empty() {
            self.at(
                self.now + self.spec.event_delay_s,
                Ev::Events(WorkerId(w as u32), events),
            );
        }
    }
}

fn cached_tokens(blocks: usize, bs: usize, prompt: usize) -> u64 {
    (blocks * bs).min(prompt) as u64
}
