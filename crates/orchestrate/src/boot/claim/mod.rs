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

use std::collections::BTreeMap;
use std::time::Duration;

use cps_provider::{
    AttachmentState, Error as CloudError, InstanceIdentity, InstanceState, Tags, Volume,
    VolumeService, VolumeSpec, VolumeState,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str, mix};
use crate::config::AttachConfig;
use crate::error::Error;

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
}

/// Claims a volume for `target` and waits until EC2 reports it attached here.
pub async fn claim_volume(
    cloud_api: &dyn VolumeService,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    target: &ClaimTarget,
    policy: RetryPolicy,
) -> Result<Claim, Error> {
    let me = identity.instance_id.as_str();
    let seed = hash_str(me);
    let device_name = config.block_device.as_str();
    let started = Instant::now();
    let release_timeout = match target {
        ClaimTarget::Node {
            release_timeout, ..
        } => *release_timeout,
        _ => config.timeouts.attach,
    };
    // The whole claim may take as long as creating and attaching one volume, plus waiting for
    // a holder to let go.
    let claim_deadline = config.timeouts.create + config.timeouts.attach + release_timeout;
    let mut attach_attempts = 0u32;
    let mut creates = 0u32;
    let mut logged_elsewhere = false;
    let mut race_budget: Option<u32> = None;
    let mut lost_races = 0u32;
    let mut waiting: Option<(Instant, u32, String)> = None;
    let mut walks: BTreeMap<Tags, TokenWalk> = BTreeMap::new();
    let claimed = |volume: Volume, origin: Origin, attach_attempts: u32, slot: Option<u32>| async move {
        let claim = Claim {
            volume,
            instance_id: me.to_owned(),
            origin,
            attach_attempts,
            slot,
        };
        sole_holder_of_identity(cloud_api, target, &claim, seed, policy).await?;
        Ok(claim)
    };

    loop {
        if started.elapsed() > claim_deadline {
            return Err(Error::Timeout {
                what: "a volume to claim".into(),
                waited: started.elapsed(),
                last: format!("{attach_attempts} attach attempts, {creates} volumes created"),
            });
        }
        let volumes = backoff::retry(policy, "DescribeVolumes", seed, || {
            cloud_api.volumes_tagged(target.tags())
        })
        .await
        .map_err(Error::cloud("listing volumes by tag"))?;

        // Already attached to this instance? (Also what a lost AttachVolume reply looks like.)
        let mine: Vec<&Volume> = volumes
            .iter()
            .filter(|v| {
                v.attachment_to(me).is_some_and(|a| {
                    matches!(
                        a.state,
                        AttachmentState::Attaching | AttachmentState::Attached
                    )
                }) && (!matches!(target, ClaimTarget::Slot { .. }) || target.slot_of(v).is_some())
            })
            .collect();
        match mine.as_slice() {
            [] => {}
            [volume] => {
                refuse_unless_data_volume(volume, me)?;
                info!(volume_id = %volume.id, "volume with these tags is already attached to this instance; reusing it");
                let attached = volume
                    .attachment_to(me)
                    .is_some_and(|a| a.state == AttachmentState::Attached);
                let slot = target.slot_of(volume);
                let volume = if attached {
                    (*volume).clone()
                } else {
                    wait_attached(cloud_api, identity, config, &volume.id, policy).await?
                };
                return claimed(volume, Origin::Reused, attach_attempts, slot).await;
            }
            many => {
                return Err(Error::Ambiguous {
                    instance_id: me.to_owned(),
                    count: many.len(),
                    volumes: many
                        .iter()
                        .map(|v| v.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        // Every lost race means another instance got a volume; bounded by what there is to get.
        let pool = match target {
            ClaimTarget::Slot { max, .. } => volumes.len().max(*max as usize),
            _ => volumes.len(),
        };
        let budget = *race_budget.get_or_insert(4 * pool as u32 + 16);
        if lost_races > budget {
            return Err(Error::Exhausted {
                attempts: attach_attempts,
                detail: format!(
                    "lost {lost_races} races for a volume; the volumes keep being taken by other instances"
                ),
            });
        }

        let elsewhere: Vec<&Volume> = volumes
            .iter()
            .filter(|v| v.availability_zone != identity.availability_zone)
            .collect();
        if !elsewhere.is_empty() && !logged_elsewhere && !matches!(target, ClaimTarget::Node { .. })
        {
            logged_elsewhere = true;
            info!(
                zone = %identity.availability_zone,
                skipped = %elsewhere.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(","),
                "skipping matching volumes in other availability zones (EBS attaches within a zone only)"
            );
        }
        let here: Vec<&Volume> = volumes
            .iter()
            .filter(|v| v.availability_zone == identity.availability_zone)
            .collect();
        let free = |v: &&Volume| v.state == VolumeState::Available && v.attachments.is_empty();

        let next = match target {
            ClaimTarget::Pool { tags } => {
                let mut candidates: Vec<&Volume> = here.iter().copied().filter(free).collect();
                candidates.sort_by_key(|v| mix(seed ^ hash_str(&v.id)));
                match candidates.first() {
                    Some(v) => Next::Attach {
                        volume_id: v.id.clone(),
                        slot: None,
                    },
                    None => match leaving(cloud_api, &here, seed, policy).await? {
                        Some(what) => Next::Wait {
                            what,
                            timeout: config.timeouts.attach,
                        },
                        None => Next::Create {
                            tags: tags.clone(),
                            slot: None,
                        },
                    },
                }
            }
            ClaimTarget::Node {
                tags,
                release_timeout,
            } => match (here.as_slice(), elsewhere.as_slice()) {
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
                        zone: identity.availability_zone.clone(),
                    });
                }
                ([v], _) if free(v) => Next::Attach {
                    volume_id: v.id.clone(),
                    slot: None,
                },
                ([v], _) if v.attachments.is_empty() => Next::Wait {
                    what: format!("{} is {}", v.id, v.state),
                    timeout: *release_timeout,
                },
                ([v], _) => Next::Wait {
                    what: holders(cloud_api, &[*v], seed, policy).await?.1,
                    timeout: *release_timeout,
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
            },
            ClaimTarget::Slot {
                tags,
                key,
                max,
                peers,
            } => {
                let choice =
                    slot_next(cloud_api, target, &volumes, identity, peers, seed, policy).await?;
                match choice {
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
                        timeout: config.timeouts.attach,
                    },
                    SlotChoice::NoneFree => {
                        let (_, held) =
                            holders(cloud_api, &volumes.iter().collect::<Vec<_>>(), seed, policy)
                                .await?;
                        return Err(Error::NoFreeSlot {
                            max: *max,
                            zone: identity.availability_zone.clone(),
                            detail: held,
                        });
                    }
                }
            }
        };

        match next {
            Next::Wait { what, timeout } => {
                let (since, looks, last) =
                    waiting.get_or_insert_with(|| (Instant::now(), 0, String::new()));
                if since.elapsed() >= timeout {
                    return Err(Error::Timeout {
                        what: "the volume to be released by the instance holding it (never detached by cps)".into(),
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
            }
            Next::Attach { volume_id, slot } => {
                attach_attempts += 1;
                info!(volume_id = %volume_id, device = device_name, slot, "attaching existing volume");
                if try_attach(cloud_api, &volume_id, me, device_name, seed, policy).await? {
                    let volume =
                        wait_attached(cloud_api, identity, config, &volume_id, policy).await?;
                    return claimed(volume, Origin::Claimed, attach_attempts, slot).await;
                }
                lost_races += 1;
            }
            Next::Create { tags, slot } => {
                let pool = matches!(target, ClaimTarget::Pool { .. });
                // Pool mode makes a new volume per creation; node and slot modes cannot (the
                // token is the identity's), so only the race budget bounds them.
                if creates >= MAX_CREATES && pool {
                    return Err(Error::Exhausted {
                        attempts: attach_attempts,
                        detail: format!(
                            "created {creates} volumes and another instance claimed each before this one could attach it"
                        ),
                    });
                }
                let spec = volume_spec(identity, config, &tags);
                let walk = walks.entry(tags.clone()).or_default();
                if walk.generation >= MAX_GENERATIONS {
                    return Err(Error::Exhausted {
                        attempts: attach_attempts,
                        detail: format!(
                            "the volumes {MAX_GENERATIONS} creation tokens of this identity named are all gone (deleted while cps-attach ran?)"
                        ),
                    });
                }
                let token = if pool {
                    client_token(identity, &spec, creates)
                } else {
                    identity_token(&tags, walk.generation)
                };
                creates += 1;
                let creator = Creator {
                    cloud_api,
                    config,
                    identity,
                    pool,
                    seed,
                    policy,
                };
                info!(zone = %spec.availability_zone, size_gib = spec.size_gib, volume_type = %spec.volume_type, slot, client_token = %token, "no volume to claim; creating one");
                match creator
                    .create_once(&spec, &token, walk, &mut attach_attempts)
                    .await?
                {
                    Creation::Attached(volume) => {
                        return claimed(volume, Origin::Created, attach_attempts, slot).await;
                    }
                    Creation::Lost => lost_races += 1,
                    Creation::Again => {}
                }
            }
        }
    }
}

/// How one creation went.
enum Creation {
    Attached(Volume),
    /// Another instance attached the new volume first.
    Lost,
    /// List again: the identity's volume may show up, or the next token is due.
    Again,
}

/// Where an identity's creation token is: the generation in use, and since when the volume it
/// names (or the identity's volume, after IdempotentParameterMismatch) has been nowhere to see.
#[derive(Default)]
struct TokenWalk {
    generation: u32,
    unseen_since: Option<Instant>,
    looks: u32,
}

impl TokenWalk {
    fn next_token(&mut self, token: &str, why: &str) {
        info!(
            client_token = token,
            generation = self.generation,
            reason = why,
            "the volume this identity's creation token names is gone (deleted?); moving on to the next token"
        );
        *self = Self {
            generation: self.generation + 1,
            ..Self::default()
        };
    }
}

/// What a creation needs to know.
struct Creator<'a> {
    cloud_api: &'a dyn VolumeService,
    config: &'a AttachConfig,
    identity: &'a InstanceIdentity,
    pool: bool,
    seed: u64,
    policy: RetryPolicy,
}

impl Creator<'_> {
    /// CreateVolume with `token`, wait for the volume, attach it.
    async fn create_once(
        &self,
        spec: &VolumeSpec,
        token: &str,
        walk: &mut TokenWalk,
        attach_attempts: &mut u32,
    ) -> Result<Creation, Error> {
        let (cloud_api, seed, policy) = (self.cloud_api, self.seed, self.policy);
        let gone_after = GONE_AFTER.min(self.config.timeouts.create / 2);
        let created = match backoff::retry(policy, "CreateVolume", seed, || {
            cloud_api.create_volume(spec, token)
        })
        .await
        {
            Ok(v) => v,
            // Used with other settings: by another instance creating this identity's volume
            // (another zone or size; it shows up in a listing), or long ago for a volume since
            // deleted, when nothing ever shows up.
            Err(CloudError::IdempotencyMismatch { .. }) if !self.pool => {
                let since = *walk.unseen_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= gone_after {
                    let why = format!(
                        "it was used with other settings and no volume with this identity appeared for {}s",
                        since.elapsed().as_secs()
                    );
                    walk.next_token(token, &why);
                } else {
                    debug!("this identity's token was used with other settings; looking again");
                    tokio::time::sleep(Schedule::CLOUD_STATE.delay(walk.looks)).await;
                    walk.looks += 1;
                }
                return Ok(Creation::Again);
            }
            Err(e) => return Err(Error::cloud("creating a volume")(e)),
        };
        info!(volume_id = %created.id, "volume created");
        let me = self.identity.instance_id.as_str();
        match wait_available(
            cloud_api,
            self.config,
            &created.id,
            gone_after,
            seed,
            policy,
        )
        .await?
        {
            Fresh::Available => {}
            Fresh::Taken => {
                debug!(volume_id = %created.id, "the new volume was claimed by another instance; looking again");
                return Ok(Creation::Lost);
            }
            // Pool mode's next creation has a token of its own.
            Fresh::Gone(_) if self.pool => return Ok(Creation::Lost),
            Fresh::Gone(why) => {
                walk.next_token(token, &why);
                return Ok(Creation::Again);
            }
        }
        *attach_attempts += 1;
        let device = self.config.block_device.as_str();
        info!(volume_id = %created.id, device, "attaching new volume");
        if try_attach(cloud_api, &created.id, me, device, seed, policy).await? {
            let volume =
                wait_attached(cloud_api, self.identity, self.config, &created.id, policy).await?;
            return Ok(Creation::Attached(volume));
        }
        Ok(Creation::Lost)
    }
}

/// In node and slot modes, the identity must have exactly one volume. Should a second ever exist
/// (a token window passed, an operator copied a volume), only the lowest volume id keeps the
/// identity, and every other holder stops here, before it writes its identity anywhere.
async fn sole_holder_of_identity(
    cloud_api: &dyn VolumeService,
    target: &ClaimTarget,
    claim: &Claim,
    seed: u64,
    policy: RetryPolicy,
) -> Result<(), Error> {
    let (tags, what) = match target {
        ClaimTarget::Pool { .. } => return Ok(()),
        ClaimTarget::Node { tags, .. } => (tags.clone(), "this node".to_owned()),
        ClaimTarget::Slot { tags, key, .. } => {
            let Some(k) = claim.slot else { return Ok(()) };
            let mut t = tags.clone();
            t.insert(key.clone(), k.to_string());
            (t, format!("slot {k}"))
        }
    };
    let mut ids: Vec<String> = backoff::retry(policy, "DescribeVolumes", seed, || {
        cloud_api.volumes_tagged(&tags)
    })
    .await
    .map_err(Error::cloud("checking that the identity has one volume"))?
    .into_iter()
    .map(|v| v.id)
    .collect();
    ids.sort();
    if ids.len() > 1 && ids.first() != Some(&claim.volume.id) {
        return Err(Error::Duplicates {
            what: format!(
                "{what} (this instance attached {}, which is not the first)",
                claim.volume.id
            ),
            volumes: ids.join(", "),
        });
    }
    if ids.len() > 1 {
        warn!(volumes = %ids.join(", "), "{what} has more than one volume; this instance keeps the identity with the first, remove the others");
    }
    Ok(())
}

/// The states of the instances holding any of `held` (one DescribeInstances for all of them,
/// none when nothing is held), so a look costs one request however many volumes are held.
async fn holder_states(
    cloud_api: &dyn VolumeService,
    held: &[&Volume],
    seed: u64,
    policy: RetryPolicy,
) -> Result<BTreeMap<String, InstanceState>, Error> {
    let mut ids: Vec<String> = held
        .iter()
        .flat_map(|v| v.attachments.iter())
        .filter(|a| {
            !matches!(
                a.state,
                AttachmentState::Detaching | AttachmentState::Detached
            )
        })
        .map(|a| a.instance_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    backoff::retry(policy, "DescribeInstances", seed, || {
        cloud_api.instance_states(&ids)
    })
    .await
    .map_err(Error::cloud(
        "looking up the instances holding matching volumes",
    ))
}

/// Whether `v` is held, and only by instances going away (or detaching), and a description of
/// its holders for logs and errors.
fn describe_holders(v: &Volume, states: &BTreeMap<String, InstanceState>) -> (bool, String) {
    let mut going_away = !v.attachments.is_empty();
    let by: Vec<String> = v
        .attachments
        .iter()
        .map(|a| match a.state {
            AttachmentState::Detaching | AttachmentState::Detached => {
                format!("detaching from {}", a.instance_id)
            }
            _ => {
                let state = states.get(&a.instance_id);
                going_away &= state.is_some_and(InstanceState::is_going_away);
                let state = state
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "unknown".into());
                format!("{} to {}, which is {state}", a.state, a.instance_id)
            }
        })
        .collect();
    (going_away, format!("{} ({})", v.id, by.join("; ")))
}

/// Who holds `held` volumes and in what state: whether all of them are held only by
/// instances going away, and a description for logs and errors.
async fn holders(
    cloud_api: &dyn VolumeService,
    held: &[&Volume],
    seed: u64,
    policy: RetryPolicy,
) -> Result<(bool, String), Error> {
    let states = holder_states(cloud_api, held, seed, policy).await?;
    let described: Vec<(bool, String)> = held
        .iter()
        .filter(|v| !v.attachments.is_empty())
        .map(|v| describe_holders(v, &states))
        .collect();
    let going_away = !described.is_empty() && described.iter().all(|(g, _)| *g);
    let parts: Vec<String> = described.into_iter().map(|(_, d)| d).collect();
    Ok((going_away, parts.join("; ")))
}

/// A description of the volumes here held by servers going away, if any: worth waiting for.
async fn leaving(
    cloud_api: &dyn VolumeService,
    here: &[&Volume],
    seed: u64,
    policy: RetryPolicy,
) -> Result<Option<String>, Error> {
    let held: Vec<&Volume> = here
        .iter()
        .copied()
        .filter(|v| !v.attachments.is_empty())
        .collect();
    let states = holder_states(cloud_api, &held, seed, policy).await?;
    let leaving: Vec<String> = held
        .iter()
        .map(|v| describe_holders(v, &states))
        .filter(|(going_away, _)| *going_away)
        .map(|(_, what)| what)
        .collect();
    Ok((!leaving.is_empty()).then(|| leaving.join("; ")))
}

/// What slot mode does on one look.
enum SlotChoice {
    Attach {
        volume_id: String,
        slot: u32,
    },
    Create(u32),
    /// The slot this instance is to take is held by an instance going away.
    Wait {
        what: String,
    },
    NoneFree,
}

/// A slot this instance may take.
enum SlotCandidate<'a> {
    Free(&'a Volume),
    /// Held only by instances going away.
    Leaving(&'a Volume),
    /// No volume yet (or one still being created, which a create with the slot's token joins).
    Missing,
}

/// The slots of `target` with exactly one volume, by slot number; logs the duplicated ones.
fn volumes_by_slot<'a>(
    target: &ClaimTarget,
    volumes: &'a [Volume],
) -> BTreeMap<u32, Vec<&'a Volume>> {
    let mut by_slot: BTreeMap<u32, Vec<&Volume>> = BTreeMap::new();
    for v in volumes {
        match target.slot_of(v) {
            Some(k) => by_slot.entry(k).or_default().push(v),
            None => debug!(volume_id = %v.id, "volume has no valid slot tag; not a slot"),
        }
    }
    let duplicated: Vec<String> = by_slot
        .iter()
        .filter(|(_, vs)| vs.len() > 1)
        .map(|(k, vs)| {
            let ids: Vec<&str> = vs.iter().map(|v| v.id.as_str()).collect();
            format!("slot {k}: {}", ids.join(", "))
        })
        .collect();
    if !duplicated.is_empty() {
        warn!(duplicates = %duplicated.join("; "), "slots with more than one volume are skipped; remove or retag the extra volumes");
    }
    by_slot
}

/// The slots this instance may take, best first: free ones in `zone`, then (when `states` is
/// known) ones there held only by instances going away, then ones with no volume yet. Slots with
/// two volumes, held by a running instance or in another zone are left out.
fn slot_candidates<'a>(
    by_slot: &BTreeMap<u32, Vec<&'a Volume>>,
    max: u32,
    zone: &str,
    states: Option<&BTreeMap<String, InstanceState>>,
) -> Vec<(u32, SlotCandidate<'a>)> {
    let (mut free, mut leaving, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for k in 1..=max {
        match by_slot.get(&k).map(Vec::as_slice) {
            None => missing.push((k, SlotCandidate::Missing)),
            Some([v]) if v.availability_zone == zone => {
                if v.attachments.is_empty() {
                    match v.state {
                        VolumeState::Available => free.push((k, SlotCandidate::Free(v))),
                        VolumeState::Creating => missing.push((k, SlotCandidate::Missing)),
                        _ => {}
                    }
                } else if let Some(states) = states
                    && describe_holders(v, states).0
                {
                    leaving.push((k, SlotCandidate::Leaving(v)));
                }
            }
            _ => {}
        }
    }
    free.extend(leaving);
    free.extend(missing);
    free
}

/// This instance's place among its booting peers that hold no slot yet (by instance id), so
/// that peers seeing the same slots take different ones.
fn slot_rank(by_slot: &BTreeMap<u32, Vec<&Volume>>, peers: &[String], me: &str) -> usize {
    let claimed: std::collections::BTreeSet<&str> = by_slot
        .values()
        .flatten()
        .flat_map(|v| v.attachments.iter())
        .filter(|a| {
            matches!(
                a.state,
                AttachmentState::Attaching | AttachmentState::Attached
            )
        })
        .map(|a| a.instance_id.as_str())
        .collect();
    let mut unclaimed: Vec<&str> = peers
        .iter()
        .map(String::as_str)
        .filter(|p| *p != me && !claimed.contains(p))
        .collect();
    unclaimed.push(me);
    unclaimed.sort_unstable();
    unclaimed.iter().position(|p| *p == me).unwrap_or(0)
}

/// Slot mode's decision on one look: the candidate at this instance's rank (beyond the
/// candidates — more peers than slots, or peers that left — one in this instance's own order,
/// so the rest contend by AttachVolume). Holders are looked up only when the free slots do not
/// reach this rank.
async fn slot_next(
    cloud_api: &dyn VolumeService,
    target: &ClaimTarget,
    volumes: &[Volume],
    identity: &InstanceIdentity,
    peers: &[String],
    seed: u64,
    policy: RetryPolicy,
) -> Result<SlotChoice, Error> {
    let ClaimTarget::Slot { max, .. } = target else {
        return Ok(SlotChoice::NoneFree);
    };
    let zone = identity.availability_zone.as_str();
    let by_slot = volumes_by_slot(target, volumes);
    let rank = slot_rank(&by_slot, peers, &identity.instance_id);
    let mut candidates = slot_candidates(&by_slot, *max, zone, None);
    let free = candidates
        .iter()
        .take_while(|(_, c)| matches!(c, SlotCandidate::Free(_)))
        .count();
    let mut states = BTreeMap::new();
    if rank >= free {
        let held: Vec<&Volume> = by_slot
            .values()
            .flatten()
            .copied()
            .filter(|v| v.availability_zone == zone && !v.attachments.is_empty())
            .collect();
        states = holder_states(cloud_api, &held, seed, policy).await?;
        candidates = slot_candidates(&by_slot, *max, zone, Some(&states));
    }
    let pick = candidates.get(rank).or_else(|| {
        candidates
            .iter()
            .min_by_key(|(k, _)| mix(seed ^ u64::from(*k)))
    });
    Ok(match pick {
        None => SlotChoice::NoneFree,
        Some((k, SlotCandidate::Free(v))) => SlotChoice::Attach {
            volume_id: v.id.clone(),
            slot: *k,
        },
        Some((k, SlotCandidate::Leaving(v))) => SlotChoice::Wait {
            what: format!("slot {k}: {}", describe_holders(v, &states).1),
        },
        Some((k, SlotCandidate::Missing)) => SlotChoice::Create(*k),
    })
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
