//! The node's fixed-IP network interface: found by tags (or id), waited for while another
//! instance holds it, attached at the configured index, then waited for in EC2 and in the OS.

use cps_node::NodeHost;
use cps_provider::{
    AttachmentState, Error as CloudError, InstanceIdentity, InterfaceService, NetworkInterface,
    Tags, VolumeService,
};
use tokio::time::Instant;
use tracing::info;

use super::InterfaceOutcome;
use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str};
use crate::config::{AttachConfig, InterfaceOptions};
use crate::error::Error;

/// What finding and attaching the interface needs.
pub(super) struct Ask<'a> {
    pub(super) interfaces: &'a dyn InterfaceService,
    /// For the state of an instance holding the interface.
    pub(super) instances: &'a dyn VolumeService,
    pub(super) identity: &'a InstanceIdentity,
    /// The cluster's tags plus the node's id.
    pub(super) node_tags: &'a Tags,
    pub(super) opts: &'a InterfaceOptions,
    pub(super) config: &'a AttachConfig,
    pub(super) policy: RetryPolicy,
}

/// Finds this node's interface, waits while another instance holds it, attaches it, and waits
/// until both EC2 and the OS show it.
pub(super) async fn attach_interface(
    ask: &Ask<'_>,
    node: &dyn NodeHost,
) -> Result<InterfaceOutcome, Error> {
    let (eni, attached_now) = take(ask).await?;
    let eni = wait_attached(ask, &eni.id).await?;
    let os_name = wait_in_os(ask, node, &eni).await?;
    info!(interface_id = %eni.id, ip = eni.private_ip.as_deref().unwrap_or(""), os_name = %os_name, attached_now, "network interface ready");
    Ok(InterfaceOutcome {
        id: eni.id,
        private_ip: eni.private_ip,
        mac: eni.mac,
        os_name,
        attached_now,
    })
}

