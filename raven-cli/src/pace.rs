//! Timing rules shared by the hub and the agent, each in one place and on
//! tokio's clock (so tests prove them with paused, virtual time):
//!
//! - [`Backoff`]: exponential backoff with jitter between retries;
//! - [`FailureStreak`]: a repeating failure warned about once per streak,
//!   the repeats at debug, its end at info (log-once);
//! - [`Heartbeat`]: a stream's heartbeat ticker and its silence rule — a
//!   peer not heard from for three intervals is gone;
//! - [`Contact`]: when a peer was last heard from, shared between the task
//!   that hears it and those that ask whether it is still there.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How a [`Backoff`] spreads its delays below the exponential cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, cap]`: retries of many clients spread the most.
    Full,
    /// Uniform in `[cap / 2, cap)`: never much shorter than the cap.
    Half,
}

/// Exponential backoff: the cap after the n-th consecutive failure is
/// `min · 2^(n-1)`, at most `max`; the delay is the cap scaled by
/// [`Jitter`].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: Jitter,
    failures: u32,
}

impl Backoff {
    /// Full jitter between `min` and `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            jitter: Jitter::Full,
            failures: 0,
        }
    }

    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The cap after `failures` consecutive failures (at least one).
    pub fn cap(&self, failures: u32) -> Duration {
        self.min
            .saturating_mul(1 << failures.saturating_sub(1).min(20))
            .min(self.max)
    }

    /// A delay after `failures` consecutive failures, jittered.
    pub fn delay(&self, failures: u32) -> Duration {
        let cap = self.cap(failures);
        match self.jitter {
            Jitter::Full => cap.mul_f64(rand::random::<f64>()),
            Jitter::Half => cap.mul_f64(0.5 + rand::random::<f64>() / 2.0),
        }
    }

    /// Counts one more failure; the delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay(self.failures)
    }

    /// After a success: the next failure waits the shortest again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// What a failure or a success means for the log, so that a failure
/// repeating every second is one warning, not a warning a second.
#[derive(Debug, Clone, Default)]
pub struct FailureStreak {
    failures: u32,
    last: Option<Instant>,
    forget_after: Option<Duration>,
}

impl FailureStreak {
    /// A streak that lasts until the next success.
    pub fn new() -> Self {
        Self::default()
    }

    /// A streak that also ends after `quiet` without a failure (the next
    /// failure is warned about again).
    pub fn forgetting_after(quiet: Duration) -> Self {
        Self {
            forget_after: Some(quiet),
            ..Self::default()
        }
    }

    /// Counts a failure; true when it starts a streak (warn about it; log
    /// the repeats at debug).
    pub fn failed(&mut self) -> bool {
        let now = Instant::now();
        if let (Some(last), Some(quiet)) = (self.last, self.forget_after)
            && now.duration_since(last) > quiet
        {
            self.failures = 0;
        }
        self.last = Some(now);
        self.failures = self.failures.saturating_add(1);
        self.failures == 1
    }

    /// The failures so far in this streak.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Ends the streak; the failures it had (0: there was none to report
    /// the end of).
    pub fn succeeded(&mut self) -> u32 {
        self.last = None;
        std::mem::take(&mut self.failures)
    }
}

/// A stream's heartbeat: beats every `every`, and a peer silent for more
/// than three intervals is gone.
#[derive(Debug)]
pub struct Heartbeat {
    every: Duration,
    ticker: Interval,
    last_heard: Instant,
}

/// The peer sent nothing for this long (more than three intervals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silent(pub Duration);

impl Heartbeat {
    /// Beats at once, then every `every`; a stalled loop delays the next
    /// beat rather than sending a burst.
    pub fn new(every: Duration) -> Self {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            every,
            ticker,
            last_heard: Instant::now(),
        }
    }

    pub fn every(&self) -> Duration {
        self.every
    }

    /// The peer sent something.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Waits for the next beat: `Ok` to send a heartbeat, [`Silent`] when
    /// the peer has not been heard from for more than three intervals.
    pub async fn beat(&mut self) -> Result<(), Silent> {
        self.ticker.tick().await;
        let silent = self.last_heard.elapsed();
        if silent > self.every * 3 {
            return Err(Silent(silent));
        }
        Ok(())
    }
}

/// When a peer was last heard from, on tokio's clock (not the wall
/// clock, which can jump), shared by cloning.
#[derive(Debug, Clone, Default)]
pub struct Contact(Arc<Mutex<Option<Instant>>>);

impl Contact {
    /// The peer sent something now.
    pub fn heard(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// How long ago the peer was last heard from; `None`: never.
    pub fn since(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|at| at.elapsed())
    }

