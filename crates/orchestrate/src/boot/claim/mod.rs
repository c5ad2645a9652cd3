//! Claiming the volume in the cloud, in one of three modes.
//!
//! Every mode first lists the volumes with its tags (one DescribeVolumes, paginated) and reuses
//! one already attached to this instance (a re-run is a no-op). Then:
//!
//! - **pool** (the original tool): any available volume in this zone, tried in this agent's own
//!   pseudo-random order so a herd spreads out; `VolumeInUse` means another agent won, so list
//!   again and take the next pick. A volume held by a server that is going away is waited for.
//!   Nothing to claim → create one (client token from instance, spec and attempt).
//! - **node-id**: the one volume carrying this node's id. Held by another instance (the old one
//!   shutting down, or still running) → wait for it to be released, logging who holds it and in
//!   what state, never detaching it. Only in another zone → refuse. None at all → create it, with
//!   a token shared by every instance of the node, so two can never make two.
//! - **slot**: slots 1..=max, best first: free ones in this zone, then ones held only by an
//!   instance going away (a replacement waits for its slot rather than make a new, empty
//!   member), then ones with no volume yet (created with a token shared by everyone creating
//!   that slot). The instances booting at once in the zone share them out by rank: the i-th of
//!   those still without a slot takes the i-th candidate, so with k slots leaving and m
//!   instances booting the k slots go to replacements and only the other m − k create.
//!
//! After AttachVolume, wait until EC2 reports the attachment attached.
//!
//! With `relocation: snapshot`, slot and pool claims attach under the lock of what they take,
//! and move a volume from another zone when nothing here is to be had (see `gated`).

mod create;
mod gated;
mod holders;
mod restore;
mod slot;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cps_provider::{
    AttachmentState, Error as CloudError, InstanceIdentity, Tags, Volume, VolumeService,
    VolumeSpec, VolumeState,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, info};

use super::relocate::{HANDOVER, Mover, RETIRED_BY};
use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str, mix};
use crate::config::AttachConfig;
use crate::error::Error;
use create::{Creation, Creator, TokenWalk};
use holders::{holders, leaving, sole_holder_of_identity};
use slot::{SlotChoice, slot_next};

/// How many volumes one run may create before giving up (each creation after the first means
/// another agent claimed the volume this one had just created).
const MAX_CREATES: u32 = 3;

/// How many of an identity's creation tokens one run walks through (each one past the first
/// means the volume the previous one names is gone).
const MAX_GENERATIONS: u32 = 8;

/// How long the volume a creation token names may stay unknown to EC2 before it counts as gone
/// (a fresh volume can be invisible to DescribeVolumes for a moment; a deleted one stays so);
/// half of `timeouts.create` when that is shorter.
const GONE_AFTER: Duration = Duration::from_secs(30);

/// Where the claimed volume came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// It was already attached to this instance.
    Reused,
    /// An existing available volume was attached.
    Claimed,
    /// No volume could be claimed; this one was created.
    Created,
}

/// Which volume this instance may claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimTarget {
    /// Any volume with these tags.
    Pool { tags: Tags },
    /// The volume with these tags (which include the node id).
    Node {
        tags: Tags,
        release_timeout: Duration,
    },
    /// Slots 1..=max: volumes with `tags` and `key = slot`. `peers`: the instances of this
    /// group booting in this zone (this one among them; only this one when unknown).
    Slot {
        tags: Tags,
        key: String,
        max: u32,
        peers: Vec<String>,
    },
}

impl ClaimTarget {
    /// The pool target of a configuration (the original tool's behaviour).
    pub fn pool(config: &AttachConfig) -> Self {
        Self::Pool {
            tags: config.tags.clone(),
        }
    }

    fn tags(&self) -> &Tags {
        match self {
            Self::Pool { tags } | Self::Node { tags, .. } | Self::Slot { tags, .. } => tags,
        }
    }

    fn slot_of(&self, v: &Volume) -> Option<u32> {
        match self {
            Self::Slot { key, max, .. } => v
                .tags
                .get(key)
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|k| (1..=*max).contains(k)),
            _ => None,
        }
    }
}

