//! Moving a node's volume to this zone (`relocation: snapshot`), under a lock with a lease and
//! a fencing token (see docs/ARCHITECTURE.md, *Relocation*).
//!
//! With relocation on, a node's whole claim runs under the lock named after the node's
//! identity tags: no two agents claim or move one node's volume at a time. A claim that finds
//! the node's volume only in another zone moves it: snapshot the source, make a copy here from
//! the snapshot (tagged `cps:relocated-from`, without the identity tag yet), check the source is
//! still free, retire it (`cps:retired-by` = the copy, then the identity tag removed), give the
//! copy the identity tag, and claim it as usual. Each step first looks at what AWS shows, so an
//! agent that takes the lock after a crash resumes where the last one stopped, and the lock's
//! record says a move is unfinished, so nobody creates an empty volume meanwhile.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use cps_provider::{
    Acquired, Error as CloudError, InstanceIdentity, Lease, LockService, Snapshot, SnapshotState,
    Tags, Volume, VolumeService, VolumeState,
};
use tokio::time::Instant;
use tracing::{info, warn};

use super::claim::{Claim, ClaimTarget, claim_volume, claim_volume_gated, volume_spec};
use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str};
use crate::config::AttachConfig;
use crate::error::Error;

/// The tag a retired source carries: the id of the copy that replaced it. Claims skip it.
pub const RETIRED_BY: &str = "cps:retired-by";
/// The tag of a copy: the source it was made from.
pub const RELOCATED_FROM: &str = "cps:relocated-from";
/// The tag of a relocation's snapshot: the source it was taken of.
pub const RELOCATION_OF: &str = "cps:relocation-of";
/// The tag a pool volume's copy carries until the source is retired: claims skip it. (A node's
/// or a slot's copy is hidden by lacking its identity tag instead.)
pub const HANDOVER: &str = "cps:handover";
/// The record key naming the source of an unfinished move.
pub(super) const SOURCE: &str = "source";
/// The record key naming the zone an unfinished move goes to: whoever finishes it makes (or
/// finds) the copy there, so a move resumed from another zone makes no second copy.
const ZONE: &str = "zone";

/// Wall-clock time that follows tokio's clock (which tests pause and advance): the lease's
/// expiry is compared with it by every agent.
fn now() -> SystemTime {
    static BASE: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    let (wall, mono) = *BASE.get_or_init(|| (SystemTime::now(), Instant::now()));
    wall + mono.elapsed()
}

/// The lock's key for a node (or a slot): its identity tags, sorted.
pub fn lock_key(tags: &Tags) -> String {
    let parts: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("cps/node/{}", parts.join(","))
}

/// The lock's key for one pool volume.
pub fn volume_lock_key(volume_id: &str) -> String {
    format!("cps/volume/{volume_id}")
}

/// What one lock guards, and so what a move hands over: a node's or a slot's volume (named by
/// its identity tag), or one pool volume (named by its id; pool volumes have no identity).
#[derive(Clone, Debug)]
pub(super) struct Subject {
    pub(super) key: String,
    /// The tags a claimable volume of the subject carries.
    pub(super) tags: Tags,
    /// The tags that make a volume the subject's (the node id or slot tag): added to the copy
    /// at handover, removed from the source once retired. Empty for a pool volume, whose copy
    /// carries [`HANDOVER`] until then instead.
    pub(super) identity: Tags,
}

