//! Where a volume cps-attach creates gets its content: a given snapshot, or the newest
//! completed one carrying the volume's tags (or configured ones).

use cps_provider::{Snapshot, SnapshotState, Tags, VolumeService};
use tracing::info;

use crate::backoff::{self, RetryPolicy};
use crate::config::{AttachConfig, SnapshotSource};
use crate::error::Error;

/// The snapshot a volume created with `tags` starts from, if the configuration names one.
pub(super) async fn snapshot_for(
    cloud: &dyn VolumeService,
    config: &AttachConfig,
    tags: &Tags,
    seed: u64,
    policy: RetryPolicy,
) -> Result<Option<Snapshot>, Error> {
    match &config.restore.source {
        None => Ok(None),
        Some(SnapshotSource::Id(id)) => {
            let snapshot = backoff::retry(policy, "DescribeSnapshots", seed, || cloud.snapshot(id))
                .await
                .map_err(Error::cloud("reading the snapshot to restore from"))?;
            if snapshot.state != SnapshotState::Completed {
                return Err(Error::SnapshotNotReady {
                    snapshot_id: snapshot.id,
                    state: snapshot.state.to_string(),
                });
            }
            Ok(Some(snapshot))
        }
        Some(SnapshotSource::Latest {
            tags: chosen,
            or_empty,
        }) => {
            let wanted = chosen.as_ref().unwrap_or(tags);
            let found = backoff::retry(policy, "DescribeSnapshots", seed, || {
                cloud.snapshots_tagged(wanted)
            })
            .await
            .map_err(Error::cloud(
                "looking for the newest snapshot to restore from",
            ))?;
            match newest_completed(found) {
                Some(s) => Ok(Some(s)),
                None if *or_empty => {
                    info!(tags = %describe(wanted), "no completed snapshot carries the node's tags; its volume starts empty");
                    Ok(None)
                }
                None => Err(Error::NoSnapshot {
                    tags: describe(wanted),
                }),
            }
        }
    }
}

/// The newest completed snapshot (by start time, then id for a stable choice).
pub(super) fn newest_completed(found: Vec<Snapshot>) -> Option<Snapshot> {
    found
        .into_iter()
        .filter(|s| s.state == SnapshotState::Completed)
        .max_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)))
}

fn describe(tags: &Tags) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
