//! Slot and pool claims with `relocation: snapshot`.
//!
//! A move retires its source only while it holds the source's lock and sees it attached to
//! nobody. So that nobody attaches the source in between, every attach of a slot or pool volume
//! (and every creation of a slot's volume) also happens under that lock — a slot's lock is named
//! after its identity tags like a node's, a pool volume's after its id — after looking at the
//! volume again once the lock is held. A lock another agent holds is skipped: it is claiming or
//! moving that volume. Only when nothing here is to be had (no free or leaving slot, no slot to
//! create; no free or leaving pool volume) is a free volume in another zone moved here.

use std::collections::BTreeMap;

use cps_provider::{Tags, Volume, VolumeState};
use tokio::time::Instant;

use super::slot::{slot_rank, volumes_by_slot};
use super::{Claim, ClaimTarget, Claimer, Next, free};
use crate::backoff::{self, hash_str, mix};
use crate::boot::relocate::{HANDOVER, Held, Mover, RETIRED_BY, SOURCE, Subject, with_origin};
use crate::error::Error;
use tracing::warn;

/// A volume of the subject that claims may take: carrying its tags, not retired, not a copy
/// waiting for its handover.
fn claimable(v: &Volume, subject: &Subject) -> bool {
    !v.tags.contains_key(RETIRED_BY)
        && !v.tags.contains_key(HANDOVER)
        && subject
            .tags
            .iter()
            .all(|(k, val)| v.tags.get(k) == Some(val))
}

