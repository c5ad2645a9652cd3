//! Generated races on the in-memory lock table: owners with their own clocks (skewed), lease
//! lengths and pauses take, renew, write and release one key while replies get lost and
//! requests throttled, and some holders stop for longer than their lease (a crash) and come
//! back still believing they hold it. Every reply is checked against what the others saw
//! before it was sent (virtual time, paused clock):
//!
//! - tokens strictly increase: a take answered before another take was sent has the smaller
//!   token, and no two takes share one;
//! - fencing: a write (renew, record, release) by a lease succeeds only if no take with a
//!   larger token was answered before it was sent — a stale holder is always refused — and a
//!   refusal is never wrong (the item is not that lease's when the refusal arrives);
//! - an expired lease is always takeable, a live one never: a take refused while nothing
//!   changed during the request saw another owner whose lease still ran by the taker's clock,
//!   and a take that replaced the item read just before it did not replace a live lease;
//! - a new holder gets the record some earlier holder wrote.
//!
//! Each case is replayable by its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cps_provider::lock::{from_unix_millis, unix_millis};
use cps_provider::memory::{Fault, GET_ITEM, MemoryCloud, Timing, UPDATE_ITEM};
use cps_provider::{Acquired, Error, Lease, LockItem, LockService};
use tokio::time::Instant;

const KEY: &str = "node-3";

/// splitmix64: small, seeded, replayable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

#[derive(Default, Debug)]
struct Stats {
    held: u32,
    takeovers: u32,
    stale_refused: u32,
    busy_judged: u32,
    takes_judged: u32,
    records_written: u32,
}

/// What every owner saw, in the order the replies arrived.
struct Checker {
    seed: u64,
    seq: u64,
    /// Takes answered: (reply sequence number, owner, token).
    held: Vec<(u64, String, u64)>,
    /// Every record value sent (its write may have been lost or refused).
    sent_records: BTreeSet<String>,
    /// Tokens whose release was sent (it may have taken effect unanswered).
    sent_releases: BTreeSet<u64>,
    stats: Stats,
}

impl Checker {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn largest_token_answered_before(&self, sent: u64) -> Option<u64> {
        self.held
            .iter()
            .filter(|(at, _, _)| *at < sent)
            .map(|(_, _, t)| *t)
            .max()
    }

    fn on_held(&mut self, sent: u64, lease: &Lease, record: &BTreeMap<String, String>) {
        let seed = self.seed;
        if let Some(value) = record.get("by") {
            assert!(
                self.sent_records.contains(value),
                "seed {seed}: record {value} was never written"
            );
        }
        let earlier = self.largest_token_answered_before(sent).unwrap_or(0);
        assert!(
            lease.token > earlier,
            "seed {seed}: token {} after {earlier} was answered",
            lease.token
        );
        assert!(
            self.held.iter().all(|(_, _, t)| *t != lease.token),
            "seed {seed}: token {} given twice",
            lease.token
        );
        if self.held.last().is_some_and(|(_, o, _)| *o != lease.owner) {
            self.stats.takeovers += 1;
        }
        self.stats.held += 1;
        let at = self.tick();
        self.held.push((at, lease.owner.clone(), lease.token));
    }

    /// A renew, record or release by `lease`, sent at `sent`, answered `ok` or `LockLost`;
    /// `now` is the item as stored when the answer arrived.
    fn on_write(&mut self, sent: u64, lease: &Lease, ok: bool, now: Option<LockItem>) {
        let seed = self.seed;
        let newer = self
            .largest_token_answered_before(sent)
            .is_some_and(|t| t > lease.token);
        if ok {
            assert!(
                !newer,
                "seed {seed}: a write by stale token {} succeeded",
                lease.token
            );
        } else {
            let still_ours = now
                .is_some_and(|i| i.owner.as_ref() == Some(&lease.owner) && i.token == lease.token);
            assert!(!still_ours, "seed {seed}: {lease:?} refused while it holds");
            if newer {
                self.stats.stale_refused += 1;
            }
        }
        self.tick();
    }