/// A volume attached to this instance, as EC2 reports it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub volume: Volume,
    /// The instance it is attached to (this one).
    pub instance_id: String,
    pub origin: Origin,
    /// AttachVolume requests made (0 when reused).
    pub attach_attempts: u32,
    /// In slot mode, the slot claimed.
    pub slot: Option<u32>,
    /// The volume is the copy a relocation made of this one (in another zone).
    pub relocated_from: Option<String>,
}

/// The volume this run creates when it must: the configured one, in this zone, with `tags`.
pub fn volume_spec(identity: &InstanceIdentity, config: &AttachConfig, tags: &Tags) -> VolumeSpec {
    VolumeSpec {
        availability_zone: identity.availability_zone.clone(),
        size_gib: config.volume.size_gib,
        volume_type: config.volume.volume_type.clone(),
        iops: config.volume.iops,
        throughput: config.volume.throughput,
        encrypted: config.volume.encrypted,
        kms_key_id: config.volume.kms_key_id.clone(),
        tags: tags.clone(),
        snapshot_id: None,
        initialization_rate: None,
    }
}

fn token(parts: &[&str], spec: &VolumeSpec, attempt: u32) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    for p in parts {
        field(p);
    }
    field(&spec.availability_zone);
    field(&spec.volume_type);
    field(&spec.size_gib.to_string());
    field(&format!("{:?}/{:?}", spec.iops, spec.throughput));
    field(&format!("{}/{:?}", spec.encrypted, spec.kms_key_id));
    // Only when set, so tokens without a snapshot stay what they were.
    if let Some(snapshot) = &spec.snapshot_id {
        field(snapshot);
        field(&format!("{:?}", spec.initialization_rate));
    }
    for (k, v) in &spec.tags {
        field(k);
        field(v);
    }
    field(&attempt.to_string());
    let digest = h.finalize();
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("cps-{hex}")
}

/// Pool mode: same instance, same spec, same attempt → same token; the cloud then returns the
/// volume the first request made instead of making another.
pub fn client_token(identity: &InstanceIdentity, spec: &VolumeSpec, attempt: u32) -> String {
    token(&[&identity.instance_id], spec, attempt)
}

