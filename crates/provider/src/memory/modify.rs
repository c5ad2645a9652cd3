//! ModifyVolume and DescribeVolumesModifications with AWS's rules: the volume reports its new
//! size, type and performance at once; the modification is `modifying`, then `optimizing` (the
//! device has grown), then `completed`; a smaller size is refused; another modification is
//! refused while one is under way (IncorrectModificationState) and within 6 hours of the last
//! one's start (VolumeModificationRateExceeded) — also when it changes nothing, as AWS starts a
//! modification for such a request too.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::World;
use crate::{Error, Modification, ModificationState, VolumeChange, VolumeState};

pub const MODIFY_VOLUME: &str = "ModifyVolume";
pub const DESCRIBE_VOLUMES_MODIFICATIONS: &str = "DescribeVolumesModifications";

/// AWS's minimum time between two modifications of one volume, from the first one's start.
pub const MODIFICATION_COOLDOWN: Duration = Duration::from_secs(6 * 3600);

/// How long a modification stays in each state (zero: it completes at once).
#[derive(Clone, Copy, Debug, Default)]
pub struct ModificationDelays {
    /// `modifying` → `optimizing` (on AWS: seconds to minutes).
    pub modifying: Duration,
    /// `optimizing` → `completed` (on AWS: minutes to hours).
    pub optimizing: Duration,
}

#[derive(Clone, Debug)]
pub(super) struct StoredModification {
    reply: Modification,
    started_at: Instant,
    optimizing_at: Instant,
    completed_at: Instant,
    /// The volume's type, IOPS and throughput before, restored if the modification fails.
    original: (String, Option<i32>, Option<i32>),
    /// Set by [`World::fail_modification`]; the state is then `failed` for good.
    failed: Option<String>,
}

impl StoredModification {
    fn observe(&self, now: Instant) -> Modification {
        let mut m = self.reply.clone();
        let (state, progress) = match &self.failed {
            Some(why) => {
                m.status_message = Some(why.clone());
                (ModificationState::Failed, 0)
            }
            None if now >= self.completed_at => (ModificationState::Completed, 100),
            None if now >= self.optimizing_at => {
                let total = self.completed_at - self.optimizing_at;
                let done = (now - self.optimizing_at).as_secs_f64() / total.as_secs_f64();
                (ModificationState::Optimizing, (done * 100.0) as i64)
            }
            None => (ModificationState::Modifying, 0),
        };
        m.state = state;
        m.progress_percent = Some(progress);
        m
    }
}

impl World {
    /// Sets how long modifications started from now on take.
    pub fn set_modification_delays(&mut self, delays: ModificationDelays) {
        self.modification_delays = delays;
    }

    /// Modifies a volume with AWS's rules; used by the API and by tests that set up a volume
    /// modified earlier (by an operator, or by a previous boot).
    pub fn modify(
        &mut self,
        volume_id: &str,
        change: &VolumeChange,
    ) -> Result<Modification, Error> {
        let now = Instant::now();
        let volume = self.check_modification(volume_id, change, now)?;
        let size = change.size_gib.unwrap_or(volume.size_gib);
        let volume_type = change
            .volume_type
            .clone()
            .unwrap_or_else(|| volume.volume_type.clone());
        let (iops, throughput) = performance(&volume, &volume_type, size, change);
        let delays = self.modification_delays;
        let reply = Modification {
            volume_id: volume_id.to_owned(),
            state: ModificationState::Modifying,
            target_size_gib: size,
            target_volume_type: volume_type.clone(),
            target_iops: iops,
            target_throughput: throughput,
            original_size_gib: volume.size_gib,
            progress_percent: Some(0),
            started: Some(self.system_time(now)),
            status_message: None,
        };
        let stored = StoredModification {
            reply,
            started_at: now,
            optimizing_at: now + delays.modifying,
            completed_at: now + delays.modifying + delays.optimizing,
            original: (volume.volume_type.clone(), volume.iops, volume.throughput),
            failed: None,
        };
        // DescribeVolumes shows the target values at once, as on AWS.
        let v = &mut self.volumes.get_mut(volume_id).expect("looked up").volume;
        v.size_gib = size;
        v.volume_type = volume_type;
        v.iops = iops;
        v.throughput = throughput;
        let observed = stored.observe(now);
        self.modifications
            .entry(volume_id.to_owned())
            .or_default()
            .push(stored);
        Ok(observed)
    }

