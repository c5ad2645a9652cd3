//! Snapshots and what EBS allows with them: CreateSnapshot (tags in the same request) is
//! `pending` for a while, then `completed` (or `error`); a volume is created from a completed
//! snapshot only, in any zone of the region, at least as large as the snapshot; DeleteTags by
//! key; DeleteVolume refused while the volume is attached.

use std::time::Duration;

use tokio::time::Instant;

use super::{CREATE_VOLUME, World};
use crate::{Error, Snapshot, SnapshotState, Tags, VolumeSpec, VolumeState};

pub const CREATE_SNAPSHOT: &str = "CreateSnapshot";
pub const DESCRIBE_SNAPSHOTS: &str = "DescribeSnapshots";
pub const DELETE_TAGS: &str = "DeleteTags";
pub const DELETE_VOLUME: &str = "DeleteVolume";

/// Told of each snapshot as it is created, inside that request (see [`World::on_snapshot`]).
pub(super) type Observer = Box<dyn Fn(&Snapshot) + Send>;

pub(super) struct StoredSnapshot {
    snapshot: Snapshot,
    started_at: Instant,
    completed_at: Instant,
    /// Set by [`World::fail_snapshot`]: `error` for good.
    failed: bool,
}

impl StoredSnapshot {
    fn observe(&self, now: Instant) -> Snapshot {
        let mut s = self.snapshot.clone();
        (s.state, s.progress_percent) = if self.failed {
            (SnapshotState::Error, Some(0))
        } else if now >= self.completed_at {
            (SnapshotState::Completed, Some(100))
        } else {
            let total = (self.completed_at - self.started_at).as_secs_f64();
            let done = (now - self.started_at).as_secs_f64() / total;
            (SnapshotState::Pending, Some((done * 100.0) as i64))
        };
        s
    }
}

fn snapshot_not_found(operation: &'static str, snapshot_id: &str) -> Error {
    Error::NotFound {
        operation,
        resource: snapshot_id.to_owned(),
        message: format!("InvalidSnapshot.NotFound: The snapshot '{snapshot_id}' does not exist."),
    }
}

impl World {
    /// How long snapshots started from now on stay `pending` (zero: completed at once).
    pub fn set_snapshot_delay(&mut self, delay: Duration) {
        self.snapshot_delay = delay;
    }

    /// Makes a snapshot fail (`error`), as EBS may; a completed one fails too (a test's choice).
    pub fn fail_snapshot(&mut self, snapshot_id: &str) {
        if let Some(s) = self.snapshots.get_mut(snapshot_id) {
            s.failed = true;
        }
    }

    /// Calls `observer` with every snapshot created from now on, at the moment it is created
    /// (inside the request, under the world's lock: it must not call the cloud).
    pub fn on_snapshot(&mut self, observer: impl Fn(&Snapshot) + Send + 'static) {
        self.snapshot_observers.push(Box::new(observer));
    }

    /// Starts a snapshot of `volume_id` with AWS's rules; used by the API and by test setup.
    /// (The description is not part of [`Snapshot`]; nothing reads it back.)
    pub fn create_snapshot(
        &mut self,
        volume_id: &str,
        _description: &str,
        tags: &Tags,
    ) -> Result<Snapshot, Error> {
        let now = Instant::now();
        let volume = self.volume_now(volume_id, CREATE_SNAPSHOT)?;
        if !matches!(volume.state, VolumeState::Available | VolumeState::InUse) {
            return Err(Error::IncorrectState {
                operation: CREATE_SNAPSHOT,
                resource: volume_id.to_owned(),
                message: format!(
                    "IncorrectState: The volume '{volume_id}' is '{}'.",
                    volume.state
                ),
            });
        }
        self.next_id += 1;
        let id = format!("snap-{:017x}", 0x05a9_0000_0000u64 + self.next_id);
        let stored = StoredSnapshot {
            snapshot: Snapshot {
                id: id.clone(),
                volume_id: volume_id.to_owned(),
                state: SnapshotState::Pending,
                progress_percent: Some(0),
                started: Some(self.system_time(now)),
                size_gib: volume.size_gib,
                encrypted: volume.encrypted,
                tags: tags.clone(),
            },
            started_at: now,
            completed_at: now + self.snapshot_delay,
            failed: false,
        };
        let observed = stored.observe(now);
        self.snapshots.insert(id, stored);
        for observer in &self.snapshot_observers {
            observer(&observed);
        }
        Ok(observed)
    }

