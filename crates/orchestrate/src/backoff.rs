//! Retry and polling schedules. Every wait in the flow goes through here, so every wait is
//! bounded (attempts or a deadline) and uses tokio time (tests run them on a paused clock).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Geometric delays: `first`, then ×`factor_percent`/100 each time, never above `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub first: Duration,
    pub factor_percent: u32,
    pub max: Duration,
}

impl Schedule {
    /// Waiting for EC2 to report a change (attachment, creation): it usually takes one to a
    /// few seconds, so look early, then settle at a few seconds between looks.
    pub const CLOUD_STATE: Schedule = Schedule {
        first: Duration::from_millis(100),
        factor_percent: 150,
        max: Duration::from_secs(3),
    };

    /// Waiting for the kernel device: local and cheap to look at.
    pub const DEVICE: Schedule = Schedule {
        first: Duration::from_millis(50),
        factor_percent: 150,
        max: Duration::from_secs(1),
    };

    /// The delay before look number `n` (0-based).
    pub fn delay(&self, n: u32) -> Duration {
        let mut d = self.first;
        for _ in 0..n.min(64) {
            d = d * self.factor_percent / 100;
            if d >= self.max {
                return self.max;
            }
        }
        d.min(self.max)
    }
}

/// What a poll saw: done, or not yet (with a description for the timeout message).
pub enum Poll<T> {
    Ready(T),
    Pending(String),
}

/// The deadline passed; `last` is the last "not yet" description.
#[derive(Debug)]
pub struct TimedOut {
    pub waited: Duration,
    pub last: String,
    pub looks: u32,
}

/// Calls `look` until it is ready, an error, or `timeout` has passed (it always looks at
/// least once, and once more right at the deadline). A look still running at the deadline (a
/// request being retried) is abandoned, so the timeout is a real bound.
pub async fn poll<T, E, F, Fut>(
    schedule: Schedule,
    timeout: Duration,
    mut look: F,
) -> Result<Result<T, TimedOut>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut n = 0;
    let mut last = String::from("nothing seen yet");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // The first look gets its chance even with no time left; later ones only the rest.
        let budget = if n == 0 {
            remaining.max(LOOK_GRACE)
        } else {
            remaining
        };
        last = match tokio::time::timeout(budget, look()).await {
            Ok(result) => match result? {
                Poll::Ready(v) => return Ok(Ok(v)),
                Poll::Pending(why) => why,
            },
            Err(_) => format!("{last} (then a request was still unanswered at the deadline)"),
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(Err(TimedOut {
                waited: now - start,
                last,
                looks: n + 1,
            }));
        }
        let delay = schedule.delay(n).min(deadline - now);
        n += 1;
        tokio::time::sleep(delay).await;
    }
}

/// How long the first look may take even when the timeout is shorter.
const LOOK_GRACE: Duration = Duration::from_secs(30);

/// Retries for throttling and transient failures, on top of the SDK's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// Stop retrying one request once this much time has passed since its first attempt.
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(8),
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// Retries as long as `total` allows (the "command timeout"): for boots that should ride
    /// out an API brown-out rather than fail.
    pub fn within(total: Duration) -> Self {
        Self {
            max_attempts: u32::MAX,
            deadline: Some(total),
            ..Self::default()
        }
    }

    /// Exponential backoff with "equal jitter": half fixed, half spread by `seed`, so agents
    /// throttled together do not come back together.
    pub fn delay(&self, attempt: u32, seed: u64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        let half = exp / 2;
        let spread = mix(seed ^ u64::from(attempt)) % (half.as_millis() as u64 + 1);
        half + Duration::from_millis(spread)
    }
}