    /// The volume as it is, if AWS would accept `change` for it now; else AWS's refusal.
    fn check_modification(
        &self,
        volume_id: &str,
        change: &VolumeChange,
        now: Instant,
    ) -> Result<crate::Volume, Error> {
        let refuse = |code: &str, message: String| Error::Api {
            operation: MODIFY_VOLUME,
            code: Some(code.into()),
            message: format!("{code}: {message}"),
        };
        if change.is_empty() {
            return Err(refuse(
                "InvalidParameterValue",
                "Invalid input: Must specify at least one of size, type, iops, throughput".into(),
            ));
        }
        let volume = self.volume_now(volume_id, MODIFY_VOLUME)?;
        if !matches!(volume.state, VolumeState::Available | VolumeState::InUse) {
            return Err(Error::IncorrectState {
                operation: MODIFY_VOLUME,
                resource: volume_id.to_owned(),
                message: format!("The volume '{volume_id}' is '{}'", volume.state),
            });
        }
        if let Some(last) = self.latest_modification_of(volume_id, now) {
            if last.state.in_progress() {
                return Err(Error::ModificationInProgress {
                    volume_id: volume_id.to_owned(),
                    message: format!(
                        "IncorrectModificationState: Cannot modify volume {volume_id}: it is \
                         currently being modified (state {})",
                        last.state
                    ),
                });
            }
            let started_at = self.modifications[volume_id]
                .iter()
                .map(|m| m.started_at)
                .max()
                .unwrap_or(now);
            if last.state != ModificationState::Failed
                && now.duration_since(started_at) < MODIFICATION_COOLDOWN
            {
                return Err(Error::ModificationCooldown {
                    volume_id: volume_id.to_owned(),
                    message: "VolumeModificationRateExceeded: You've reached the maximum \
                              modification rate per volume limit. Wait at least 6 hours between \
                              modifications per EBS volume."
                        .into(),
                });
            }
        }
        let size = change.size_gib.unwrap_or(volume.size_gib);
        if size < volume.size_gib {
            return Err(refuse(
                "InvalidParameterValue",
                format!(
                    "New size cannot be smaller than existing size (volume {volume_id}: {} GiB, \
                     asked for {size} GiB)",
                    volume.size_gib
                ),
            ));
        }
        if !(1..=16_384).contains(&size) {
            return Err(refuse(
                "InvalidParameterValue",
                format!("Volume size {size} GiB is out of the range 1-16384 GiB"),
            ));
        }
        Ok(volume)
    }

    /// Makes the volume's modification in progress fail (AWS: `failed`, the volume keeps its
    /// original size, type and performance). A failed modification does not hold back the next.
    pub fn fail_modification(&mut self, volume_id: &str, message: &str) {
        let now = Instant::now();
        let Some(last) = self
            .modifications
            .get_mut(volume_id)
            .and_then(|all| all.last_mut())
        else {
            return;
        };
        if !last.observe(now).state.in_progress() {
            return;
        }
        last.failed = Some(message.to_owned());
        let size = last.reply.original_size_gib;
        let (volume_type, iops, throughput) = last.original.clone();
        if let Some(stored) = self.volumes.get_mut(volume_id) {
            let v = &mut stored.volume;
            (v.size_gib, v.volume_type, v.iops, v.throughput) =
                (size, volume_type, iops, throughput);
        }
    }

    /// Moves the start of every modification of `volume_id` `by` into the past, so that a test
    /// can try a second modification without waiting 6 hours. Their states are not changed.
    pub fn age_modifications(&mut self, volume_id: &str, by: Duration) {
        for m in self.modifications.get_mut(volume_id).into_iter().flatten() {
            if let Some(earlier) = m.started_at.checked_sub(by) {
                m.started_at = earlier;
            }
            m.reply.started = m.reply.started.and_then(|t| t.checked_sub(by));
        }
    }

    /// The newest modification of a volume, as an observer sees it now.
    pub(super) fn latest_modification_of(
        &self,
        volume_id: &str,
        now: Instant,
    ) -> Option<Modification> {
        self.modifications
            .get(volume_id)?
            .iter()
            .max_by_key(|m| m.started_at)
            .map(|m| m.observe(now))
    }

    /// Wall-clock time of a virtual instant: the world's clock is tokio's (pausable), a
    /// modification's start time is a date.
    pub(super) fn system_time(&self, at: Instant) -> SystemTime {
        let (base_instant, base_time) = self.epoch;
        match at.checked_duration_since(base_instant) {
            Some(after) => base_time + after,
            None => base_time - base_instant.duration_since(at),
        }
    }
}