impl Claimer<'_> {
    /// Slots whose one volume is free in another zone, by slot number.
    pub(super) fn slots_elsewhere<'v>(&self, volumes: &'v [Volume]) -> Vec<(u32, &'v Volume)> {
        let zone = &self.identity.availability_zone;
        volumes_by_slot(self.target, volumes)
            .into_iter()
            .filter_map(|(k, vs)| match vs.as_slice() {
                [v] if &v.availability_zone != zone && free(v) => Some((k, *v)),
                _ => None,
            })
            .collect()
    }

    /// While `relocation.grace` has not passed since a slot elsewhere first could be moved,
    /// a wait: a server booting in that slot's zone (its replacement) takes it there, and the
    /// slot does not cross zones and back.
    pub(super) fn slot_grace(&mut self, far: &[(u32, &Volume)]) -> Option<Next> {
        if far.is_empty() {
            return None;
        }
        let grace = self.config.relocation.grace;
        let since = *self.movable_since.get_or_insert_with(Instant::now);
        (since.elapsed() < grace).then(|| Next::Wait {
            what: format!(
                "no slot here; slots free in other zones are left to servers booting there for {} before one is moved",
                crate::config::duration_text(grace)
            ),
            timeout: grace + self.config.timeouts.attach,
        })
    }

    /// The slot to move here: by this instance's rank among its booting peers, so that peers
    /// in this zone move different slots; slots whose lock was busy are left out.
    pub(super) fn pick_slot_move<'v>(
        &self,
        far: &[(u32, &'v Volume)],
    ) -> Option<(u32, &'v Volume)> {
        let open: Vec<(u32, &Volume)> = far
            .iter()
            .copied()
            .filter(|(k, _)| !self.busy_slots.contains(k))
            .collect();
        if open.is_empty() {
            return None;
        }
        let ClaimTarget::Slot { peers, .. } = self.target else {
            return None;
        };
        let all: Vec<Volume> = far.iter().map(|(_, v)| (*v).clone()).collect();
        let rank = slot_rank(&volumes_by_slot(self.target, &all), peers, self.me);
        Some(open[rank % open.len()])
    }

    /// A free pool volume in another zone to move here, in this instance's own order; `None`
    /// without relocation.
    pub(super) fn pool_move(&self, elsewhere: &[&Volume]) -> Option<Volume> {
        self.mover?;
        elsewhere
            .iter()
            .filter(|v| free(v) && !self.busy_volumes.contains(&v.id))
            .min_by_key(|v| mix(self.seed ^ hash_str(&v.id)))
            .map(|v| (*v).clone())
    }

    /// The source of an unfinished pool move to finish before moving or making another
    /// volume; `None` without relocation.
    pub(super) fn pool_unfinished(&self) -> Option<String> {
        self.mover?;
        self.handovers
            .iter()
            .find(|s| !self.busy_volumes.contains(*s))
            .cloned()
    }

    /// The lock's subject of `next`; `None` for what needs no lock (a pool volume created,
    /// a wait).
    fn subject_of(&self, next: &Next) -> Option<Subject> {
        let (volume_id, slot) = match next {
            Next::Wait { .. } => return None,
            Next::Finish { source } => (Some(source.as_str()), None),
            Next::Attach { volume_id, slot } => (Some(volume_id.as_str()), *slot),
            Next::Create { slot, .. } => (None, *slot),
            Next::Move { source, slot } => (Some(source.id.as_str()), *slot),
        };
        match (self.target, slot, volume_id) {
            (ClaimTarget::Slot { tags, key, .. }, Some(k), _) => {
                let mut t: Tags = tags.clone();
                t.insert(key.clone(), k.to_string());
                Some(Subject::identified(self.config, &t))
            }
            (ClaimTarget::Pool { .. }, _, Some(id)) => Some(Subject::pool_volume(self.config, id)),
            _ => None,
        }
    }

    /// Does `next` under the lock of what it takes (see the module's comment).
    pub(super) async fn act_gated(
        &mut self,
        mover: &Mover<'_>,
        next: Next,
    ) -> Result<Option<Claim>, Error> {
        let Some(subject) = self.subject_of(&next) else {
            return self.act_plain(next).await;
        };
        let Some((mut held, record)) = mover.enter(&subject).await? else {
            // Someone else is claiming or moving it: take something else on the next look (not
            // a lost race: waits bound what follows, as a lock may be held for a snapshot).
            match &next {
                Next::Attach { slot: Some(k), .. }
                | Next::Create { slot: Some(k), .. }
                | Next::Move { slot: Some(k), .. } => {
                    self.busy_slots.insert(*k);
                }
                Next::Attach { volume_id, .. } => {
                    self.busy_volumes.insert(volume_id.clone());
                }
                Next::Move { source, .. } => {
                    self.busy_volumes.insert(source.id.clone());
                }
                Next::Finish { source } => {
                    self.busy_volumes.insert(source.clone());
                }
                _ => {}
            }
            return Ok(None);
        };
        let out = self
            .act_holding(mover, &mut held, &subject, record, next)
            .await;
        mover.leave(held).await;
        out
    }

    /// `next` with the subject's lock held: an unfinished move of it first; then a fresh look
    /// at what was chosen before the lock was taken (`Ok(None)`: changed; look again).
    async fn act_holding(
        &mut self,
        mover: &Mover<'_>,
        held: &mut Held,
        subject: &Subject,
        record: BTreeMap<String, String>,
        next: Next,
    ) -> Result<Option<Claim>, Error> {
        let slot = match &next {
            Next::Attach { slot, .. } | Next::Create { slot, .. } | Next::Move { slot, .. } => {
                *slot
            }
            Next::Wait { .. } | Next::Finish { .. } => None,
        };
        if record.contains_key(SOURCE) {
            let copy = match mover.resume(held, subject, &record).await {
                // The move was void (its source in use); the record is cleared: look again.
                Err(Error::MovedWhileInUse { original, copy }) => {
                    warn!(source = %original, copy = %copy, "an unfinished move's source is in use; the move is given up, its copy never claimed");
                    return Ok(None);
                }
                other => other?,
            };
            if copy.availability_zone != self.identity.availability_zone {
                // Finished for the zone it was going to; look again for one here.
                return Ok(None);
            }
            return self.attach_copy(mover, held, &copy, slot).await;
        }
        match next {
            Next::Finish { source } => {
                // The lock says nothing is unfinished: the copy waiting for its handover was
                // left by a move that went elsewhere. Leave it (and say so); never claim it.
                warn!(source = %source, "a copy of this volume waits for a handover no move will make; it is never claimed (delete it once checked)");
                self.busy_volumes.insert(source);
                Ok(None)
            }
            Next::Move { source, .. } => {
                let now = mover.volume(&source.id).await?;
                if !claimable(&now, subject) || !free(&now) {
                    return Ok(None);
                }
                let copy = mover.start(held, subject, &now).await?;
                self.attach_copy(mover, held, &copy, slot).await
            }
            Next::Attach { volume_id, .. } => {
                if !claimable(&mover.volume(&volume_id).await?, subject) {
                    return Ok(None);
                }
                mover.renewing(held, self.attach(&volume_id, slot)).await
            }
            Next::Create { tags, .. } => {
                // Nobody made the slot's volume (or handed a copy over) since the look.
                let (cloud, seed, policy) = (self.cloud_api, self.seed, self.policy);
                let there = backoff::retry(policy, "DescribeVolumes", seed, || {
                    cloud.volumes_tagged(&subject.tags)
                })
                .await
                .map_err(Error::cloud("listing volumes by tag"))?;
                // (One still being created is joined by the create: same identity token.)
                if there
                    .iter()
                    .any(|v| claimable(v, subject) && v.state != VolumeState::Creating)
                {
                    return Ok(None);
                }
                mover.renewing(held, self.create(tags, slot)).await
            }
            Next::Wait { .. } => unreachable!("a wait takes no lock"),
        }
    }

    /// Attaches the copy a move just made, still under the lock.
    async fn attach_copy(
        &mut self,
        mover: &Mover<'_>,
        held: &mut Held,
        copy: &Volume,
        slot: Option<u32>,
    ) -> Result<Option<Claim>, Error> {
        let claim = mover.renewing(held, self.attach(&copy.id, slot)).await?;
        Ok(claim.map(with_origin))
    }
}
