//! Which volume (and interface) is this node's: the pool, a node id (configured, or from a tag
//! on the instance or its group), or a slot shared out among the instances booting now.

use cps_provider::{InstanceIdentity, ScalingGroup};
use tracing::info;

use super::Services;
use crate::backoff::{self, RetryPolicy, hash_str};
use crate::boot::claim::ClaimTarget;
use crate::config::{AttachConfig, Identity, check_node_id};
use crate::error::Error;

/// What to claim, and the node id when the identity names one.
pub(super) async fn claim_target(
    services: Services<'_>,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    group_name: Option<&str>,
    policy: RetryPolicy,
) -> Result<(ClaimTarget, Option<String>), Error> {
    let group = Group {
        services,
        name: group_name,
        seed: hash_str(&identity.instance_id),
        policy,
    };
    match &config.node.identity {
        Identity::Pool => Ok((ClaimTarget::pool(config), None)),
        Identity::NodeId {
            id,
            source_tag,
            id_tag,
        } => {
            let id = match id {
                Some(id) => id.clone(),
                None => tagged_node_id(&group, identity, source_tag).await?,
            };
            info!(node_id = %id, "node identity");
            let mut tags = config.tags.clone();
            tags.insert(id_tag.clone(), id.clone());
            let target = ClaimTarget::Node {
                tags,
                release_timeout: config.node.release_timeout,
            };
            Ok((target, Some(id)))
        }
        Identity::Slot { max, id_tag } => {
            // The instances booting here now share the slots out (see claim's slot module).
            let me = identity.instance_id.as_str();
            let mut peers: Vec<String> = group
                .describe()
                .await?
                .map(|g| {
                    g.instances
                        .into_iter()
                        .filter(|i| {
                            i.lifecycle_state.starts_with("Pending")
                                && i.availability_zone == identity.availability_zone
                        })
                        .map(|i| i.instance_id)
                        .collect()
                })
                .unwrap_or_default();
            if !peers.iter().any(|p| p == me) {
                peers.push(me.to_owned());
            }
            let target = ClaimTarget::Slot {
                tags: config.tags.clone(),
                key: id_tag.clone(),
                max: *max,
                peers,
            };
            Ok((target, None))
        }
    }
}

/// The instance's group, described only when the identity needs it (one request).
struct Group<'a> {
    services: Services<'a>,
    name: Option<&'a str>,
    seed: u64,
    policy: RetryPolicy,
}

impl Group<'_> {
    async fn describe(&self) -> Result<Option<ScalingGroup>, Error> {
        match self.name {
            Some(name) => {
                backoff::retry(self.policy, "DescribeAutoScalingGroups", self.seed, || {
                    self.services.lifecycle.group(name)
                })
                .await
                .map_err(Error::cloud("describing the Auto Scaling group"))
            }
            None => Ok(None),
        }
    }
}

/// The node id from `source_tag` on the instance, else on its group; checked exactly as a
/// configured id is.
async fn tagged_node_id(
    group: &Group<'_>,
    identity: &InstanceIdentity,
    source_tag: &str,
) -> Result<String, Error> {
    let me = identity.instance_id.as_str();
    let tags = backoff::retry(group.policy, "DescribeTags", group.seed, || {
        group.services.volumes.instance_tags(me)
    })
    .await
    .map_err(Error::cloud("reading the instance's tags"))?;
    let (value, origin) = match tags.get(source_tag) {
        Some(v) => (Some(v.clone()), format!("instance {me}")),
        None => (
            group
                .describe()
                .await?
                .and_then(|g| g.tags.get(source_tag).cloned()),
            format!("group {}", group.name.unwrap_or("?")),
        ),
    };
    let id = value.ok_or_else(|| Error::NoNodeId {
        instance_id: me.to_owned(),
        tag: source_tag.to_owned(),
    })?;
    check_node_id(&id).map_err(|reason| Error::BadNodeId {
        tag: source_tag.to_owned(),
        origin,
        value: id.clone(),
        reason: reason.to_owned(),
    })?;
    Ok(id)
}