    /// The peer was heard from less than `limit` ago.
    pub fn heard_within(&self, limit: Duration) -> bool {
        self.since().is_some_and(|d| d < limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_backoff_doubles_from_min_up_to_max_and_jitters_below_the_cap() {
        let b = Backoff::new(100 * Duration::from_millis(1), S);
        let caps: Vec<u128> = (1..=6).map(|n| b.cap(n).as_millis()).collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.cap(u32::MAX), S, "no overflow");
        let half = b.clone().with_jitter(Jitter::Half);
        // At the cap (the 10th failure): full jitter spreads over [0, cap],
        // half jitter over [cap/2, cap).
        let fulls: Vec<Duration> = (0..200).map(|_| b.delay(10)).collect();
        let halves: Vec<Duration> = (0..200).map(|_| half.delay(10)).collect();
        assert!(fulls.iter().all(|d| *d <= S));
        assert!(
            fulls.iter().any(|d| *d < S / 2),
            "full jitter goes below half"
        );
        assert!(halves.iter().all(|d| *d >= S / 2 && *d < S));
        let mut counted = b.clone();
        let ramp: Vec<Duration> = (0..10).map(|_| counted.next_delay()).collect();
        assert!(
            ramp.iter().zip(1..).all(|(d, n)| *d <= b.cap(n)),
            "{ramp:?}"
        );
        counted.reset();
        assert!(
            counted.next_delay() <= Duration::from_millis(100),
            "reset starts over"
        );
    }

    #[test]
    fn a_failure_streak_warns_once_until_a_success_ends_it() {
        let mut s = FailureStreak::new();
        assert_eq!(s.succeeded(), 0, "no streak to end");
        assert!(s.failed());
        assert!(!s.failed());
        assert!(!s.failed());
        assert_eq!(s.failures(), 3);
        assert_eq!(s.succeeded(), 3);
        assert!(s.failed(), "a new streak is warned about again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_streak_with_a_quiet_period_ends_after_it_without_a_success() {
        let quiet = 120 * S;
        let mut s = FailureStreak::forgetting_after(quiet);
        assert!(s.failed());
        tokio::time::sleep(quiet).await;
        assert!(!s.failed(), "exactly the quiet period is still the streak");
        tokio::time::sleep(quiet + S).await;
        assert!(s.failed(), "longer than the quiet period starts a new one");
        assert_eq!(s.failures(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_contact_is_recent_for_strictly_less_than_its_limit() {
        let c = Contact::default();
        let limit = 3 * S;
        assert!(!c.heard_within(limit), "never heard");
        c.clone().heard();
        assert!(c.heard_within(limit), "a clone shares what was heard");
        tokio::time::sleep(limit - Duration::from_millis(1)).await;
        assert!(c.heard_within(limit));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!c.heard_within(limit), "exactly the limit is too long");
        assert_eq!(c.since(), Some(limit));
    }

    /// The virtual time of every beat until the heartbeat reports silence.
    async fn beats_until_silent(hb: &mut Heartbeat, hear_at: &[u64]) -> (Vec<u64>, Silent) {
        let t0 = Instant::now();
        let mut beats = Vec::new();
        loop {
            let r = hb.beat().await;
            let at = (Instant::now() - t0).as_secs();
            if let Err(silent) = r {
                return (beats, silent);
            }
            beats.push(at);
            if hear_at.contains(&at) {
                hb.heard();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_gone_at_the_first_beat_after_three_intervals() {
        let mut hb = Heartbeat::new(10 * S);
        let (beats, silent) = beats_until_silent(&mut hb, &[]).await;
        // 30 s of silence is not yet "more than three intervals".
        assert_eq!(beats, [0, 10, 20, 30]);
        assert_eq!(silent, Silent(40 * S));
    }

    #[tokio::test(start_paused = true)]
    async fn hearing_from_the_peer_restarts_the_silence_count() {
        let mut hb = Heartbeat::new(10 * S);
        let (beats, silent) = beats_until_silent(&mut hb, &[20, 50]).await;
        assert_eq!(beats, [0, 10, 20, 30, 40, 50, 60, 70, 80]);
        assert_eq!(silent, Silent(40 * S), "silent since 50 s, gone at 90 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_loop_delays_the_next_beat_instead_of_bursting() {
        let mut hb = Heartbeat::new(10 * S);
        let t0 = Instant::now();
        hb.beat().await.expect("first beat");
        hb.heard();
        // The loop was busy for 25 s (three ticks due), hearing the peer
        // at the end.
        tokio::time::sleep(25 * S).await;
        hb.heard();
        hb.beat().await.expect("late beat");
        assert_eq!(Instant::now() - t0, 25 * S, "the late beat at once");
        hb.beat().await.expect("next beat");
        assert_eq!(Instant::now() - t0, 35 * S, "one interval later, no burst");
    }
}
