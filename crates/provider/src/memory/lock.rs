//! The lock table in the in-memory cloud, with DynamoDB's semantics: each call is one
//! conditional write (`UpdateItem`) or one consistent read (`GetItem`), decided atomically,
//! counted, and subject to injected faults (a fault after the effect is a lost reply: the
//! write happened, the caller does not know).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{MemoryCloud, World};
use crate::lock::{lease_end, unix_millis};
use crate::{Acquired, Error, Lease, LockItem, LockService};

pub const UPDATE_ITEM: &str = "UpdateItem";
pub const GET_ITEM: &str = "GetItem";

impl World {
    /// The lock item of `key` as stored (inspection; not a request).
    pub fn lock_item(&self, key: &str) -> Option<LockItem> {
        self.locks.get(key).cloned()
    }

    /// The take's condition and update: free, expired by `now`, or already `owner`'s → the
    /// item after the take; otherwise `None` (ConditionalCheckFailed), nothing changed.
    fn take_lock(
        &mut self,
        key: &str,
        owner: &str,
        until: SystemTime,
        now: SystemTime,
    ) -> Option<LockItem> {
        let item = self
            .locks
            .entry(key.to_owned())
            .or_insert_with(|| LockItem {
                key: key.to_owned(),
                owner: None,
                token: 0,
                expires: UNIX_EPOCH,
                record: BTreeMap::new(),
            });
        let takeable = match &item.owner {
            None => true,
            Some(holder) => holder == owner || unix_millis(item.expires) < unix_millis(now),
        };
        if !takeable {
            return None;
        }
        item.owner = Some(owner.to_owned());
        item.expires = until;
        item.token += 1;
        Some(item.clone())
    }

    /// Applies `change` if `lease` still holds its key (owner and token), else `LockLost`.
    fn change_held(
        &mut self,
        lease: &Lease,
        change: impl FnOnce(&mut LockItem),
    ) -> Result<LockItem, Error> {
        match self.locks.get_mut(&lease.key) {
            Some(item)
                if item.owner.as_ref() == Some(&lease.owner) && item.token == lease.token =>
            {
                change(item);
                Ok(item.clone())
            }
            found => Err(Error::LockLost {
                key: lease.key.clone(),
                message: format!(
                    "ConditionalCheckFailedException: the lease of {} with token {} no longer \
                     holds it ({})",
                    lease.owner,
                    lease.token,
                    match found {
                        None => "the key was never taken".to_owned(),
                        Some(item) => format!(
                            "holder {}, token {}",
                            item.owner.as_deref().unwrap_or("none"),
                            item.token
                        ),
                    }
                ),
            }),
        }
    }
}

#[async_trait]
impl LockService for MemoryCloud {
    async fn acquire(
        &self,
        key: &str,
        owner: &str,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Acquired, Error> {
        let until = lease_end(now, lease_for);
        let taken = self
            .request(UPDATE_ITEM, |w| Ok(w.take_lock(key, owner, until, now)))
            .await?;
        crate::lock::after_take(key, owner, "", taken, self.read(key)).await
    }

    async fn renew(
        &self,
        lease: &Lease,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Lease, Error> {
        let until = lease_end(now, lease_for);
        self.request(UPDATE_ITEM, |w| {
            w.change_held(lease, |item| item.expires = until)
        })
        .await?;
        Ok(Lease {
            expires: until,
            ..lease.clone()
        })
    }

    async fn write_record(
        &self,
        lease: &Lease,
        record: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.request(UPDATE_ITEM, |w| {
            w.change_held(lease, |item| item.record = record.clone())
        })
        .await
        .map(drop)
    }

    async fn read(&self, key: &str) -> Result<Option<LockItem>, Error> {
        self.request(GET_ITEM, |w| Ok(w.lock_item(key))).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.request(UPDATE_ITEM, |w| {
            w.change_held(lease, |item| {
                item.owner = None;
                item.expires = UNIX_EPOCH;
            })
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests;
