//! CUDA graphs for decode steps. A decode step of a given shape (rows, logit rows, head, context bucket) launches the same few
//! hundred kernels with the same arguments every time: only the values in the plan buffer change, and kernels read
//! those from fixed addresses. So the backend records a shape's step once (stream capture) on its second
//! occurrence (the first, run eagerly, sizes every buffer), and replays the recording from then on: one launch per
//! step instead of one per kernel, which is what bounds a batch-1 decode step on a fast GPU.
//!
//! A recording is only valid while the buffers it names exist: any buffer that grows drops every recording
//! ([`Graphs::invalidate`]). Steps with a layer observer or attention tallies are never recorded (the engine says so
//! through [`crate::backend::BatchLayout::capturable`]).

use cudarc::driver::{CudaGraph, CudaStream, sys};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::model::Head;

/// What a recording depends on besides buffer addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub rows: usize,
    pub logit_rows: usize,
    /// What the step's head hands back (a sampling head records the sampling kernel, a logits head a copy).
    pub head: Head,
    /// The longest context's bucket (it sets decode attention's split count).
    pub ctx_bucket: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kernels run as they are issued.
    Eager,
    /// Kernels are recorded, not run, until the step's head ends the capture.
    Capturing(Shape),
    /// The recording of this shape runs at the step's head; issued kernels are skipped.
    Replaying(Shape),
}

/// Recordings kept at most; a serving worker meets many batch sizes, and each recording holds device resources.
/// The least recently replayed one goes first.
const MAX_RECORDED: usize = 64;

/// A recorded step. CUDA graph objects are not internally synchronized but may be used from any thread when calls
/// are serialized; every use here is under the backend's `Graphs` mutex.
struct Recorded {
    graph: CudaGraph,
    /// The step count at its last replay (or recording).
    used: u64,
}

// SAFETY: see above; the handles are only touched with the owning mutex held.
unsafe impl Send for Recorded {}

pub struct Graphs {
    pub enabled: bool,
    pub mode: Mode,
    /// Shapes run eagerly once (so every buffer is already large enough for them).
    seen: HashSet<Shape>,
    ready: HashMap<Shape, Recorded>,
    /// Steps begun, to order recordings by last use.
    steps: u64,
    /// Shapes whose capture failed; they stay eager.
    refused: HashSet<Shape>,
    /// A buffer grew while capturing: the recording names memory that is gone once this step is done.
    spoiled: bool,
}

impl Graphs {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            mode: Mode::Eager,
            seen: HashSet::new(),
            ready: HashMap::new(),
            steps: 0,
            refused: HashSet::new(),
            spoiled: false,
        }
    }

    /// Chooses how the step of `shape` runs (`None`: not capturable); starts a capture when it is the shape's
    /// second time.
    pub fn begin(&mut self, stream: &Arc<CudaStream>, shape: Option<Shape>) -> Result<(), String> {
        self.abort(stream);
        self.steps += 1;
        let Some(shape) = shape.filter(|s| self.enabled && !self.refused.contains(s)) else {
            return Ok(());
        };
        if let Some(r) = self.ready.get_mut(&shape) {
            r.used = self.steps;
            self.mode = Mode::Replaying(shape);
        } else if !self.seen.insert(shape) {
            if let Err(e) =
                stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            {
                self.refused.insert(shape);
                return Err(format!("starting a CUDA graph capture: {e}"));
            }
            self.spoiled = false;
            self.mode = Mode::Capturing(shape);
        }
        Ok(())
    }

    /// Whether issued kernels should be skipped (a recording will run them).
    pub fn replaying(&self) -> bool {
        matches!(self.mode, Mode::Replaying(_))
    }

    /// Runs the step's recorded work, if any: ends a capture and launches it, or launches the ready recording.
    pub fn finish(&mut self, stream: &Arc<CudaStream>) -> Result<(), String> {
        match std::mem::replace(&mut self.mode, Mode::Eager) {
            Mode::Eager => Ok(()),
            Mode::Replaying(shape) => self.ready[&shape]
                .graph
                .launch()
                .map_err(|e| format!("replaying a CUDA graph: {e}")),
            Mode::Capturing(shape) => {
                let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                let graph = match graph {
                    Ok(Some(g)) => g,
                    Ok(None) => {
                        self.refused.insert(shape);
                        return Err("a CUDA graph capture recorded nothing".into());
                    }
                    Err(e) => {
                        self.refused.insert(shape);
                        return Err(format!("ending a CUDA graph capture: {e}"));
                    }
                };
                graph
                    .launch()
                    .map_err(|e| format!("launching a CUDA graph: {e}"))?;
                if !self.spoiled {
                    if self.ready.len() >= MAX_RECORDED {
                        let oldest = self
                            .ready
                            .iter()
                            .min_by_key(|(_, r)| r.used)
                            .map(|(s, _)| *s);
                        if let Some(oldest) = oldest {
                            self.ready.remove(&oldest);
                            // Recorded again if it comes back often enough to be seen twice.
                            self.seen.remove(&oldest);
                        }
                    }
                    let used = self.steps;
                    self.ready.insert(shape, Recorded { graph, used });
                }
                Ok(())
            }
        }
    }

    /// Ends a step that stopped before its head: a capture in progress is discarded.
    pub fn abort(&mut self, stream: &Arc<CudaStream>) {
        if let Mode::Capturing(shape) = std::mem::replace(&mut self.mode, Mode::Eager) {
            let _ = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            self.refused.insert(shape);
        }
        self.mode = Mode::Eager;
    }

    /// A buffer was reallocated: every recording names freed memory.
    pub fn invalidate(&mut self) {
        self.ready.clear();
        if matches!(self.mode, Mode::Capturing(_)) {
            self.spoiled = true;
        }
    }

    /// Recordings ready to replay.
    pub fn recorded(&self) -> usize {
        self.ready.len()
    }
}