    /// A take answered `Held`: when no other take came between the item read `before` and
    /// it, the item it replaced was `before`'s holder, whose lease only grew since — unless
    /// it was released. A live lease of another owner, by the taker's clock, was not takeable.
    fn judge_take(&mut self, lease: &Lease, now: SystemTime, before: Option<LockItem>) {
        let Some(b) = before.filter(|b| b.token + 1 == lease.token) else {
            return;
        };
        if self.sent_releases.contains(&b.token) {
            return;
        }
        let live = b.owner.as_deref().is_some_and(|o| o != lease.owner)
            && unix_millis(b.expires) >= unix_millis(now);
        assert!(
            !live,
            "seed {}: {} took a live lease at {}: {b:?}",
            self.seed,
            lease.owner,
            unix_millis(now)
        );
        self.stats.takes_judged += 1;
    }

    /// A refused take: judged only when the item did not change during the request.
    fn on_busy(&mut self, owner: &str, now: SystemTime, before: Option<LockItem>, seen: LockItem) {
        if before.as_ref() == Some(&seen) {
            let live = seen.owner.as_deref().is_some_and(|o| o != owner)
                && unix_millis(seen.expires) >= unix_millis(now);
            assert!(
                live,
                "seed {}: {owner} refused at {} by {seen:?}",
                self.seed,
                unix_millis(now)
            );
            self.stats.busy_judged += 1;
        }
        self.tick();
    }
}

/// One owner: its clock runs `skew` ahead of (or behind) true time; fixed lease length.
struct Owner {
    name: String,
    skew_ms: i64,
    lease_for: Duration,
    rng: Rng,
    lease: Option<Lease>,
    writes: u32,
}

impl Owner {
    fn now(&self, start: (Instant, SystemTime)) -> SystemTime {
        let t = start.1 + start.0.elapsed();
        let skew = Duration::from_millis(self.skew_ms.unsigned_abs());
        if self.skew_ms >= 0 {
            t + skew
        } else {
            t - skew
        }
    }
}

fn lost_reply() -> Fault {
    Fault::fail(
        UPDATE_ITEM,
        Error::Transient {
            operation: UPDATE_ITEM,
            message: "reply lost (injected)".into(),
        },
    )
    .after_effect()
}

async fn take(cloud: &MemoryCloud, me: &mut Owner, checker: &Mutex<Checker>, now: SystemTime) {
    let before = cloud.with(|w| w.lock_item(KEY));
    let sent = checker.lock().unwrap().tick();
    let result = cloud.acquire(KEY, &me.name, me.lease_for, now).await;
    let mut c = checker.lock().unwrap();
    match result {
        Ok(Acquired::Held(lease, record)) => {
            c.judge_take(&lease, now, before);
            c.on_held(sent, &lease, &record);
            me.lease = Some(lease);
        }
        Ok(Acquired::Busy(item)) => c.on_busy(&me.name, now, before, item),
        Err(e) => assert!(e.is_retryable(), "seed {}: {e}", c.seed),
    }
}

async fn write(cloud: &MemoryCloud, me: &mut Owner, checker: &Mutex<Checker>, now: SystemTime) {
    let Some(lease) = me.lease.clone() else {
        return;
    };
    let sent = checker.lock().unwrap().tick();
    let record_write = me.rng.below(7);
    let result = match record_write {
        0..=2 => {
            me.writes += 1;
            let value = format!("{}#{}", me.name, me.writes);
            checker.lock().unwrap().sent_records.insert(value.clone());
            let record = BTreeMap::from([("by".to_owned(), value)]);
            cloud.write_record(&lease, &record).await
        }
        3..=5 => cloud
            .renew(&lease, me.lease_for, now)
            .await
            .map(|l| me.lease = Some(l)),
        _ => {
            checker.lock().unwrap().sent_releases.insert(lease.token);
            cloud.release(&lease).await.map(|()| me.lease = None)
        }
    };
    let stored = cloud.with(|w| w.lock_item(KEY));
    let mut c = checker.lock().unwrap();
    match result {
        Ok(()) => {
            c.stats.records_written += u32::from(record_write <= 2);
            c.on_write(sent, &lease, true, stored.clone());
        }
        // A stale lease is kept: the owner tries it again later and must be refused again.
        Err(Error::LockLost { .. }) => c.on_write(sent, &lease, false, stored.clone()),
        Err(e) => assert!(e.is_retryable(), "seed {}: {e}", c.seed),
    }
    if matches!(stored, Some(ref i) if i.token == lease.token && i.owner.is_none()) {
        me.lease = None; // released (maybe through a lost reply)
    }
}

