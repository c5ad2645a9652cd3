//! Slot mode: which slot this instance takes, by its rank among the instances booting now.

use std::collections::{BTreeMap, BTreeSet};

use cps_provider::{
    AttachmentState, InstanceIdentity, InstanceState, Volume, VolumeService, VolumeState,
};
use tracing::{debug, warn};

use crate::backoff::{RetryPolicy, mix};
use crate::error::Error;

use super::holders::{describe_holders, holder_states};
use super::*;

/// What slot mode does on one look.
pub(super) enum SlotChoice {
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
pub(super) enum SlotCandidate<'a> {
    Free(&'a Volume),
    /// Held only by instances going away.
    Leaving(&'a Volume),
    /// No volume yet (or one still being created, which a create with the slot's token joins).
    Missing,
}

/// The slots of `target` with exactly one volume, by slot number; logs the duplicated ones.
pub(super) fn volumes_by_slot<'a>(
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
pub(super) fn slot_candidates<'a>(
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
pub(super) fn slot_rank(
    by_slot: &BTreeMap<u32, Vec<&Volume>>,
    peers: &[String],
    me: &str,
) -> usize {
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
pub(super) async fn slot_next(
    cloud_api: &dyn VolumeService,
    target: &ClaimTarget,
    volumes: &[Volume],
    identity: &InstanceIdentity,
    skip: &BTreeSet<u32>,
    seed: u64,
    policy: RetryPolicy,
) -> Result<SlotChoice, Error> {
    let ClaimTarget::Slot { max, peers, .. } = target else {
        return Ok(SlotChoice::NoneFree);
    };
    let zone = identity.availability_zone.as_str();
    let by_slot = volumes_by_slot(target, volumes);
    let rank = slot_rank(&by_slot, peers, &identity.instance_id);
    let mut candidates = slot_candidates(&by_slot, *max, zone, None);
    candidates.retain(|(k, _)| !skip.contains(k));
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
        candidates.retain(|(k, _)| !skip.contains(k));
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