impl Subject {
    /// A node's or a slot's volume: `tags` are the cluster's plus the identity.
    pub(super) fn identified(config: &AttachConfig, tags: &Tags) -> Self {
        Self {
            key: lock_key(tags),
            tags: tags.clone(),
            identity: tags
                .iter()
                .filter(|(k, _)| !config.tags.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// One pool volume.
    pub(super) fn pool_volume(config: &AttachConfig, volume_id: &str) -> Self {
        Self {
            key: volume_lock_key(volume_id),
            tags: config.tags.clone(),
            identity: Tags::new(),
        }
    }

    fn is_pool(&self) -> bool {
        self.identity.is_empty()
    }

    /// The copy carries the subject's identity (or no longer waits for its handover).
    fn handed_over(&self, copy: &Volume) -> bool {
        if self.is_pool() {
            !copy.tags.contains_key(HANDOVER)
        } else {
            self.identity
                .iter()
                .all(|(k, v)| copy.tags.get(k) == Some(v))
        }
    }

    /// The source is retired and carries no identity of the subject any more.
    fn retired(&self, source: &Volume) -> bool {
        source.tags.contains_key(RETIRED_BY)
            && !self.identity.keys().any(|k| source.tags.contains_key(k))
    }
}

/// What a move needs.
pub(super) struct Mover<'a> {
    pub(super) cloud: &'a dyn VolumeService,
    pub(super) locks: &'a dyn LockService,
    pub(super) identity: &'a InstanceIdentity,
    pub(super) config: &'a AttachConfig,
    pub(super) policy: RetryPolicy,
}

/// A held lease and when it was last renewed.
pub(super) struct Held {
    lease: Lease,
    renewed: Instant,
}

impl Mover<'_> {
    fn seed(&self) -> u64 {
        hash_str(&self.identity.instance_id)
    }

    fn lease_for(&self) -> Duration {
        self.config.relocation.lease
    }

    /// The claim with relocation on. A node's whole claim runs under its lock, and moves its
    /// volume here first when it is only elsewhere; a slot or pool claim takes the lock of the
    /// slot or volume it is about to attach (see [`Mover::enter`]) and moves one only when
    /// nothing is to be had here.
    pub(super) async fn claim(&self, target: &ClaimTarget) -> Result<Claim, Error> {
        let ClaimTarget::Node { tags, .. } = target else {
            return claim_volume_gated(
                self.cloud,
                self.identity,
                self.config,
                target,
                self.policy,
                Some(self),
            )
            .await;
        };
        let subject = Subject::identified(self.config, tags);
        let (lease, record) = self.acquire(&subject.key).await?;
        let mut held = Held {
            lease,
            renewed: Instant::now(),
        };
        let result = self
            .claim_holding(&mut held, &subject, target, record)
            .await;
        self.leave(held).await;
        result
    }

    async fn claim_holding(
        &self,
        held: &mut Held,
        subject: &Subject,
        target: &ClaimTarget,
        record: BTreeMap<String, String>,
    ) -> Result<Claim, Error> {
        if record.contains_key(SOURCE) {
            self.resume(held, subject, &record).await?;
        }
        // (Also after a move resumed towards another zone: the node's agent is here now.)
        if let Some(source) = self.only_elsewhere(&subject.tags).await? {
            self.start(held, subject, &source).await?;
        }
        let claim = self
            .renewing(
                held,
                claim_volume(self.cloud, self.identity, self.config, target, self.policy),
            )
            .await?;
        Ok(with_origin(claim))
    }

    /// One try at the subject's lock: `None` while another agent holds it.
    pub(super) async fn enter(
        &self,
        subject: &Subject,
    ) -> Result<Option<(Held, BTreeMap<String, String>)>, Error> {
        let me = self.identity.instance_id.as_str();
        let acquired = backoff::retry(self.policy, "DynamoDB UpdateItem", self.seed(), || {
            self.locks
                .acquire(&subject.key, me, self.lease_for(), now())
        })
        .await
        .map_err(Error::cloud("taking the relocation lock"))?;
        Ok(match acquired {
            Acquired::Held(lease, record) => {
                info!(key = %subject.key, token = lease.token, "relocation lock taken");
                Some((
                    Held {
                        lease,
                        renewed: Instant::now(),
                    },
                    record,
                ))
            }
            Acquired::Busy(item) => {
                info!(key = %subject.key, holder = item.owner.as_deref().unwrap_or("?"), "another agent is claiming or moving this volume; looking for another");
                None
            }
        })
    }

    /// Releases the lock; a release that fails leaves it to expire with its lease.
    pub(super) async fn leave(&self, held: Held) {
        if let Err(e) = backoff::retry(self.policy, "DynamoDB UpdateItem", self.seed(), || {
            self.locks.release(&held.lease)
        })
        .await
        {
            warn!(key = %held.lease.key, error = %e, "could not release the relocation lock; it expires with its lease");
        }
    }

    /// Finishes the move an earlier holder of the lock left unfinished (`record` names it),
    /// towards the zone it was going to; returns the copy.
    pub(super) async fn resume(
        &self,
        held: &mut Held,
        subject: &Subject,
        record: &BTreeMap<String, String>,
    ) -> Result<Volume, Error> {
        let source = record.get(SOURCE).map_or("", String::as_str);
        let source = self.volume(source).await?;
        let zone = match record.get(ZONE) {
            Some(zone) => zone.clone(),
            // Records without a zone were written by agents moving to their own: where a copy
            // already is, or else here.
            None => self.copy_zone(&source).await?,
        };
        info!(source = %source.id, zone = %zone, "an earlier relocation of this volume is unfinished; going on with it");
        self.finish(held, subject, &source, &zone).await
    }

    /// The zone of the source's copy (the one it is retired by, else any), or this one.
    async fn copy_zone(&self, source: &Volume) -> Result<String, Error> {
        if let Some(copy) = source.tags.get(RETIRED_BY) {
            return Ok(self.volume(copy).await?.availability_zone);
        }
        let mark: Tags = [(RELOCATED_FROM.to_owned(), source.id.clone())].into();
        let copies = backoff::retry(self.policy, "DescribeVolumes", self.seed(), || {
            self.cloud.volumes_tagged(&mark)
        })
        .await
        .map_err(Error::cloud("looking for the volume's copy"))?;
        Ok(copies
            .into_iter()
            .map(|v| v.availability_zone)
            .min()
            .unwrap_or_else(|| self.identity.availability_zone.clone()))
    }

    /// Starts moving `source` here (it must be attached to nobody), then finishes; returns the
    /// copy.
    pub(super) async fn start(
        &self,
        held: &mut Held,
        subject: &Subject,
        source: &Volume,
    ) -> Result<Volume, Error> {
        self.wait_free(source).await?;
        let zone = &self.identity.availability_zone;
        let record = [
            (SOURCE.to_owned(), source.id.clone()),
            (ZONE.to_owned(), zone.clone()),
        ];
        self.record(held, record.into()).await?;
        self.finish(held, subject, source, zone).await
    }

    /// Takes the lock, waiting (bounded) while another agent holds it.
    async fn acquire(&self, key: &str) -> Result<(Lease, BTreeMap<String, String>), Error> {
        let me = self.identity.instance_id.as_str();
        let bound = self.config.relocation.snapshot_timeout + self.config.node.release_timeout;
        let got = backoff::poll(Schedule::CLOUD_STATE, bound, || async {
            let acquired = backoff::retry(self.policy, "DynamoDB UpdateItem", self.seed(), || {
                self.locks.acquire(key, me, self.lease_for(), now())
            })
            .await
            .map_err(Error::cloud("taking the relocation lock"))?;
            Ok::<_, Error>(match acquired {
                Acquired::Held(lease, record) => Poll::Ready((lease, record)),
                Acquired::Busy(item) => Poll::Pending(format!(
                    "the lock {key} is held by {} (token {})",
                    item.owner.as_deref().unwrap_or("?"),
                    item.token
                )),
            })
        })
        .await?;
        let (lease, record) = got.map_err(|t| Error::Timeout {
            what: format!("the relocation lock {key}"),
            waited: t.waited,
            last: t.last,
        })?;
        info!(key = %key, token = lease.token, "relocation lock taken");
        Ok((lease, record))
    }

    /// Renews the lease when a third of it has passed; a lease lost to another agent stops
    /// this one before its next change.
    async fn renew(&self, held: &mut Held) -> Result<(), Error> {
        if held.renewed.elapsed() < self.lease_for() / 3 {
            return Ok(());
        }
        held.lease = backoff::retry(self.policy, "DynamoDB UpdateItem", self.seed(), || {
            self.locks.renew(&held.lease, self.lease_for(), now())
        })
        .await
        .map_err(Error::cloud("renewing the relocation lock"))?;
        held.renewed = Instant::now();
        Ok(())
    }

    async fn record(&self, held: &mut Held, record: BTreeMap<String, String>) -> Result<(), Error> {
        self.renew(held).await?;
        backoff::retry(self.policy, "DynamoDB UpdateItem", self.seed(), || {
            self.locks.write_record(&held.lease, &record)
        })
        .await
        .map_err(Error::cloud("writing the relocation record"))
    }

    /// Runs `work` (a claim, which may wait for a holder) with the lease renewed meanwhile.
    pub(super) async fn renewing<T>(
        &self,
        held: &mut Held,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                () = tokio::time::sleep(self.lease_for() / 3) => self.renew(held).await?,
            }
        }
    }

    /// The volume as EC2 shows it now.
    pub(super) async fn volume(&self, id: &str) -> Result<Volume, Error> {
        backoff::retry(self.policy, "DescribeVolumes", self.seed(), || {
            self.cloud.volume(id)
        })
        .await
        .map_err(Error::cloud("reading the volume being moved"))
    }

    /// The node's one volume, when it is in another zone and none is here.
    async fn only_elsewhere(&self, tags: &Tags) -> Result<Option<Volume>, Error> {
        let zone = &self.identity.availability_zone;
        let volumes: Vec<Volume> =
            backoff::retry(self.policy, "DescribeVolumes", self.seed(), || {
                self.cloud.volumes_tagged(tags)
            })
            .await
            .map_err(Error::cloud("listing volumes by tag"))?
            .into_iter()
            .filter(|v| !v.tags.contains_key(RETIRED_BY))
            .collect();
        let (here, far): (Vec<Volume>, Vec<Volume>) = volumes
            .into_iter()
            .partition(|v| &v.availability_zone == zone);
        Ok(match (here.is_empty(), far.as_slice()) {
            (true, [one]) => Some(one.clone()),
            // Several elsewhere, or one here too: the claim says what is wrong.
            _ => None,
        })
    }

    /// Waits (bounded by the release timeout) until the source is attached to nobody: the old
    /// server in the other zone may still be shutting down.
    async fn wait_free(&self, source: &Volume) -> Result<(), Error> {
        let id = source.id.as_str();
        let waited = backoff::poll(
            Schedule::CLOUD_STATE,
            self.config.node.release_timeout,
            || async {
                let v = self.volume(id).await?;
                Ok::<_, Error>(
                    if v.state == VolumeState::Available && v.attachments.is_empty() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending(format!(
                            "{id} in {} is {} ({} attachments)",
                            v.availability_zone,
                            v.state,
                            v.attachments.len()
                        ))
                    },
                )
            },
        )
        .await?;
        waited.map_err(|t| Error::Timeout {
            what: format!(
                "{id} to be released in its zone before it is moved (never detached by cps)"
            ),
            waited: t.waited,
            last: t.last,
        })
    }

    /// Snapshot, copy, retire, hand over: each step skipped when AWS shows it done. Returns
    /// the copy, now the subject's.
    async fn finish(
        &self,
        held: &mut Held,
        subject: &Subject,
        source: &Volume,
        zone: &str,
    ) -> Result<Volume, Error> {
        let snapshot = self.snapshot_of(held, &subject.tags, source, zone).await?;
        let mut copy = self.copy_of(held, subject, source, &snapshot, zone).await?;
        if !subject.retired(source) {
            self.retire(held, subject, &source.id, &copy.id).await?;
        }
        if !subject.handed_over(&copy) {
            self.renew(held).await?;
            if subject.is_pool() {
                let keys = [HANDOVER.to_owned()];
                backoff::retry(self.policy, "DeleteTags", self.seed(), || {
                    self.cloud.untag_volume(&copy.id, &keys)
                })
                .await
                .map_err(Error::cloud("handing the copy over to the pool"))?;
                copy.tags.remove(HANDOVER);
            } else {
                // The copy has the cluster's tags from its creation; only the identity is added.
                backoff::retry(self.policy, "CreateTags", self.seed(), || {
                    self.cloud.tag_volume(&copy.id, &subject.identity)
                })
                .await
                .map_err(Error::cloud("giving the copy the node's identity"))?;
                copy.tags.extend(subject.identity.clone());
            }
        }
        self.record(held, BTreeMap::new()).await?;
        info!(source = %source.id, copy = %copy.id, zone = %zone, "the volume was moved to this zone");
        Ok(copy)
    }

    /// The source's relocation snapshot, taken now if there is none; waited for until complete.
    async fn snapshot_of(
        &self,
        held: &mut Held,
        tags: &Tags,
        source: &Volume,
        zone: &str,
    ) -> Result<Snapshot, Error> {
        let mark: Tags = [(RELOCATION_OF.to_owned(), source.id.clone())].into();
        let mut found = backoff::retry(self.policy, "DescribeSnapshots", self.seed(), || {
            self.cloud.snapshots_tagged(&mark)
        })
        .await
        .map_err(Error::cloud("looking for the relocation snapshot"))?;
        found.retain(|s| s.state != SnapshotState::Error);
        found.sort_by(|a, b| a.id.cmp(&b.id));
        let snapshot = match found.into_iter().next() {
            Some(s) => s,
            None => {
                self.renew(held).await?;
                let mut snap_tags = tags.clone();
                snap_tags.extend(mark);
                snap_tags.insert("cps:relocation-token".into(), held.lease.token.to_string());
                let description = format!("cps: moving {} to {zone}", source.id);
                let s = backoff::retry(self.policy, "CreateSnapshot", self.seed(), || {
                    self.cloud
                        .create_snapshot(&source.id, &description, &snap_tags)
                })
                .await
                .map_err(Error::cloud("snapshotting the volume to move"))?;
                info!(source = %source.id, snapshot = %s.id, "snapshot of the volume to move started");
                s
            }
        };
        self.completed(held, snapshot).await
    }

    async fn completed(&self, held: &mut Held, snapshot: Snapshot) -> Result<Snapshot, Error> {
        let id = snapshot.id.clone();
        let started = Instant::now();
        let mut looks = 0;
        let mut current = snapshot;
        loop {
            match current.state {
                SnapshotState::Completed => return Ok(current),
                SnapshotState::Error => {
                    return Err(Error::SnapshotFailed {
                        snapshot_id: id,
                        volume_id: current.volume_id,
                    });
                }
                SnapshotState::Pending => {}
            }
            if started.elapsed() >= self.config.relocation.snapshot_timeout {
                return Err(Error::Timeout {
                    what: format!("snapshot {id} to complete"),
                    waited: started.elapsed(),
                    last: format!("{}% done", current.progress_percent.unwrap_or(0)),
                });
            }
            if looks % 10 == 0 {
                info!(snapshot = %id, progress = current.progress_percent.unwrap_or(0), "waiting for the snapshot");
            }
            tokio::time::sleep(Schedule::CLOUD_STATE.delay(looks)).await;
            looks += 1;
            self.renew(held).await?;
            current = backoff::retry(self.policy, "DescribeSnapshots", self.seed(), || {
                self.cloud.snapshot(&id)
            })
            .await
            .map_err(Error::cloud("waiting for the snapshot"))?;
        }
    }

    /// The copy in `zone`, made from the snapshot if there is none yet; waited for until
    /// available. It carries the cluster's tags and `cps:relocated-from`, not the identity tag
    /// (a pool volume's copy: [`HANDOVER`]).
    async fn copy_of(
        &self,
        held: &mut Held,
        subject: &Subject,
        source: &Volume,
        snapshot: &Snapshot,
        zone: &str,
    ) -> Result<Volume, Error> {
        let mut mark = self.config.tags.clone();
        mark.insert(RELOCATED_FROM.to_owned(), source.id.clone());
        let found = backoff::retry(self.policy, "DescribeVolumes", self.seed(), || {
            self.cloud.volumes_tagged(&mark)
        })
        .await
        .map_err(Error::cloud("looking for the volume's copy"))?;
        if let Some(copy) = found.into_iter().find(|v| v.availability_zone == zone) {
            return self.available(copy).await;
        }
        self.renew(held).await?;
        let mut spec = volume_spec(self.identity, self.config, &mark);
        spec.availability_zone = zone.to_owned();
        if subject.is_pool() {
            // A pool has no identity to withhold: the copy is hidden from claims by this tag.
            spec.tags.insert(HANDOVER.to_owned(), source.id.clone());
        }
        spec.size_gib = spec.size_gib.max(source.size_gib).max(snapshot.size_gib);
        spec.snapshot_id = Some(snapshot.id.clone());
        spec.initialization_rate = self.config.restore.initialization_rate;
        if let Some(journal) = source.tags.get(super::journal::TAG) {
            spec.tags
                .insert(super::journal::TAG.to_owned(), journal.clone());
        }
        // Every agent moving this source from this snapshot sends the same token: one copy.
        let token = format!(
            "cps-move-{:016x}",
            hash_str(&format!("{}|{}|{zone}", source.id, snapshot.id))
        );
        let copy = backoff::retry(self.policy, "CreateVolume", self.seed(), || {
            self.cloud.create_volume(&spec, &token)
        })
        .await
        .map_err(Error::cloud("creating the copy from the snapshot"))?;
        info!(source = %source.id, snapshot = %snapshot.id, copy = %copy.id, zone = %zone, "copy of the volume created from the snapshot");
        self.available(copy).await
    }

    async fn available(&self, volume: Volume) -> Result<Volume, Error> {
        let id = volume.id.clone();
        let waited = backoff::poll(
            Schedule::CLOUD_STATE,
            self.config.timeouts.create,
            || async {
                let v = self.volume(&id).await?;
                Ok::<_, Error>(match v.state {
                    VolumeState::Available | VolumeState::InUse => Poll::Ready(v),
                    state => Poll::Pending(format!("{id} is {state}")),
                })
            },
        )
        .await?;
        waited.map_err(|t| Error::Timeout {
            what: format!("the copy {id} to be available"),
            waited: t.waited,
            last: t.last,
        })
    }

    /// Retires the source: still free (nobody may attach it while the lock is held, but check),
    /// then `cps:retired-by` (from then on claims skip it), then the identity tag removed.
    async fn retire(
        &self,
        held: &mut Held,
        subject: &Subject,
        source: &str,
        copy: &str,
    ) -> Result<(), Error> {
        let now = self.volume(source).await?;
        if !now.attachments.is_empty() {
            // Someone uses the source: the move is void (the copy stays hidden, never claimed).
            // Cleared, so the next holder of the lock does not try to finish it again.
            self.record(held, BTreeMap::new()).await?;
            return Err(Error::MovedWhileInUse {
                original: source.to_owned(),
                copy: copy.to_owned(),
            });
        }
        self.renew(held).await?;
        let retired: Tags = [(RETIRED_BY.to_owned(), copy.to_owned())].into();
        backoff::retry(self.policy, "CreateTags", self.seed(), || {
            self.cloud.tag_volume(source, &retired)
        })
        .await
        .map_err(Error::cloud("retiring the moved volume"))?;
        if !subject.identity.is_empty() {
            let keys: Vec<String> = subject.identity.keys().cloned().collect();
            self.renew(held).await?;
            backoff::retry(self.policy, "DeleteTags", self.seed(), || {
                self.cloud.untag_volume(source, &keys)
            })
            .await
            .map_err(Error::cloud("removing the identity from the moved volume"))?;
        }
        info!(source = %source, copy = %copy, "source retired (cps:retired-by); it is never claimed again");
        Ok(())
    }
}