    /// One snapshot as it is now.
    pub fn snapshot_now(&self, snapshot_id: &str) -> Result<Snapshot, Error> {
        self.snapshots
            .get(snapshot_id)
            .map(|s| s.observe(Instant::now()))
            .ok_or_else(|| snapshot_not_found(DESCRIBE_SNAPSHOTS, snapshot_id))
    }

    /// Every snapshot carrying all of `tags`, in any state, oldest first.
    pub fn snapshots_tagged(&self, tags: &Tags) -> Vec<Snapshot> {
        let now = Instant::now();
        let mut found: Vec<(Instant, Snapshot)> = self
            .snapshots
            .values()
            .filter(|s| tags.iter().all(|(k, v)| s.snapshot.tags.get(k) == Some(v)))
            .map(|s| (s.started_at, s.observe(now)))
            .collect();
        found.sort_by_key(|(at, _)| *at);
        found.into_iter().map(|(_, s)| s).collect()
    }

    /// Whether AWS would create `spec` now as far as its snapshot goes: `Ok(true)` when the
    /// snapshot is encrypted (so is the volume). No snapshot: `Ok(false)`.
    pub(super) fn check_restore(&self, spec: &VolumeSpec) -> Result<bool, Error> {
        let refuse = |code: &str, message: String| Error::Api {
            operation: CREATE_VOLUME,
            code: Some(code.into()),
            message: format!("{code}: {message}"),
        };
        let Some(snapshot_id) = &spec.snapshot_id else {
            return match spec.initialization_rate {
                Some(_) => Err(refuse(
                    "InvalidParameterCombination",
                    "VolumeInitializationRate can be specified only with SnapshotId.".into(),
                )),
                None => Ok(false),
            };
        };
        if let Some(rate) = spec.initialization_rate
            && !(100..=300).contains(&rate)
        {
            return Err(refuse(
                "InvalidParameterValue",
                format!("Volume initialization rate {rate} MiB/s is invalid: 100-300 MiB/s."),
            ));
        }
        let snapshot = self
            .snapshots
            .get(snapshot_id)
            .map(|s| s.observe(Instant::now()))
            .ok_or_else(|| snapshot_not_found(CREATE_VOLUME, snapshot_id))?;
        if snapshot.state != SnapshotState::Completed {
            return Err(Error::IncorrectState {
                operation: CREATE_VOLUME,
                resource: snapshot_id.clone(),
                message: format!(
                    "IncorrectState: Snapshot '{snapshot_id}' is in {} state.",
                    snapshot.state
                ),
            });
        }
        if spec.size_gib < snapshot.size_gib {
            return Err(refuse(
                "InvalidParameterValue",
                format!(
                    "Volume of {}GiB is too small; minimum is {}GiB.",
                    spec.size_gib, snapshot.size_gib
                ),
            ));
        }
        Ok(snapshot.encrypted)
    }

    /// DeleteTags by key (whatever the value) on a volume.
    pub(super) fn untag_volume(&mut self, volume_id: &str, keys: &[String]) -> Result<(), Error> {
        let stored = self
            .volumes
            .get_mut(volume_id)
            .ok_or_else(|| Error::NotFound {
                operation: DELETE_TAGS,
                resource: volume_id.to_owned(),
                message: format!(
                    "InvalidVolume.NotFound: The volume '{volume_id}' does not exist."
                ),
            })?;
        for key in keys {
            stored.volume.tags.remove(key);
        }
        Ok(())
    }

