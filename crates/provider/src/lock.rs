//! A lock with a lease and a fencing token, kept in a coordination service (DynamoDB on AWS):
//! what decides which of several agents, racing in several zones, moves a node's volume.
//!
//! One item per key holds the last holder (maybe expired), its lease's end, the fencing token
//! and the protocol's record. Every change is one conditional write, so at most one holder's
//! writes succeed at a time: a take requires the item to be free, expired by the taker's clock,
//! or already the taker's, and raises the token by one; every later write requires the owner
//! and the token it was taken with. A holder whose lease expired and was taken over is refused
//! (`Error::LockLost`) on its next write, whatever its clock says.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::Error;

/// A held lock: `token` is the fencing token, strictly increasing per key across all holders
/// ever. `expires` is by the holder's clock, in whole milliseconds (as stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub owner: String,
    pub token: u64,
    pub expires: SystemTime,
}

impl Lease {
    /// How long the lease still runs by the clock reading `now` (zero once it has ended).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires.duration_since(now).unwrap_or_default()
    }
}

/// The lock's item as stored: its last holder (maybe expired; `None` once released), and the
/// protocol's record. `expires` is the Unix epoch when no one holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockItem {
    pub key: String,
    pub owner: Option<String>,
    pub token: u64,
    pub expires: SystemTime,
    pub record: BTreeMap<String, String>,
}

impl LockItem {
    /// The owner whose lease still runs at `now` (by the reader's clock), if any.
    pub fn holder_at(&self, now: SystemTime) -> Option<&str> {
        self.owner
            .as_deref()
            .filter(|_| unix_millis(self.expires) >= unix_millis(now))
    }
}

/// The outcome of [`LockService::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Taken: the lease, and the record left by earlier holders (empty the first time).
    Held(Lease, BTreeMap<String, String>),
    /// Someone else's lease still runs: the item as read right after the refusal (it may be
    /// free again already; try later).
    Busy(LockItem),
}

/// Locks with a lease and a fencing token (see the module's documentation).
///
/// Lease times are compared with the caller's clock: the service has none. Callers keep a
/// margin for clock skew (docs/ARCHITECTURE.md, "The relocation lock").
#[async_trait]
pub trait LockService: Send + Sync {
    /// Takes `key` for `owner` for `lease_for` if no one holds it, or the holder's lease has
    /// expired by `now` (the caller's clock), or `owner` already holds it; the token goes up by
    /// one on every take. One conditional write (UpdateItem, ReturnValues ALL_NEW), plus a
    /// read when it is busy, to report the holder.
    async fn acquire(
        &self,
        key: &str,
        owner: &str,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Acquired, Error>;

    /// Extends a held lease to `now + lease_for`; [`Error::LockLost`] when the item's owner or
    /// token are no longer this lease's (it expired and was taken over, or was released).
    async fn renew(
        &self,
        lease: &Lease,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Lease, Error>;

    /// Replaces the protocol's record (the whole map), only while `lease` still holds (owner
    /// and token); [`Error::LockLost`] otherwise.
    async fn write_record(
        &self,
        lease: &Lease,
        record: &BTreeMap<String, String>,
    ) -> Result<(), Error>;

    /// The item (a consistent read); `None` when the key was never taken.
    async fn read(&self, key: &str) -> Result<Option<LockItem>, Error>;

    /// Lets go (owner and token condition): clears owner and expiry, keeps the token and the
    /// record (a later holder resumes from it). [`Error::LockLost`] if no longer held.
    async fn release(&self, lease: &Lease) -> Result<(), Error>;
}

/// What a take comes to: the item it wrote (`Some`: held), or — refused — the item read after
/// it (`in_table` names the table for the message). Shared by every [`LockService`].
pub async fn after_take(
    key: &str,
    owner: &str,
    in_table: &str,
    taken: Option<LockItem>,
    read: impl std::future::Future<Output = Result<Option<LockItem>, Error>>,
) -> Result<Acquired, Error> {
    if let Some(item) = taken {
        let lease = Lease {
            key: key.to_owned(),
            owner: owner.to_owned(),
            token: item.token,
            expires: item.expires,
        };
        return Ok(Acquired::Held(lease, item.record));
    }
    match read.await? {
        Some(item) => Ok(Acquired::Busy(item)),
        // Refused, and gone by the time of the read: only an operator deletes items.
        None => Err(Error::Transient {
            operation: "GetItem",
            message: format!("lock {key}{in_table} was refused, then its item was gone; try again"),
        }),
    }
}

/// A time as whole milliseconds since the Unix epoch, as lease ends are stored (0 before it).
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The time `millis` after the Unix epoch.
pub fn from_unix_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// `now + lease_for`, in stored precision.
pub fn lease_end(now: SystemTime, lease_for: Duration) -> SystemTime {
    let for_ms = u64::try_from(lease_for.as_millis()).unwrap_or(u64::MAX);
    from_unix_millis(unix_millis(now).saturating_add(for_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_kept_in_whole_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(unix_millis(t), 1_700_000_000_123);
        assert_eq!(
            lease_end(t, Duration::from_millis(1500)),
            from_unix_millis(1_700_000_001_623)
        );
        assert_eq!(unix_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn the_holder_is_the_owner_until_its_lease_has_passed() {
        let item = LockItem {
            key: "k".into(),
            owner: Some("a".into()),
            token: 3,
            expires: from_unix_millis(1000),
            record: BTreeMap::new(),
        };
        assert_eq!(item.holder_at(from_unix_millis(1000)), Some("a"));
        assert_eq!(item.holder_at(from_unix_millis(1001)), None);
        let released = LockItem {
            owner: None,
            ..item
        };
        assert_eq!(released.holder_at(UNIX_EPOCH), None);
    }
}