/// The IOPS and throughput a volume has after a change: what was asked for, else what it had,
/// else (on a change of type) the new type's defaults, as EBS sets them.
fn performance(
    volume: &crate::Volume,
    volume_type: &str,
    size_gib: i32,
    change: &VolumeChange,
) -> (Option<i32>, Option<i32>) {
    let same_type = volume_type == volume.volume_type;
    let (iops, throughput) = match volume_type {
        "gp3" => (
            change
                .iops
                .or(if same_type { volume.iops } else { None })
                .or(Some(3000)),
            change
                .throughput
                .or(if same_type { volume.throughput } else { None })
                .or(Some(125)),
        ),
        "io1" | "io2" => (change.iops.or(volume.iops), None),
        // gp2's IOPS follow its size: 3 per GiB, at least 100, at most 16,000.
        "gp2" => (Some((size_gib.saturating_mul(3)).clamp(100, 16_000)), None),
        _ => (change.iops, change.throughput),
    };
    (iops, throughput)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Fault, MemoryCloud};
    use crate::{Tags, VolumeService};

    fn cloud_with_volume(delays: ModificationDelays) -> (MemoryCloud, String) {
        let cloud = MemoryCloud::default();
        let vol = cloud.with(|w| {
            w.set_modification_delays(delays);
            w.add_volume("az-a", 10, &Tags::new())
        });
        (cloud, vol)
    }

    fn grow_to(size_gib: i32) -> VolumeChange {
        VolumeChange {
            size_gib: Some(size_gib),
            ..VolumeChange::default()
        }
    }

    const DELAYS: ModificationDelays = ModificationDelays {
        modifying: Duration::from_secs(5),
        optimizing: Duration::from_secs(20),
    };

    #[tokio::test(start_paused = true)]
    async fn a_modification_takes_effect_at_once_and_moves_through_its_states() {
        let (cloud, vol) = cloud_with_volume(DELAYS);
        assert_eq!(cloud.latest_modification(&vol).await.unwrap(), None);
        let change = VolumeChange {
            size_gib: Some(20),
            iops: Some(6000),
            throughput: Some(250),
            ..VolumeChange::default()
        };
        let m = cloud.modify_volume(&vol, &change).await.unwrap();
        assert_eq!(m.state, ModificationState::Modifying);
        assert_eq!(
            (
                m.original_size_gib,
                m.target_size_gib,
                m.target_volume_type.as_str()
            ),
            (10, 20, "gp3")
        );
        assert_eq!(
            (m.target_iops, m.target_throughput),
            (Some(6000), Some(250))
        );
        let v = cloud.volume(&vol).await.unwrap();
        assert_eq!(
            (v.size_gib, v.iops, v.throughput),
            (20, Some(6000), Some(250)),
            "DescribeVolumes shows the target at once"
        );

        let mut seen = vec![];
        for _ in 0..4 {
            seen.push(
                cloud
                    .latest_modification(&vol)
                    .await
                    .unwrap()
                    .unwrap()
                    .state,
            );
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        use ModificationState::*;
        assert_eq!(seen, [Modifying, Optimizing, Optimizing, Completed]);
        assert_eq!(cloud.calls().count(MODIFY_VOLUME), 1);
        assert_eq!(cloud.calls().count(DESCRIBE_VOLUMES_MODIFICATIONS), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_modification_waits_for_the_first_and_then_six_hours() {
        let (cloud, vol) = cloud_with_volume(DELAYS);
        cloud.modify_volume(&vol, &grow_to(20)).await.unwrap();
        let err = cloud.modify_volume(&vol, &grow_to(30)).await.unwrap_err();
        assert!(
            matches!(err, Error::ModificationInProgress { ref volume_id, .. } if *volume_id == vol),
            "{err}"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        let err = cloud.modify_volume(&vol, &grow_to(30)).await.unwrap_err();
        assert!(
            matches!(err, Error::ModificationInProgress { .. }),
            "optimizing is still in progress: {err}"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        let err = cloud.modify_volume(&vol, &grow_to(30)).await.unwrap_err();
        assert!(matches!(err, Error::ModificationCooldown { .. }), "{err}");
        assert!(err.to_string().contains("VolumeModificationRateExceeded"));
        assert!(!err.is_retryable());
        assert_eq!(cloud.volume(&vol).await.unwrap().size_gib, 20);

        tokio::time::advance(MODIFICATION_COOLDOWN - Duration::from_secs(27)).await;
        let err = cloud.modify_volume(&vol, &grow_to(30)).await.unwrap_err();
        assert!(
            matches!(err, Error::ModificationCooldown { .. }),
            "a second short of 6 hours: {err}"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let m = cloud.modify_volume(&vol, &grow_to(30)).await.unwrap();
        assert_eq!((m.original_size_gib, m.target_size_gib), (20, 30));
        let latest = cloud.latest_modification(&vol).await.unwrap().unwrap();
        assert_eq!(latest.target_size_gib, 30, "the newest one");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_that_changes_nothing_still_counts() {
        let (cloud, vol) = cloud_with_volume(ModificationDelays::default());
        let m = cloud.modify_volume(&vol, &grow_to(10)).await.unwrap();
        assert_eq!(m.state, ModificationState::Completed, "no delays: at once");
        let err = cloud.modify_volume(&vol, &grow_to(11)).await.unwrap_err();
        assert!(matches!(err, Error::ModificationCooldown { .. }), "{err}");
        let err = cloud
            .modify_volume(&vol, &VolumeChange::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Api { ref code, .. } if code.as_deref() == Some("InvalidParameterValue")),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_is_refused_with_the_reason() {
        let (cloud, vol) = cloud_with_volume(DELAYS);
        let err = cloud.modify_volume(&vol, &grow_to(9)).await.unwrap_err();
        assert!(
            matches!(err, Error::Api { ref code, .. } if code.as_deref() == Some("InvalidParameterValue")),
            "{err}"
        );
        assert!(err.to_string().contains("smaller"), "{err}");
        assert_eq!(cloud.volume(&vol).await.unwrap().size_gib, 10);
        assert_eq!(cloud.latest_modification(&vol).await.unwrap(), None);
        let err = cloud.modify_volume("vol-missing", &grow_to(20)).await;
        assert!(matches!(err, Err(Error::NotFound { .. })), "{err:?}");
        let err = cloud.latest_modification("vol-missing").await;
        assert!(matches!(err, Err(Error::NotFound { .. })), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_reply_leaves_the_modification_under_way() {
        let (cloud, vol) = cloud_with_volume(DELAYS);
        cloud.inject(
            Fault::fail(
                MODIFY_VOLUME,
                Error::Transient {
                    operation: MODIFY_VOLUME,
                    message: "reply lost".into(),
                },
            )
            .after_effect(),
        );
        assert!(cloud.modify_volume(&vol, &grow_to(20)).await.is_err());
        let err = cloud.modify_volume(&vol, &grow_to(20)).await.unwrap_err();
        assert!(matches!(err, Error::ModificationInProgress { .. }), "{err}");
        let m = cloud.latest_modification(&vol).await.unwrap().unwrap();
        assert_eq!(m.target_size_gib, 20);

        cloud.inject(Fault::throttle(DESCRIBE_VOLUMES_MODIFICATIONS, 1).after(1));
        assert!(cloud.latest_modification(&vol).await.is_ok());
        let err = cloud.latest_modification(&vol).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_modification_restores_the_size_and_holds_nothing_back() {
        let (cloud, vol) = cloud_with_volume(DELAYS);
        cloud.modify_volume(&vol, &grow_to(20)).await.unwrap();
        cloud.with(|w| w.fail_modification(&vol, "Internal failure (injected)"));
        let m = cloud.latest_modification(&vol).await.unwrap().unwrap();
        assert_eq!(m.state, ModificationState::Failed);
        assert_eq!(
            m.status_message.as_deref(),
            Some("Internal failure (injected)")
        );
        assert_eq!(cloud.volume(&vol).await.unwrap().size_gib, 10);
        cloud.modify_volume(&vol, &grow_to(20)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn aged_modifications_no_longer_hold_the_next_back() {
        let (cloud, vol) = cloud_with_volume(ModificationDelays::default());
        let first = cloud.modify_volume(&vol, &grow_to(20)).await.unwrap();
        cloud.with(|w| w.age_modifications(&vol, MODIFICATION_COOLDOWN));
        let aged = cloud.latest_modification(&vol).await.unwrap().unwrap();
        assert_eq!(
            first
                .started
                .unwrap()
                .duration_since(aged.started.unwrap())
                .ok(),
            Some(MODIFICATION_COOLDOWN),
            "its start time moved back"
        );
        cloud.modify_volume(&vol, &grow_to(30)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_of_type_gets_the_new_types_performance() {
        let (cloud, vol) = cloud_with_volume(ModificationDelays::default());
        let v = cloud.volume(&vol).await.unwrap();
        assert_eq!(
            (v.iops, v.throughput),
            (Some(3000), Some(125)),
            "gp3 baseline"
        );
        let to_io2 = VolumeChange {
            volume_type: Some("io2".into()),
            iops: Some(8000),
            ..VolumeChange::default()
        };
        let m = cloud.modify_volume(&vol, &to_io2).await.unwrap();
        assert_eq!(
            (
                m.target_volume_type.as_str(),
                m.target_iops,
                m.target_throughput
            ),
            ("io2", Some(8000), None)
        );
    }
}