    /// DeleteVolume with AWS's refusals: attached (also detaching) → VolumeInUse; creating →
    /// IncorrectState.
    pub(super) fn delete_volume_checked(&mut self, volume_id: &str) -> Result<(), Error> {
        let volume = self.volume_now(volume_id, DELETE_VOLUME)?;
        if let Some(a) = volume.attachments.first() {
            return Err(Error::VolumeInUse {
                volume_id: volume_id.to_owned(),
                message: format!(
                    "VolumeInUse: Volume {volume_id} is currently attached to {}",
                    a.instance_id
                ),
            });
        }
        if volume.state != VolumeState::Available {
            return Err(Error::IncorrectState {
                operation: DELETE_VOLUME,
                resource: volume_id.to_owned(),
                message: format!(
                    "IncorrectState: The volume '{volume_id}' is '{}'.",
                    volume.state
                ),
            });
        }
        self.delete_volume(volume_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::memory::{ATTACH_VOLUME, Fault, MemoryCloud, Timing};
    use crate::{VolumeService, VolumeSpec};

    const DELAY: Duration = Duration::from_secs(30);

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cloud_with_volume() -> (MemoryCloud, String) {
        let cloud = MemoryCloud::default();
        let vol = cloud.with(|w| {
            w.set_snapshot_delay(DELAY);
            w.add_instance("i-1", "az-a");
            w.add_volume("az-a", 10, &tags(&[("cps:node", "1")]))
        });
        (cloud, vol)
    }

    fn from(snapshot_id: &str, zone: &str, size_gib: i32) -> VolumeSpec {
        VolumeSpec {
            snapshot_id: Some(snapshot_id.to_owned()),
            ..VolumeSpec::gp3(zone, size_gib, &tags(&[("cps:node", "1")]))
        }
    }

    fn code(err: &Error) -> Option<&str> {
        match err {
            Error::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_is_pending_then_completed_with_its_tags_and_source_size() {
        let (cloud, vol) = cloud_with_volume();
        let t = tags(&[("cps:cluster", "kafka"), ("cps:node", "1")]);
        let s = cloud.create_snapshot(&vol, "node 1", &t).await.unwrap();
        assert_eq!(
            (s.state, s.volume_id.as_str(), s.size_gib, s.encrypted),
            (SnapshotState::Pending, vol.as_str(), 10, true)
        );
        assert_eq!(s.tags, t, "tags come with the creation");
        assert!(s.id.starts_with("snap-") && s.started.is_some());
        tokio::time::advance(DELAY / 2).await;
        let half = cloud.snapshot(&s.id).await.unwrap();
        assert_eq!(half.state, SnapshotState::Pending);
        assert!(half.progress_percent.is_some_and(|p| (40..60).contains(&p)));
        tokio::time::advance(DELAY / 2).await;
        let done = cloud.snapshot(&s.id).await.unwrap();
        assert_eq!(
            (done.state, done.progress_percent),
            (SnapshotState::Completed, Some(100))
        );
        assert_eq!(SnapshotState::Completed.to_string(), "completed");
        assert_eq!(
            SnapshotState::parse("pending"),
            Some(SnapshotState::Pending)
        );
        assert_eq!(SnapshotState::parse("recoverable"), None);
        assert_eq!(cloud.calls().count(CREATE_SNAPSHOT), 1);
        assert_eq!(cloud.calls().count(DESCRIBE_SNAPSHOTS), 2);

        let err = cloud.snapshot("snap-0000000000000dead").await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(
            err.to_string().contains("InvalidSnapshot.NotFound"),
            "{err}"
        );
        let err = cloud.create_snapshot("vol-missing", "", &t).await;
        assert!(matches!(err, Err(Error::NotFound { .. })), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn snapshots_are_found_by_every_tag_in_any_state_oldest_first() {
        let (cloud, vol) = cloud_with_volume();
        let node1 = tags(&[("cps:cluster", "kafka"), ("cps:node", "1")]);
        let first = cloud.create_snapshot(&vol, "", &node1).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let failed = cloud.create_snapshot(&vol, "", &node1).await.unwrap();
        cloud.with(|w| w.fail_snapshot(&failed.id));
        cloud
            .create_snapshot(
                &vol,
                "",
                &tags(&[("cps:cluster", "kafka"), ("cps:node", "2")]),
            )
            .await
            .unwrap();
        let found = cloud.snapshots_tagged(&node1).await.unwrap();
        assert_eq!(
            found
                .iter()
                .map(|s| (s.id.as_str(), s.state))
                .collect::<Vec<_>>(),
            [
                (first.id.as_str(), SnapshotState::Pending),
                (failed.id.as_str(), SnapshotState::Error)
            ]
        );
        let all = cloud
            .snapshots_tagged(&tags(&[("cps:cluster", "kafka")]))
            .await
            .unwrap();
        assert_eq!(all.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_volume_is_restored_only_from_a_completed_snapshot_of_at_most_its_size() {
        let (cloud, vol) = cloud_with_volume();
        let s = cloud.create_snapshot(&vol, "", &Tags::new()).await.unwrap();
        let err = cloud
            .create_volume(&from(&s.id, "az-b", 10), "t-pending")
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::IncorrectState { ref resource, .. } if *resource == s.id),
            "{err}"
        );
        assert!(err.to_string().contains("pending state"), "{err}");
        tokio::time::advance(DELAY).await;
        let err = cloud
            .create_volume(&from(&s.id, "az-b", 9), "t-small")
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some("InvalidParameterValue"), "{err}");
        assert!(err.to_string().contains("minimum is 10GiB"), "{err}");
        let err = cloud
            .create_volume(&from("snap-0000000000000dead", "az-b", 10), "t-unknown")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");

        // Another zone (snapshots are regional), larger: fine, and it says where it came from.
        let restored = cloud
            .create_volume(&from(&s.id, "az-b", 20), "t-ok")
            .await
            .unwrap();
        assert_eq!(
            (
                restored.availability_zone.as_str(),
                restored.size_gib,
                restored.snapshot_id.as_deref()
            ),
            ("az-b", 20, Some(s.id.as_str()))
        );
        assert_eq!(
            cloud.volume(&restored.id).await.unwrap().snapshot_id,
            Some(s.id.clone())
        );
        assert_eq!(cloud.volume(&vol).await.unwrap().snapshot_id, None);
        // The same token and spec: the same volume; the same token, another snapshot: refused.
        let again = cloud
            .create_volume(&from(&s.id, "az-b", 20), "t-ok")
            .await
            .unwrap();
        assert_eq!(again.id, restored.id);
        let other = cloud.create_snapshot(&vol, "", &Tags::new()).await.unwrap();
        tokio::time::advance(DELAY).await;
        let err = cloud
            .create_volume(&from(&other.id, "az-b", 20), "t-ok")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::IdempotencyMismatch { .. }), "{err}");
        // A failed snapshot makes no volume.
        cloud.with(|w| w.fail_snapshot(&other.id));
        let err = cloud
            .create_volume(&from(&other.id, "az-b", 20), "t-failed")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("error state"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_initialization_rate_needs_a_snapshot_and_a_rate_aws_offers() {
        let (cloud, vol) = cloud_with_volume();
        let s = cloud.create_snapshot(&vol, "", &Tags::new()).await.unwrap();
        tokio::time::advance(DELAY).await;
        let with_rate = |snapshot: Option<&str>, rate| VolumeSpec {
            snapshot_id: snapshot.map(str::to_owned),
            initialization_rate: Some(rate),
            ..VolumeSpec::gp3("az-a", 10, &Tags::new())
        };
        let err = cloud
            .create_volume(&with_rate(None, 200), "r1")
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some("InvalidParameterCombination"), "{err}");
        for rate in [99, 301] {
            let err = cloud
                .create_volume(&with_rate(Some(&s.id), rate), &format!("r-{rate}"))
                .await
                .unwrap_err();
            assert_eq!(code(&err), Some("InvalidParameterValue"), "{rate}: {err}");
        }
        for rate in [100, 300] {
            cloud
                .create_volume(&with_rate(Some(&s.id), rate), &format!("ok-{rate}"))
                .await
                .unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tags_are_removed_by_key_and_attached_volumes_are_not_deleted() {
        let (cloud, vol) = cloud_with_volume();
        cloud
            .tag_volume(&vol, &tags(&[("cps:cluster", "kafka"), ("keep", "me")]))
            .await
            .unwrap();
        cloud
            .untag_volume(
                &vol,
                &["cps:node".into(), "cps:cluster".into(), "absent".into()],
            )
            .await
            .unwrap();
        assert_eq!(
            cloud.volume(&vol).await.unwrap().tags,
            tags(&[("keep", "me")])
        );
        cloud.untag_volume(&vol, &[]).await.unwrap();
        assert_eq!(
            cloud.calls().count(DELETE_TAGS),
            1,
            "no keys: nothing is sent (DeleteTags without keys removes every tag)"
        );
        let err = cloud.untag_volume("vol-missing", &["keep".into()]).await;
        assert!(matches!(err, Err(Error::NotFound { .. })), "{err:?}");

        let s = cloud.create_snapshot(&vol, "", &Tags::new()).await.unwrap();
        cloud.attach_volume(&vol, "i-1", "/dev/xvdf").await.unwrap();
        let err = cloud.delete_volume(&vol).await.unwrap_err();
        assert!(matches!(err, Error::VolumeInUse { .. }), "{err}");
        assert!(err.to_string().contains("i-1"), "{err}");
        cloud.with(|w| w.detach(&vol));
        cloud.delete_volume(&vol).await.unwrap();
        let err = cloud.volume(&vol).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = cloud.delete_volume(&vol).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert_eq!(
            cloud.snapshot(&s.id).await.unwrap().volume_id,
            vol,
            "a snapshot outlives its volume"
        );
        assert_eq!(cloud.calls().count(DELETE_VOLUME), 3);
        assert_eq!(cloud.calls().count(ATTACH_VOLUME), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_volume_still_creating_is_neither_snapshotted_nor_deleted() {
        let cloud = MemoryCloud::new(Timing {
            create_delay: Duration::from_secs(5),
            ..Timing::default()
        });
        let v = cloud
            .create_volume(&VolumeSpec::gp3("az-a", 1, &Tags::new()), "c")
            .await
            .unwrap();
        let err = cloud.create_snapshot(&v.id, "", &Tags::new()).await;
        assert!(matches!(err, Err(Error::IncorrectState { .. })), "{err:?}");
        let err = cloud.delete_volume(&v.id).await;
        assert!(matches!(err, Err(Error::IncorrectState { .. })), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn observers_see_each_snapshot_as_it_is_created_and_faults_apply() {
        let (cloud, vol) = cloud_with_volume();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        cloud.with(|w| w.on_snapshot(move |s| log.lock().unwrap().push(s.volume_id.clone())));
        cloud.inject(Fault::throttle(CREATE_SNAPSHOT, 1));
        let err = cloud
            .create_snapshot(&vol, "", &Tags::new())
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(
            seen.lock().unwrap().is_empty(),
            "a failed request made none"
        );
        cloud.create_snapshot(&vol, "", &Tags::new()).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [vol.as_str()]);
        cloud.inject(
            Fault::fail(
                CREATE_SNAPSHOT,
                Error::Transient {
                    operation: CREATE_SNAPSHOT,
                    message: "reply lost".into(),
                },
            )
            .after_effect(),
        );
        assert!(cloud.create_snapshot(&vol, "", &Tags::new()).await.is_err());
        assert_eq!(
            cloud.snapshots_tagged(&Tags::new()).await.unwrap().len(),
            2,
            "the lost reply's snapshot exists"
        );
        cloud.inject(Fault::throttle(DELETE_VOLUME, 1));
        assert!(cloud.delete_volume(&vol).await.unwrap_err().is_retryable());
        assert!(cloud.volume(&vol).await.is_ok());
    }
}