/// Node and slot modes: a function of the identity (its tags) and a generation — not of the
/// instance, the zone, the spec or how often this run tried. Every instance creating this node's
/// (slot's) volume sends the same token: the cloud returns the one volume, or refuses with
/// IdempotentParameterMismatch when the parameters differ (another zone, another size), never
/// makes a second. The generation moves on only when the volume a token names is gone (AWS
/// answers a used token with its volume for hours, even once that volume was deleted); every
/// instance walks the generations in the same order on the same evidence, so they still agree.
pub fn identity_token(tags: &Tags, generation: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"cps-identity");
    for (k, v) in tags {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    // Generation 0 is the token earlier versions sent.
    if generation > 0 {
        h.update(b"generation");
        h.update(generation.to_le_bytes());
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("cps-id-{hex}")
}

/// A volume carrying the tags that is this instance's root disk, or dies with the instance, is
/// no place for the node's data: launch-template tag specifications for volumes tag the root
/// disk too, and reusing it would put the data on a disk deleted at the next replacement.
fn refuse_unless_data_volume(volume: &Volume, me: &str) -> Result<(), Error> {
    let Some(a) = volume.attachment_to(me) else {
        return Ok(());
    };
    let why = if !crate::config::is_data_device_name(&a.device) {
        "the root disk (or another name EC2 does not give data volumes)"
    } else if a.delete_on_termination {
        "a volume EC2 deletes when this instance terminates (DeleteOnTermination)"
    } else {
        return Ok(());
    };
    Err(Error::NotDataVolume {
        volume_id: volume.id.clone(),
        instance_id: me.to_owned(),
        device: a.device.clone(),
        why,
    })
}

/// What the loop does next.
#[derive(Debug)]
enum Next {
    Attach {
        volume_id: String,
        slot: Option<u32>,
    },
    Create {
        tags: Tags,
        slot: Option<u32>,
    },
    /// Someone holds what this instance needs; wait up to the timeout.
    Wait {
        what: String,
        timeout: Duration,
    },
    /// Nothing here to take: move this free volume from another zone (relocation on).
    Move {
        source: Volume,
        slot: Option<u32>,
    },
    /// A pool volume's move was left unfinished (its copy still waits for its handover):
    /// finish it (relocation on).
    Finish {
        source: String,
    },
}

/// Claims a volume for `target` and waits until EC2 reports it attached here.
pub async fn claim_volume(
    cloud_api: &dyn VolumeService,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    target: &ClaimTarget,
    policy: RetryPolicy,
) -> Result<Claim, Error> {
    claim_volume_gated(cloud_api, identity, config, target, policy, None).await
}

/// [`claim_volume`]; with `mover` (relocation on, slot and pool targets) each attach runs under
/// the lock of what it takes, and a free volume elsewhere is moved here when nothing is here.
pub(in crate::boot) async fn claim_volume_gated(
    cloud_api: &dyn VolumeService,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    target: &ClaimTarget,
    policy: RetryPolicy,
    mover: Option<&Mover<'_>>,
) -> Result<Claim, Error> {
    let release_timeout = match target {
        ClaimTarget::Node {
            release_timeout, ..
        } => *release_timeout,
        _ => config.timeouts.attach,
    };
    let mut claimer = Claimer {
        cloud_api,
        identity,
        config,
        target,
        policy,
        me: identity.instance_id.as_str(),
        seed: hash_str(&identity.instance_id),
        started: Instant::now(),
        // The whole claim may take as long as creating and attaching one volume, plus waiting
        // for a holder to let go.
        deadline: config.timeouts.create + config.timeouts.attach + release_timeout,
        attach_attempts: 0,
        creates: 0,
        logged_elsewhere: false,
        race_budget: None,
        lost_races: 0,
        waiting: None,
        walks: BTreeMap::new(),
        mover,
        busy_slots: BTreeSet::new(),
        busy_volumes: BTreeSet::new(),
        handovers: Vec::new(),
        movable_since: None,
    };
    loop {
        if claimer.started.elapsed() > claimer.deadline {
            return Err(Error::Timeout {
                what: "a volume to claim".into(),
                waited: claimer.started.elapsed(),
                last: format!(
                    "{} attach attempts, {} volumes created",
                    claimer.attach_attempts, claimer.creates
                ),
            });
        }
        let mut volumes = backoff::retry(policy, "DescribeVolumes", claimer.seed, || {
            cloud_api.volumes_tagged(target.tags())
        })
        .await
        .map_err(Error::cloud("listing volumes by tag"))?;
        // A source a relocation retired is never claimed again, even before its identity tag
        // is gone; a pool volume's copy not yet handed over is not claimed yet.
        claimer.handovers = volumes
            .iter()
            .filter_map(|v| v.tags.get(HANDOVER).cloned())
            .collect();
        volumes.retain(|v| !v.tags.contains_key(RETIRED_BY) && !v.tags.contains_key(HANDOVER));
        if let Some(claim) = claimer.already_mine(&volumes).await? {
            return Ok(claim);
        }
        claimer.check_race_budget(&volumes)?;
        let next = claimer.next(&volumes).await?;
        if let Some(claim) = claimer.act(next).await? {
            return Ok(claim);
        }
    }
}

/// One claim's state across its looks: what it tried, lost and created so far.
struct Claimer<'a> {
    cloud_api: &'a dyn VolumeService,
    identity: &'a InstanceIdentity,
    config: &'a AttachConfig,
    target: &'a ClaimTarget,
    policy: RetryPolicy,
    me: &'a str,
    seed: u64,
    started: Instant,
    deadline: Duration,
    attach_attempts: u32,
    creates: u32,
    logged_elsewhere: bool,
    /// Fixed at the first look, from what there is to get.
    race_budget: Option<u32>,
    lost_races: u32,
    /// Since when, how many looks, and the last holder described.
    waiting: Option<(Instant, u32, String)>,
    walks: BTreeMap<Tags, TokenWalk>,
    /// Relocation on: attaches go through its locks.
    mover: Option<&'a Mover<'a>>,
    /// Slots and pool volumes whose lock another agent held at this run's try: skipped until
    /// this run next waits.
    busy_slots: BTreeSet<u32>,
    busy_volumes: BTreeSet<String>,
    /// The sources of pool volumes' copies still waiting for their handover, at the last look.
    handovers: Vec<String>,
    /// Since when a slot elsewhere could have been moved here (see `relocation.grace`).
    movable_since: Option<Instant>,
}