async fn run_owner(
    cloud: MemoryCloud,
    mut me: Owner,
    checker: Arc<Mutex<Checker>>,
    start: (Instant, SystemTime),
    steps: u32,
) {
    for _ in 0..steps {
        tokio::time::sleep(me.rng.millis(0, 150)).await;
        match me.rng.below(40) {
            // A holder that stops for longer than its lease, then resumes as if nothing
            // happened.
            0 => tokio::time::sleep(me.lease_for + me.rng.millis(0, 3000)).await,
            1 => cloud.inject(Fault::throttle(UPDATE_ITEM, 1)),
            2 => cloud.inject(lost_reply()),
            3 => cloud.inject(Fault::throttle(GET_ITEM, 1)),
            _ => {}
        }
        let now = me.now(start);
        if me.lease.is_none() || me.rng.below(12) == 0 {
            take(&cloud, &mut me, &checker, now).await;
        } else {
            write(&cloud, &mut me, &checker, now).await;
        }
    }
}

async fn run_case(seed: u64) -> Stats {
    let mut rng = Rng(seed);
    let cloud = MemoryCloud::new(Timing {
        latency: rng.millis(0, 40),
        ..Timing::default()
    });
    let checker = Arc::new(Mutex::new(Checker {
        seed,
        seq: 0,
        held: Vec::new(),
        sent_records: BTreeSet::new(),
        sent_releases: BTreeSet::new(),
        stats: Stats::default(),
    }));
    let start = (Instant::now(), from_unix_millis(1_800_000_000_000));
    let mut owners = tokio::task::JoinSet::new();
    for n in 0..2 + rng.below(5) {
        let me = Owner {
            name: format!("agent-{n}"),
            skew_ms: rng.below(601) as i64 - 300,
            lease_for: rng.millis(200, 1500),
            rng: Rng(rng.next()),
            lease: None,
            writes: 0,
        };
        owners.spawn(run_owner(cloud.clone(), me, checker.clone(), start, 60));
    }
    while let Some(done) = owners.join_next().await {
        done.expect("an owner panicked");
    }
    finish(&cloud, &checker, start).await;
    std::mem::take(&mut checker.lock().unwrap().stats)
}

/// After everyone stopped: one more owner takes over once every lease has run out, with the
/// next token and the record as left (faults nobody met yet may still strike: bounded retries).
async fn finish(cloud: &MemoryCloud, checker: &Mutex<Checker>, start: (Instant, SystemTime)) {
    let seed = checker.lock().unwrap().seed;
    for _ in 0..10 {
        let left = cloud.with(|w| w.lock_item(KEY)).expect("the key was taken");
        let later = left.expires.max(start.1 + start.0.elapsed()) + Duration::from_millis(1);
        match cloud
            .acquire(KEY, "late", Duration::from_secs(1), later)
            .await
        {
            Ok(Acquired::Held(lease, record)) => {
                assert_eq!(lease.token, left.token + 1, "seed {seed}");
                assert_eq!(record, left.record, "seed {seed}");
                return;
            }
            Err(e) if e.is_retryable() => continue,
            other => panic!("seed {seed}: an expired lease was not takeable: {other:?}"),
        }
    }
    panic!("seed {seed}: the last take kept failing");
}

#[tokio::test(start_paused = true)]
async fn racing_owners_with_skewed_clocks_crashes_and_lost_replies_keep_the_invariants() {
    let mut total = Stats::default();
    for seed in 0..60 {
        let s = run_case(seed).await;
        total.held += s.held;
        total.takeovers += s.takeovers;
        total.stale_refused += s.stale_refused;
        total.busy_judged += s.busy_judged;
        total.takes_judged += s.takes_judged;
        total.records_written += s.records_written;
    }
    // The generated cases must reach every situation the invariants are about.
    assert!(total.takeovers > 100, "{total:?}");
    assert!(total.stale_refused > 20, "{total:?}");
    assert!(total.busy_judged > 100, "{total:?}");
    assert!(total.held > 500, "{total:?}");
    assert!(total.takes_judged > 300, "{total:?}");
    assert!(total.records_written > 300, "{total:?}");
    println!("{total:?}");
}
