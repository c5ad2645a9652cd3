//! What the boot writes for the node: the identity environment (the env file, and the
//! hooks' extra environment) and the node files, templates filled from it.

use cps_node::NodeFile;
use cps_provider::InstanceIdentity;
use tracing::info;

use super::{Hosts, InterfaceOutcome, Services, blocking};
use crate::backoff::{self, RetryPolicy, hash_str};
use crate::boot::device::AttachOutcome;
use crate::config::AttachConfig;
use crate::error::Error;

/// Writes the env file, then the node files; returns how many files changed. Every secret is
/// read before any file is written: a missing one writes nothing.
pub(super) async fn write_node_files(
    services: Services<'_>,
    hosts: &Hosts,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    env: &[(String, String)],
    policy: RetryPolicy,
) -> Result<usize, Error> {
    let seed = hash_str(&identity.instance_id);
    let node = hosts.node.clone();
    let (path, vars) = (config.node.env_file.clone(), env.to_vec());
    blocking(move || node.write_env_file(&path, &vars)).await?;
    info!(env_file = %config.node.env_file.display(), "identity written");

    let mut fetched = Vec::with_capacity(config.node.files.len());
    for spec in &config.node.files {
        fetched.push(match &spec.secret {
            None => None,
            Some(secret) => Some(
                backoff::retry(policy, "reading a secret", seed, || {
                    services.secrets.secret(secret)
                })
                .await
                .map_err(|source| Error::Secret {
                    path: spec.path.clone(),
                    secret: secret.clone(),
                    source: Box::new(source),
                })?,
            ),
        });
    }
    let mut files_changed = 0;
    for (spec, fetched) in config.node.files.iter().zip(fetched) {
        let content = if let Some(value) = fetched {
            value.into_bytes()
        } else if spec.template {
            fill(&String::from_utf8_lossy(&spec.content), env).into_bytes()
        } else {
            spec.content.clone()
        };
        let file = NodeFile {
            path: spec.path.clone(),
            content,
            mode: spec.mode,
            ownership: spec.ownership.clone(),
        };
        let node = hosts.node.clone();
        if blocking(move || node.write_file(&file)).await? {
            files_changed += 1;
            info!(path = %spec.path.display(), "node file written");
        }
    }
    Ok(files_changed)
}

/// The identity environment: the env file's content and the hooks' extra environment.
pub(super) fn environment(
    identity: &InstanceIdentity,
    config: &AttachConfig,
    attach: &AttachOutcome,
    node_id: Option<&str>,
    slot: Option<u32>,
    interface: Option<&InterfaceOutcome>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("CPS_INSTANCE_ID", identity.instance_id.clone()),
        ("CPS_REGION", identity.region.clone()),
        ("CPS_AVAILABILITY_ZONE", identity.availability_zone.clone()),
    ];
    if let Some(id) = node_id {
        env.push(("CPS_NODE_ID", id.to_owned()));
    }
    if let Some(s) = slot {
        env.push(("CPS_SLOT", s.to_string()));
    }
    env.extend([
        ("CPS_VOLUME_ID", attach.volume_id.clone()),
        ("CPS_DEVICE", attach.device.display().to_string()),
        ("CPS_MOUNT_PATH", config.mount.target.display().to_string()),
        (
            "CPS_FILESYSTEM",
            attach.filesystem.filesystem().fstype.clone(),
        ),
    ]);
    if let Some(i) = interface {
        env.push(("CPS_ENI_ID", i.id.clone()));
        if let Some(ip) = &i.private_ip {
            env.push(("CPS_ENI_IP", ip.clone()));
        }
        env.push(("CPS_ENI_MAC", i.mac.clone()));
        env.push(("CPS_ENI_INTERFACE", i.os_name.clone()));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Replaces `${NAME}` for every NAME in `env`, in one pass (a value is never expanded again);
/// anything else is left as written. The configuration already refused unknown `${CPS_…}`.
pub fn fill(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}').map(|end| (&after[..end], end)) {
            Some((name, end)) => match env.iter().find(|(k, _)| k == name) {
                Some((_, v)) => {
                    out.push_str(v);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str("${");
                    rest = after;
                }
            },
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_others_left() {
        let env = vec![
            ("CPS_NODE_ID".to_string(), "2".to_string()),
            ("CPS_ENI_IP".to_string(), "10.0.1.12".to_string()),
        ];
        assert_eq!(
            fill(
                "broker.id=${CPS_NODE_ID}\nlisteners=PLAINTEXT://${CPS_ENI_IP}:9092\nhome=${HOME}\n",
                &env
            ),
            "broker.id=2\nlisteners=PLAINTEXT://10.0.1.12:9092\nhome=${HOME}\n"
        );
        let tricky = vec![
            ("CPS_A".to_string(), "${CPS_B}".to_string()),
            ("CPS_B".to_string(), "b".to_string()),
        ];
        assert_eq!(
            fill("${CPS_A} ${CPS_B} ${ unclosed", &tricky),
            "${CPS_B} b ${ unclosed",
            "no second expansion"
        );
    }
}