/// The node's interface: by its configured id, or the one carrying the node's tags (plus the
/// configured extra tags) in this zone.
async fn find(ask: &Ask<'_>) -> Result<NetworkInterface, Error> {
    let seed = hash_str(&ask.identity.instance_id);
    let zone = &ask.identity.availability_zone;
    if let Some(id) = &ask.opts.id {
        return match backoff::retry(ask.policy, "DescribeNetworkInterfaces", seed, || {
            ask.interfaces.interface(id)
        })
        .await
        {
            Ok(e) => Ok(e),
            Err(CloudError::NotFound { .. }) => Err(Error::NoInterface { what: id.clone() }),
            Err(e) => Err(Error::cloud("describing the network interface")(e)),
        };
    }
    let mut tags = ask.node_tags.clone();
    tags.extend(ask.opts.extra_tags.clone());
    let found = backoff::retry(ask.policy, "DescribeNetworkInterfaces", seed, || {
        ask.interfaces.interfaces_tagged(&tags)
    })
    .await
    .map_err(Error::cloud("finding the node's network interface"))?;
    let describe = || {
        tags.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (here, far): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|e| &e.availability_zone == zone);
    match here.as_slice() {
        [one] => Ok(one.clone()),
        [] if !far.is_empty() => Err(Error::WrongZone {
            what: "this node's network interface",
            resources: far
                .iter()
                .map(|e| format!("{} in {}", e.id, e.availability_zone))
                .collect::<Vec<_>>()
                .join(", "),
            zone: zone.clone(),
        }),
        [] => Err(Error::NoInterface {
            what: format!("tagged {}", describe()),
        }),
        many => Err(Error::Duplicates {
            what: format!("the network interface tagged {}", describe()),
            volumes: many
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Looks until the interface is attached here, or free to attach (then attaches it); waits,
/// within the release timeout, while another instance holds it. Returns whether it was
/// attached now.
async fn take(ask: &Ask<'_>) -> Result<(NetworkInterface, bool), Error> {
    let me = ask.identity.instance_id.as_str();
    let seed = hash_str(me);
    let release_timeout = ask.config.node.release_timeout;
    let started = Instant::now();
    let mut looks = 0;
    let mut last_holder = String::new();
    loop {
        let eni = find(ask).await?;
        if eni.availability_zone != ask.identity.availability_zone {
            return Err(Error::WrongZone {
                what: "this node's network interface",
                resources: format!("{} in {}", eni.id, eni.availability_zone),
                zone: ask.identity.availability_zone.clone(),
            });
        }
        match &eni.attachment {
            Some(a) if a.instance_id == me => return Ok((eni, false)),
            Some(a) => {
                let holder = holder(ask, &eni, &a.state, &a.instance_id).await?;
                if started.elapsed() >= release_timeout {
                    return Err(Error::Timeout {
                        what: "the network interface to be released by the instance holding it (never detached by cps)".into(),
                        waited: started.elapsed(),
                        last: holder,
                    });
                }
                if holder != last_holder {
                    info!(held = %holder, "the node's network interface is held by another instance; waiting for it to be released");
                    last_holder = holder;
                }
            }
            None => {
                info!(interface_id = %eni.id, device_index = ask.opts.device_index, ip = eni.private_ip.as_deref().unwrap_or(""), "attaching the node's network interface");
                match backoff::retry(ask.policy, "AttachNetworkInterface", seed, || {
                    ask.interfaces
                        .attach_interface(&eni.id, me, ask.opts.device_index)
                })
                .await
                {
                    Ok(_) => return Ok((eni, true)),
                    // Someone got it first (the old instance again?): look again after a
                    // pause, within the same release timeout as waiting for a holder.
                    Err(
                        e @ (CloudError::InterfaceInUse { .. } | CloudError::IncorrectState { .. }),
                    ) => {
                        if started.elapsed() >= release_timeout {
                            return Err(Error::Timeout {
                                what: "the network interface to become attachable".into(),
                                waited: started.elapsed(),
                                last: e.to_string(),
                            });
                        }
                    }
                    Err(e) => return Err(Error::cloud("attaching the network interface")(e)),
                }
            }
        }
        tokio::time::sleep(Schedule::CLOUD_STATE.delay(looks)).await;
        looks += 1;
    }
}

/// The instance holding the interface and its state, in words.
async fn holder(
    ask: &Ask<'_>,
    eni: &NetworkInterface,
    attachment: &AttachmentState,
    instance_id: &str,
) -> Result<String, Error> {
    let seed = hash_str(&ask.identity.instance_id);
    let ids = [instance_id.to_owned()];
    let states = backoff::retry(ask.policy, "DescribeInstances", seed, || {
        ask.instances.instance_states(&ids)
    })
    .await
    .map_err(Error::cloud(
        "looking up the instance holding the interface",
    ))?;
    let state = states
        .get(instance_id)
        .map(ToString::to_string)
        .unwrap_or_else(|| "unknown".into());
    Ok(format!(
        "{} ({attachment} to {instance_id}, which is {state})",
        eni.id
    ))
}

/// Waits until EC2 shows the interface attached here.
async fn wait_attached(ask: &Ask<'_>, id: &str) -> Result<NetworkInterface, Error> {
    let me = ask.identity.instance_id.as_str();
    let seed = hash_str(me);
    let waited = backoff::poll(Schedule::CLOUD_STATE, ask.opts.timeout, || async {
        let e = backoff::retry(ask.policy, "DescribeNetworkInterfaces", seed, || {
            ask.interfaces.interface(id)
        })
        .await
        .map_err(Error::cloud("waiting for the interface attachment"))?;
        Ok::<_, Error>(match &e.attachment {
            Some(a) if a.instance_id == me && a.state == AttachmentState::Attached => {
                Poll::Ready(e)
            }
            Some(a) => Poll::Pending(format!("{id} is {} to {}", a.state, a.instance_id)),
            None => Poll::Pending(format!("{id} shows no attachment yet")),
        })
    })
    .await?;
    waited.map_err(|t| Error::Timeout {
        what: format!("{id} to be attached to {me}"),
        waited: t.waited,
        last: t.last,
    })
}

/// Waits until the OS shows an interface with the attached one's MAC; returns its name.
async fn wait_in_os(
    ask: &Ask<'_>,
    node: &dyn NodeHost,
    eni: &NetworkInterface,
) -> Result<String, Error> {
    let mac = eni.mac.clone();
    let seen = backoff::poll(Schedule::DEVICE, ask.opts.timeout, || {
        let r = node.interface_by_mac(&mac).map(|n| match n {
            Some(name) => Poll::Ready(name),
            None => Poll::Pending(format!("no network interface with MAC {mac} in the OS yet")),
        });
        async move { r }
    })
    .await
    .map_err(|source| Error::Node { source })?;
    seen.map_err(|t| Error::Timeout {
        what: format!("{} to appear in the OS", eni.id),
        waited: t.waited,
        last: t.last,
    })
}