/// Runs `call` until it succeeds, fails with a non-retryable error, or the attempts are spent.
pub async fn retry<T, F, Fut>(
    policy: RetryPolicy,
    operation: &str,
    seed: u64,
    mut call: F,
) -> Result<T, cps_provider::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, cps_provider::Error>>,
{
    let mut attempt: u32 = 0;
    let started = Instant::now();
    loop {
        match call().await {
            Err(e)
                if e.is_retryable()
                    && attempt.saturating_add(1) < policy.max_attempts
                    && policy
                        .deadline
                        .is_none_or(|d| started.elapsed() + policy.delay(attempt, seed) < d) =>
            {
                let delay = policy.delay(attempt, seed);
                tracing::warn!(operation, attempt = attempt + 1, retry_in_ms = delay.as_millis() as u64, error = %e, "retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A cheap, well-mixed 64-bit hash (splitmix64 finalizer).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stable 64-bit value for a string (FNV-1a, then mixed).
pub fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cps_provider::Error;

    #[test]
    fn schedule_grows_and_caps() {
        let s = Schedule::CLOUD_STATE;
        assert_eq!(s.delay(0), Duration::from_millis(100));
        assert_eq!(s.delay(1), Duration::from_millis(150));
        assert!(s.delay(5) > s.delay(4));
        assert_eq!(s.delay(40), Duration::from_secs(3));
        assert_eq!(s.delay(u32::MAX), Duration::from_secs(3));
    }

    #[test]
    fn retry_delays_are_jittered_and_bounded() {
        let p = RetryPolicy::default();
        for attempt in 0..20 {
            let d = p.delay(attempt, 7);
            assert!(d <= p.cap, "{d:?}");
            assert!(d >= p.base.min(p.cap) / 2);
        }
        assert_ne!(
            p.delay(3, 1),
            p.delay(3, 2),
            "different agents wait differently"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn poll_times_out_with_the_last_reason() {
        let start = Instant::now();
        let out: Result<Result<(), TimedOut>, ()> =
            poll(Schedule::CLOUD_STATE, Duration::from_secs(10), || async {
                Ok(Poll::Pending("still attaching".into()))
            })
            .await;
        let timed_out = out.unwrap().unwrap_err();
        assert_eq!(timed_out.last, "still attaching");
        assert!(start.elapsed() >= Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(11));
        // 100ms growing to 3s over 10s: a handful of looks, not hundreds.
        assert!((5..=12).contains(&timed_out.looks), "{}", timed_out.looks);
    }

    #[tokio::test(start_paused = true)]
    async fn a_look_that_hangs_does_not_stretch_the_timeout() {
        let start = Instant::now();
        let mut looks = 0;
        let out: Result<Result<(), TimedOut>, ()> =
            poll(Schedule::CLOUD_STATE, Duration::from_secs(10), || {
                looks += 1;
                let hang = looks > 1;
                async move {
                    if hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Ok(Poll::Pending("attaching".into()))
                }
            })
            .await;
        let timed_out = out.unwrap().unwrap_err();
        assert!(
            start.elapsed() <= Duration::from_secs(11),
            "{:?}",
            start.elapsed()
        );
        assert!(
            timed_out.last.contains("attaching") && timed_out.last.contains("unanswered"),
            "{}",
            timed_out.last
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_within_a_command_timeout_stops_at_the_deadline() {
        let start = Instant::now();
        let mut calls = 0u32;
        let out: Result<(), Error> =
            retry(RetryPolicy::within(Duration::from_secs(60)), "X", 3, || {
                calls += 1;
                async {
                    Err(Error::Throttled {
                        operation: "X",
                        message: "slow down".into(),
                    })
                }
            })
            .await;
        assert!(out.is_err());
        assert!(
            start.elapsed() <= Duration::from_secs(60),
            "{:?}",
            start.elapsed()
        );
        assert!(
            calls > 6,
            "kept going past the attempt count of the default policy: {calls}"
        );
    }

    /// Missing credentials and an unusable endpoint are not retried, even with a command
    /// timeout of minutes: the first call's error is the answer.
    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried_within_a_command_timeout() {
        let permanent = [
            Error::Credentials {
                operation: "X",
                message: "no credentials found in chain".into(),
            },
            Error::Endpoint {
                operation: "X",
                message: "endpoint is not a valid URI".into(),
            },
            Error::Unauthorized {
                operation: "X",
                message: "AccessDenied".into(),
            },
        ];
        for error in permanent {
            let mut calls = 0;
            let out: Result<(), Error> = retry(
                RetryPolicy::within(Duration::from_secs(600)),
                "X",
                1,
                || {
                    calls += 1;
                    let e = error.clone();
                    async move { Err(e) }
                },
            )
            .await;
            assert_eq!(out.unwrap_err(), error);
            assert_eq!(calls, 1, "{error}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_non_retryable_errors_and_spent_attempts() {
        let mut calls = 0;
        let out: Result<(), Error> = retry(RetryPolicy::default(), "X", 1, || {
            calls += 1;
            async {
                Err(Error::Throttled {
                    operation: "X",
                    message: "slow down".into(),
                })
            }
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls, RetryPolicy::default().max_attempts);

        let mut calls = 0;
        let out: Result<(), Error> = retry(RetryPolicy::default(), "X", 1, || {
            calls += 1;
            async {
                Err(Error::Api {
                    operation: "X",
                    code: None,
                    message: "no".into(),
                })
            }
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls, 1);
    }
}
