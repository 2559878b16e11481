//! How the hub's memory goes back to the system after a connect storm.
//!
//! Measured (heaptrack on the hub of the fan-out bench, 1,000 gateways × 10
//! nodes, 1,000 tunnel candidates connecting at once): the heap peaks at
//! ≈ 247 MB during the storm — ≈ 116 KB per agent of it Update pieces queued
//! in HTTP/2 send buffers while the agents decode their 650 KB first sync —
//! and most of that is freed once every agent has synced. glibc keeps freed
//! memory inside its arenas (one per thread that ever allocated, up to 8 per
//! core), so the hub's RSS stayed at the storm's peak: 290 KB per agent
//! against ≈ 100 KB live.
//!
//! Since then the hub serves HTTP/2 with hyper's builder and bounds each
//! stream's send queue to 64 KB (`grpc::conn::MAX_SEND_BUF`), so the storm
//! leaves less behind. Live after sync (heaptrack, 2,000 agents) ≈ 64 KB
//! per agent, ≈ 57 KB of it per-connection buffers of h2, tonic, rustls
//! and tokio (see BENCHMARKS.md, "Hub memory live after sync").
//!
//! Two settings, glibc only (other C libraries are left alone):
//! - [`limit_arenas`] at start: at most one arena per core (at least two),
//!   unless the operator set `MALLOC_ARENA_MAX` — fewer arenas, less memory
//!   stranded in arenas a thread no longer uses (−25 % RSS measured with 2).
//! - [`spawn_trimmer`]: once a burst of new streams has finished its initial
//!   syncs (no admission permit taken), one `malloc_trim(0)` on the blocking
//!   pool hands the free pages of every arena back (`madvise(DONTNEED)`):
//!   looked at every [`TRIM_CHECK`] (the storm's memory goes back within a
//!   quarter second of its end, not up to 5 s later), done at most every
//!   [`TRIM_EVERY`] (a steady trickle of reconnects does not trim
//!   continuously). Not after a new revision: a trim walks
//!   the arenas under their locks while every session allocates for the
//!   fan-out, and what a recompile frees the next one reuses.

use std::time::Duration;

/// How often the trimmer looks whether a trim is due.
pub const TRIM_CHECK: Duration = Duration::from_millis(250);

/// The least time between two trims.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// At most one glibc malloc arena per core (at least 2), unless
/// `MALLOC_ARENA_MAX` is set. Call before the runtime starts its threads.
// The only unsafe code of the hub: two calls into glibc's malloc, which
// no safe crate wraps.
#[allow(unsafe_code)]
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes a malloc parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Returns the free memory of every malloc arena to the system (glibc; a
/// no-op elsewhere). Blocking: walks the arenas.
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When a trim is due: after new streams, once no initial sync is in
/// progress, at most every [`TRIM_EVERY`]; never twice for the same streams.
#[derive(Debug, Default)]
pub struct TrimWatch {
    seen: u64,
    last: Option<std::time::Instant>,
}

impl TrimWatch {
    /// `streams`: streams started so far; `syncing`: initial syncs in
    /// progress now.
    pub fn due(&mut self, streams: u64, syncing: bool, now: std::time::Instant) -> bool {
        if syncing
            || streams == self.seen
            || self
                .last
                .is_some_and(|l| now.duration_since(l) < TRIM_EVERY)
        {
            return false;
        }
        self.seen = streams;
        self.last = Some(now);
        true
    }
}

/// Runs [`trim`] whenever [`TrimWatch::due`] says so, until `shutdown`.
pub fn spawn_trimmer(shared: crate::grpc::sync::SyncShared) {
    tokio::spawn(async move {
        let mut watch = TrimWatch::default();
        let mut tick = tokio::time::interval(TRIM_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let syncing = shared.admission.available_permits() < shared.config.max_initial_syncs;
            if watch.due(shared.streams_started(), syncing, std::time::Instant::now()) {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_once_after_new_streams_have_synced_not_while_they_sync_nor_twice_in_five_seconds()
     {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = TrimWatch::default();
        assert!(!w.due(0, false, at(0)), "nothing happened yet");
        assert!(
            !w.due(500, true, at(250)),
            "initial syncs still in progress"
        );
        assert!(w.due(1000, false, at(500)), "the storm is over");
        assert!(!w.due(1000, false, at(750)), "already trimmed for it");
        assert!(!w.due(1001, true, at(1000)), "a reconnect still syncing");
        assert!(
            !w.due(1001, false, at(1250)),
            "it synced, but the last trim was 0.75 s ago"
        );
        assert!(
            w.due(1001, false, at(5500)),
            "five seconds after the last trim"
        );
    }

    #[test]
    fn trimming_keeps_live_allocations_intact() {
        let keep: Vec<Vec<u8>> = (0..1000u32).map(|i| vec![(i % 251) as u8; 4096]).collect();
        drop((0..1000).map(|_| vec![0u8; 4096]).collect::<Vec<_>>());
        trim();
        assert!(
            keep.iter()
                .enumerate()
                .all(|(i, v)| v.iter().all(|b| *b == (i % 251) as u8))
        );
    }
}