impl Claimer<'_> {
    /// The claim, once its volume is attached here and nothing else holds its identity.
    async fn claimed(
        &self,
        volume: Volume,
        origin: Origin,
        slot: Option<u32>,
    ) -> Result<Claim, Error> {
        let claim = Claim {
            volume,
            instance_id: self.me.to_owned(),
            origin,
            attach_attempts: self.attach_attempts,
            slot,
            relocated_from: None,
        };
        sole_holder_of_identity(self.cloud_api, self.target, &claim, self.seed, self.policy)
            .await?;
        Ok(claim)
    }

    /// A volume with the tags already attached (or attaching) here: a re-run, or what a lost
    /// AttachVolume reply looks like. Several are refused.
    async fn already_mine(&self, volumes: &[Volume]) -> Result<Option<Claim>, Error> {
        let me = self.me;
        let mine: Vec<&Volume> = volumes
            .iter()
            .filter(|v| {
                v.attachment_to(me).is_some_and(|a| {
                    matches!(
                        a.state,
                        AttachmentState::Attaching | AttachmentState::Attached
                    )
                }) && (!matches!(self.target, ClaimTarget::Slot { .. })
                    || self.target.slot_of(v).is_some())
            })
            .collect();
        match mine.as_slice() {
            [] => Ok(None),
            [volume] => {
                refuse_unless_data_volume(volume, me)?;
                info!(volume_id = %volume.id, "volume with these tags is already attached to this instance; reusing it");
                let attached = volume
                    .attachment_to(me)
                    .is_some_and(|a| a.state == AttachmentState::Attached);
                let slot = self.target.slot_of(volume);
                let volume = if attached {
                    (*volume).clone()
                } else {
                    wait_attached(
                        self.cloud_api,
                        self.identity,
                        self.config,
                        &volume.id,
                        self.policy,
                    )
                    .await?
                };
                Ok(Some(self.claimed(volume, Origin::Reused, slot).await?))
            }
            many => Err(Error::Ambiguous {
                instance_id: me.to_owned(),
                count: many.len(),
                volumes: many
                    .iter()
                    .map(|v| v.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every lost race means another instance got a volume; bounded by what there is to get.
    fn check_race_budget(&mut self, volumes: &[Volume]) -> Result<(), Error> {
        let pool = match self.target {
            ClaimTarget::Slot { max, .. } => volumes.len().max(*max as usize),
            _ => volumes.len(),
        };
        let budget = *self.race_budget.get_or_insert(4 * pool as u32 + 16);
        if self.lost_races > budget {
            return Err(Error::Exhausted {
                attempts: self.attach_attempts,
                detail: format!(
                    "lost {} races for a volume; the volumes keep being taken by other instances",
                    self.lost_races
                ),
            });
        }
        Ok(())
    }

    /// What to do after this look, by claim mode.
    async fn next(&mut self, volumes: &[Volume]) -> Result<Next, Error> {
        let zone = &self.identity.availability_zone;
        let (here, elsewhere): (Vec<&Volume>, Vec<&Volume>) =
            volumes.iter().partition(|v| &v.availability_zone == zone);
        if !elsewhere.is_empty()
            && !self.logged_elsewhere
            && !matches!(self.target, ClaimTarget::Node { .. })
        {
            self.logged_elsewhere = true;
            info!(
                zone = %zone,
                skipped = %elsewhere.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(","),
                "skipping matching volumes in other availability zones (EBS attaches within a zone only)"
            );
        }
        match self.target {
            ClaimTarget::Pool { tags } => self.next_in_pool(tags, &here, &elsewhere).await,
            ClaimTarget::Node {
                tags,
                release_timeout,
            } => {
                self.next_for_node(tags, *release_timeout, &here, &elsewhere)
                    .await
            }
            ClaimTarget::Slot { .. } => self.next_for_slot(volumes).await,
        }
    }

    /// A free volume in this zone, in this instance's own order; else wait for one leaving;
    /// else (relocation on) move a free one from another zone; else create.
    async fn next_in_pool(
        &self,
        tags: &Tags,
        here: &[&Volume],
        elsewhere: &[&Volume],
    ) -> Result<Next, Error> {
        let mut candidates: Vec<&Volume> = here
            .iter()
            .copied()
            .filter(|v| free(v) && !self.busy_volumes.contains(&v.id))
            .collect();
        candidates.sort_by_key(|v| mix(self.seed ^ hash_str(&v.id)));
        if let Some(v) = candidates.first() {
            return Ok(Next::Attach {
                volume_id: v.id.clone(),
                slot: None,
            });
        }
        Ok(
            match leaving(self.cloud_api, here, self.seed, self.policy).await? {
                Some(what) => Next::Wait {
                    what,
                    timeout: self.config.timeouts.attach,
                },
                None => match (self.pool_unfinished(), self.pool_move(elsewhere)) {
                    (Some(source), _) => Next::Finish { source },
                    (None, Some(source)) => Next::Move { source, slot: None },
                    (None, None) => Next::Create {
                        tags: tags.clone(),
                        slot: None,
                    },
                },
            },
        )
    }

    /// The node's one volume: attach it when free, wait while it is held, create it when
    /// there is none; refuse one in another zone only, and several.
    async fn next_for_node(
        &self,
        tags: &Tags,
        release_timeout: Duration,
        here: &[&Volume],
        elsewhere: &[&Volume],
    ) -> Result<Next, Error> {
        Ok(match (here, elsewhere) {
            ([], []) => Next::Create {
                tags: tags.clone(),
                slot: None,
            },
            ([], far) => {
                return Err(Error::WrongZone {
                    what: "this node's volume",
                    resources: far
                        .iter()
                        .map(|v| format!("{} in {}", v.id, v.availability_zone))
                        .collect::<Vec<_>>()
                        .join(", "),
                    zone: self.identity.availability_zone.clone(),
                });
            }
            ([v], _) if free(v) => Next::Attach {
                volume_id: v.id.clone(),
                slot: None,
            },
            ([v], _) if v.attachments.is_empty() => Next::Wait {
                what: format!("{} is {}", v.id, v.state),
                timeout: release_timeout,
            },
            ([v], _) => Next::Wait {
                what: holders(self.cloud_api, &[*v], self.seed, self.policy)
                    .await?
                    .1,
                timeout: release_timeout,
            },
            (many, _) => {
                return Err(Error::Duplicates {
                    what: "this node".into(),
                    volumes: many
                        .iter()
                        .map(|v| v.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        })
    }

    /// The slot this instance's rank gives it (see [`slot_next`]); with none here, one moved
    /// from another zone (relocation on).
    async fn next_for_slot(&mut self, volumes: &[Volume]) -> Result<Next, Error> {
        let ClaimTarget::Slot { tags, key, max, .. } = self.target else {
            unreachable!("next_for_slot is only called for slot targets")
        };
        let (api, seed, policy) = (self.cloud_api, self.seed, self.policy);
        let choice = slot_next(
            api,
            self.target,
            volumes,
            self.identity,
            &self.busy_slots,
            seed,
            policy,
        )
        .await?;
        Ok(match choice {
            SlotChoice::Attach { volume_id, slot } => Next::Attach {
                volume_id,
                slot: Some(slot),
            },
            SlotChoice::Create(k) => {
                let mut t = tags.clone();
                t.insert(key.clone(), k.to_string());
                Next::Create {
                    tags: t,
                    slot: Some(k),
                }
            }
            SlotChoice::Wait { what } => Next::Wait {
                what,
                timeout: self.config.timeouts.attach,
            },
            SlotChoice::NoneFree => {
                let far = self.slots_elsewhere(volumes);
                if self.mover.is_some() {
                    if let Some(wait) = self.slot_grace(&far) {
                        return Ok(wait);
                    }
                    if let Some((k, source)) = self.pick_slot_move(&far) {
                        return Ok(Next::Move {
                            source: source.clone(),
                            slot: Some(k),
                        });
                    }
                    if !self.busy_slots.is_empty() {
                        return Ok(Next::Wait {
                            what: format!(
                                "slots {:?} are being claimed or moved by other agents",
                                self.busy_slots
                            ),
                            timeout: self.config.timeouts.attach,
                        });
                    }
                }
                let all: Vec<&Volume> = volumes.iter().collect();
                let (_, mut held) = holders(api, &all, seed, policy).await?;
                if !far.is_empty() && self.mover.is_none() {
                    let list: Vec<String> = far
                        .iter()
                        .map(|(k, v)| format!("slot {k}: {} in {}", v.id, v.availability_zone))
                        .collect();
                    held.push_str(&format!(
                        "; free in other zones: {} (relocation.mode snapshot moves one here)",
                        list.join(", ")
                    ));
                }
                return Err(Error::NoFreeSlot {
                    max: *max,
                    zone: self.identity.availability_zone.clone(),
                    detail: held,
                });
            }
        })
    }

    /// Does `next`; returns the claim once a volume is attached here.
    async fn act(&mut self, next: Next) -> Result<Option<Claim>, Error> {
        if let Some(mover) = self.mover {
            return self.act_gated(mover, next).await;
        }
        self.act_plain(next).await
    }

    /// Does `next` without a lock.
    async fn act_plain(&mut self, next: Next) -> Result<Option<Claim>, Error> {
        match next {
            Next::Wait { what, timeout } => {
                // Whoever held a lock this run found busy may be done by the next look.
                self.busy_slots.clear();
                self.busy_volumes.clear();
                self.wait(what, timeout).await?;
                Ok(None)
            }
            Next::Attach { volume_id, slot } => self.attach(&volume_id, slot).await,
            Next::Create { tags, slot } => self.create(tags, slot).await,
            Next::Move { .. } | Next::Finish { .. } => {
                unreachable!("a move is only chosen with relocation on")
            }
        }
    }

    /// One pause while another instance holds what this one needs, within `timeout` of the
    /// first.
    async fn wait(&mut self, what: String, timeout: Duration) -> Result<(), Error> {
        let (since, looks, last) = self
            .waiting
            .get_or_insert_with(|| (Instant::now(), 0, String::new()));
        if since.elapsed() >= timeout {
            return Err(Error::Timeout {
                what:
                    "the volume to be released by the instance holding it (never detached by cps)"
                        .into(),
                waited: since.elapsed(),
                last: what,
            });
        }
        if *last != what {
            info!(held = %what, "the volume is held by another instance; waiting for it to be released");
            *last = what;
        }
        tokio::time::sleep(Schedule::CLOUD_STATE.delay(*looks)).await;
        *looks += 1;
        Ok(())
    }

    /// Tries to attach an existing volume; a lost race counts against the budget.
    async fn attach(&mut self, volume_id: &str, slot: Option<u32>) -> Result<Option<Claim>, Error> {
        self.attach_attempts += 1;
        let device_name = self.config.block_device.as_str();
        info!(volume_id = %volume_id, device = device_name, slot, "attaching existing volume");
        let (api, me, seed, policy) = (self.cloud_api, self.me, self.seed, self.policy);
        if try_attach(api, volume_id, me, device_name, seed, policy).await? {
            let volume = wait_attached(api, self.identity, self.config, volume_id, policy).await?;
            return Ok(Some(self.claimed(volume, Origin::Claimed, slot).await?));
        }
        self.lost_races += 1;
        Ok(None)
    }

    /// Creates a volume with `tags` (under the pool's or the identity's client token) and
    /// tries to attach it.
    async fn create(&mut self, tags: Tags, slot: Option<u32>) -> Result<Option<Claim>, Error> {
        let pool = matches!(self.target, ClaimTarget::Pool { .. });
        // Pool mode makes a new volume per creation; node and slot modes cannot (the token is
        // the identity's), so only the race budget bounds them.
        if self.creates >= MAX_CREATES && pool {
            return Err(Error::Exhausted {
                attempts: self.attach_attempts,
                detail: format!(
                    "created {} volumes and another instance claimed each before this one could attach it",
                    self.creates
                ),
            });
        }
        let mut spec = volume_spec(self.identity, self.config, &tags);
        if let Some(snapshot) =
            restore::snapshot_for(self.cloud_api, self.config, &tags, self.seed, self.policy)
                .await?
        {
            info!(snapshot = %snapshot.id, snapshot_gib = snapshot.size_gib, "the new volume is restored from a snapshot");
            spec.size_gib = spec.size_gib.max(snapshot.size_gib);
            spec.snapshot_id = Some(snapshot.id);
            spec.initialization_rate = self.config.restore.initialization_rate;
        }
        let walk = self.walks.entry(tags.clone()).or_default();
        if walk.generation >= MAX_GENERATIONS {
            return Err(Error::Exhausted {
                attempts: self.attach_attempts,
                detail: format!(
                    "the volumes {MAX_GENERATIONS} creation tokens of this identity named are all gone (deleted while cps-attach ran?)"
                ),
            });
        }
        let token = if pool {
            client_token(self.identity, &spec, self.creates)
        } else {
            match &spec.snapshot_id {
                // A restore's parameters differ from those of the volume the plain token made
                // (now gone); its own token keeps AWS from answering with a mismatch. Agents
                // restoring the node at once pick the same newest snapshot, so the same token.
                Some(snapshot) => {
                    let mut t = tags.clone();
                    t.insert("cps:restore-of".into(), snapshot.clone());
                    identity_token(&t, walk.generation)
                }
                None => identity_token(&tags, walk.generation),
            }
        };
        self.creates += 1;
        let creator = Creator {
            cloud_api: self.cloud_api,
            config: self.config,
            identity: self.identity,
            pool,
            seed: self.seed,
            policy: self.policy,
        };
        info!(zone = %spec.availability_zone, size_gib = spec.size_gib, volume_type = %spec.volume_type, slot, client_token = %token, "no volume to claim; creating one");
        match creator
            .create_once(&spec, &token, walk, &mut self.attach_attempts)
            .await?
        {
            Creation::Attached(volume) => {
                Ok(Some(self.claimed(volume, Origin::Created, slot).await?))
            }
            Creation::Lost => {
                self.lost_races += 1;
                Ok(None)
            }
            Creation::Again => Ok(None),
        }
    }
}

/// A volume nobody holds and that can be attached now.
fn free(v: &Volume) -> bool {
    v.state == VolumeState::Available && v.attachments.is_empty()
}

/// AttachVolume; `Ok(false)` when another instance got the volume first.
async fn try_attach(
    cloud_api: &dyn VolumeService,
    volume_id: &str,
    me: &str,
    device: &str,
    seed: u64,
    policy: RetryPolicy,
) -> Result<bool, Error> {
    match backoff::retry(policy, "AttachVolume", seed, || {
        cloud_api.attach_volume(volume_id, me, device)
    })
    .await
    {
        Ok(_) => Ok(true),
        // Lost the race, or the volume changed state under us: list again. (If an earlier try of
        // this very request took effect and only its reply was lost, the next listing shows the
        // volume attached here and it is reused.)
        Err(CloudError::VolumeInUse { .. } | CloudError::IncorrectState { .. }) => {
            debug!(
                volume_id,
                "volume was taken by another instance; looking again"
            );
            Ok(false)
        }
        Err(e) => Err(Error::Cloud {
            step: "attaching the volume",
            source: e,
        }),
    }
}

/// What became of a volume just created.
enum Fresh {
    Available,
    /// Someone else attached it first.
    Taken,
    /// It is deleted, failed, or unknown to EC2 for longer than a fresh volume stays invisible:
    /// the token named a volume that no longer exists.
    Gone(String),
}

/// Polls until the new volume is available (or taken, or gone).
async fn wait_available(
    cloud_api: &dyn VolumeService,
    config: &AttachConfig,
    volume_id: &str,
    gone_after: Duration,
    seed: u64,
    policy: RetryPolicy,
) -> Result<Fresh, Error> {
    let unseen: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let waited = backoff::poll(Schedule::CLOUD_STATE, config.timeouts.create, || async {
        match backoff::retry(policy, "DescribeVolumes", seed, || {
            cloud_api.volume(volume_id)
        })
        .await
        {
            Ok(v) => match v.state {
                VolumeState::Available => Ok(Poll::Ready(Fresh::Available)),
                VolumeState::InUse => Ok(Poll::Ready(Fresh::Taken)),
                VolumeState::Creating => Ok(Poll::Pending("creating".into())),
                VolumeState::Deleting | VolumeState::Deleted | VolumeState::Error => Ok(
                    Poll::Ready(Fresh::Gone(format!("{volume_id} is {}", v.state))),
                ),
                other => Err(Error::Cloud {
                    step: "waiting for the new volume",
                    source: CloudError::Api {
                        operation: "CreateVolume",
                        code: None,
                        message: format!("{volume_id} went to state {other} instead of available"),
                    },
                }),
            },
            // Describe is eventually consistent: a fresh volume may not be visible yet. One
            // that stays unknown is gone.
            Err(CloudError::NotFound { .. }) => {
                let since = *unseen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
                if since.elapsed() >= gone_after {
                    Ok(Poll::Ready(Fresh::Gone(format!(
                        "DescribeVolumes has not known {volume_id} for {}s",
                        since.elapsed().as_secs()
                    ))))
                } else {
                    Ok(Poll::Pending("not visible yet".into()))
                }
            }
            Err(e) => Err(Error::cloud("waiting for the new volume")(e)),
        }
    })
    .await?;
    waited.map_err(|t| Error::Timeout {
        what: format!("{volume_id} to become available"),
        waited: t.waited,
        last: t.last,
    })
}

/// Polls until EC2 reports the attachment to this instance as attached.
async fn wait_attached(
    cloud_api: &dyn VolumeService,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    volume_id: &str,
    policy: RetryPolicy,
) -> Result<Volume, Error> {
    let me = identity.instance_id.as_str();
    let seed = hash_str(me);
    let waited = backoff::poll(Schedule::CLOUD_STATE, config.timeouts.attach, || async {
        let v = backoff::retry(policy, "DescribeVolumes", seed, || {
            cloud_api.volume(volume_id)
        })
        .await
        .map_err(Error::cloud("waiting for the attachment"))?;
        match v.attachment_to(me).map(|a| a.state.clone()) {
            Some(AttachmentState::Attached) => Ok(Poll::Ready(v)),
            Some(AttachmentState::Attaching) => {
                Ok(Poll::Pending(format!("{volume_id} is attaching")))
            }
            // Describe is eventually consistent: right after AttachVolume it may not show yet.
            None if v.attachments.is_empty() => Ok(Poll::Pending(format!(
                "{volume_id} shows no attachment yet"
            ))),
            None => Err(Error::Lost {
                volume_id: volume_id.to_owned(),
                instance_id: me.to_owned(),
                state: format!(
                    "attached to {}",
                    v.attachments
                        .iter()
                        .map(|a| a.instance_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
            Some(other) => Err(Error::Lost {
                volume_id: volume_id.to_owned(),
                instance_id: me.to_owned(),
                state: other.to_string(),
            }),
        }
    })
    .await?;
    let volume = waited.map_err(|t| Error::Timeout {
        what: format!("{volume_id} to be attached to {me}"),
        waited: t.waited,
        last: t.last,
    })?;
    info!(volume_id, "volume attached");
    Ok(volume)
}
