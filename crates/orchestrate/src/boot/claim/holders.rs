//! Who holds a volume, and whether that instance is going away.

use std::collections::BTreeMap;

use cps_provider::{AttachmentState, InstanceState, Volume, VolumeService};
use tracing::warn;

use crate::backoff::{self, RetryPolicy};
use crate::error::Error;

use super::*;

/// In node and slot modes, the identity must have exactly one volume. Should a second ever exist
/// (a token window passed, an operator copied a volume), only the lowest volume id keeps the
/// identity, and every other holder stops here, before it writes its identity anywhere.
pub(super) async fn sole_holder_of_identity(
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
pub(super) async fn holder_states(
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
pub(super) fn describe_holders(
    v: &Volume,
    states: &BTreeMap<String, InstanceState>,
) -> (bool, String) {
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
pub(super) async fn holders(
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
pub(super) async fn leaving(
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