/// A claim of a copy says which volume it was moved from.
pub(super) fn with_origin(mut claim: Claim) -> Claim {
    if let Some(from) = claim.volume.tags.get(RELOCATED_FROM) {
        claim.relocated_from = Some(from.clone());
    }
    claim
}

/// With `delete-source`, after the copy is attached here and its filesystem verified: deletes
/// the volumes this one retired, if they are still free. One listing per boot.
pub(super) async fn delete_retired(
    cloud: &dyn VolumeService,
    claim: &Claim,
    policy: RetryPolicy,
) -> Result<(), Error> {
    let seed = hash_str(&claim.instance_id);
    let mark: Tags = [(RETIRED_BY.to_owned(), claim.volume.id.clone())].into();
    let retired = backoff::retry(policy, "DescribeVolumes", seed, || {
        cloud.volumes_tagged(&mark)
    })
    .await
    .map_err(Error::cloud("looking for the moved volume's source"))?;
    for v in retired {
        if v.state != VolumeState::Available || !v.attachments.is_empty() {
            warn!(volume_id = %v.id, "the retired source is in use; not deleting it");
            continue;
        }
        match backoff::retry(policy, "DeleteVolume", seed, || cloud.delete_volume(&v.id)).await {
            Ok(()) | Err(CloudError::NotFound { .. }) => {
                info!(volume_id = %v.id, copy = %claim.volume.id, "retired source deleted (relocation.delete-source)");
            }
            Err(e) => return Err(Error::cloud("deleting the moved volume's source")(e)),
        }
    }
    Ok(())
}
