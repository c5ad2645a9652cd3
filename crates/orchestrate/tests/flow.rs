//! The attach flow on the in-memory cloud and a fake host: races, throttling, slow and stuck
//! attachments, lost replies and crashes at every step. Time is paused, so a 3-minute timeout
//! costs nothing; assertions are on counts and states, never on wall time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{Content, Disks, FakeHost, MkfsDeath};
use cps_blockdev::{Filesystem, Refusal};
use cps_orchestrate::boot::claim::{self, ClaimTarget, Origin};
use cps_orchestrate::boot::device;
use cps_orchestrate::boot::grow::GrowOutcome;
use cps_orchestrate::boot::journal::{self, Journal};
use cps_orchestrate::{AttachConfig, Error, ErrorClass, FsOutcome, MountOutcome, Overrides};
use cps_provider::memory::{
    ATTACH_VOLUME, CREATE_TAGS, CREATE_VOLUME, DESCRIBE_INSTANCES, DESCRIBE_VOLUMES,
    DESCRIBE_VOLUMES_MODIFICATIONS, Fault, MODIFY_VOLUME, MemoryCloud, ModificationDelays, Timing,
};
use cps_provider::{Error as CloudError, InstanceIdentity, Tags, VolumeChange};

const AZ: &str = "us-east-1a";

fn config(extra: &str) -> AttachConfig {
    let text = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: kafka, role: broker}}\n    size: 10\nmount:\n  target: /data\n  persist: fstab\n  owner: '1000'\n{extra}"
    );
    AttachConfig::parse("test.yml", &text, &Overrides::default()).unwrap()
}

fn tags() -> Tags {
    config("").tags
}

fn identity(id: &str) -> InstanceIdentity {
    InstanceIdentity {
        instance_id: id.into(),
        region: "us-east-1".into(),
        availability_zone: AZ.into(),
    }
}

struct Bench {
    cloud: MemoryCloud,
    disks: Disks,
    config: AttachConfig,
}

impl Bench {
    fn new(timing: Timing) -> Self {
        Self {
            cloud: MemoryCloud::new(timing),
            disks: Disks::default(),
            config: config(""),
        }
    }

    fn instance(&self, id: &str) -> Arc<FakeHost> {
        self.cloud.with(|w| w.add_instance(id, AZ));
        FakeHost::new(&self.cloud, id, &self.disks)
    }

    async fn boot(&self, host: &Arc<FakeHost>) -> Result<device::AttachOutcome, Error> {
        device::attach(
            &self.cloud,
            host.clone(),
            &identity(&host.instance),
            &self.config,
        )
        .await
    }

    fn terminate(&self, host: &FakeHost) {
        host.unmount_all();
        self.cloud.with(|w| w.terminate_instance(&host.instance));
    }

    fn volumes_with_tags(&self) -> usize {
        let t = tags();
        self.cloud
            .volumes()
            .iter()
            .filter(|v| t.iter().all(|(k, val)| v.tags.get(k) == Some(val)))
            .count()
    }
}

#[tokio::test(start_paused = true)]
async fn first_boot_creates_formats_mounts_and_persists() {
    let b = Bench::new(Timing::default());
    let a = b.instance("i-a");
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.origin, Origin::Created);
    assert!(matches!(out.filesystem, FsOutcome::Created(ref fs) if fs.fstype == "ext4"));
    assert_eq!(out.mount, MountOutcome::Mounted);
    assert_eq!(out.fstab_changed, Some(true));
    assert_eq!(a.st().mkfs_runs, 1);
    assert_eq!(a.st().ownership_runs, 1);
    assert_eq!(b.cloud.calls().count(CREATE_VOLUME), 1);
    assert_eq!(b.cloud.calls().count(ATTACH_VOLUME), 1);
    let mut vol = b.cloud.volumes()[0].clone();
    let FsOutcome::Created(fs) = &out.filesystem else {
        unreachable!()
    };
    // The format journal: marked before mkfs, and made (with the new UUID) before the mount.
    assert_eq!(b.cloud.calls().count(CREATE_TAGS), 2);
    assert_eq!(
        vol.tags.remove(journal::TAG),
        Some(format!("ext4:{}", fs.uuid.as_deref().unwrap()))
    );
    assert_eq!(vol.tags, tags(), "created with the configured tags");
    assert!(vol.encrypted);
}

#[tokio::test(start_paused = true)]
async fn replacement_gets_the_same_volume_unformatted_and_rerun_is_a_no_op() {
    let b = Bench::new(Timing::default());
    let a = b.instance("i-a");
    let first = b.boot(&a).await.unwrap();
    b.terminate(&a);

    let new = b.instance("i-b");
    b.cloud.calls().reset();
    let second = b.boot(&new).await.unwrap();
    assert_eq!(second.volume_id, first.volume_id);
    assert_eq!(second.origin, Origin::Claimed);
    assert!(
        matches!(second.filesystem, FsOutcome::Existing(_)),
        "never reformatted"
    );
    assert_eq!(new.st().mkfs_runs, 0);
    // Reattach: list, attach, one look at the attachment.
    assert_eq!(
        b.cloud.calls().snapshot(),
        BTreeMap::from([(DESCRIBE_VOLUMES, 2), (ATTACH_VOLUME, 1)])
    );

    b.cloud.calls().reset();
    let third = b.boot(&new).await.unwrap();
    assert_eq!(third.origin, Origin::Reused);
    assert_eq!(third.mount, MountOutcome::AlreadyMounted);
    assert_eq!(third.fstab_changed, Some(false));
    assert_eq!(b.cloud.calls().total(), 1, "a re-run only lists");
    assert_eq!(b.volumes_with_tags(), 1);
}

/// The old server is still shutting down when the new one boots: the node's volume is
/// `detaching`. The new server waits for it instead of creating a second, empty volume.
#[tokio::test(start_paused = true)]
async fn a_volume_still_detaching_from_the_old_instance_is_waited_for() {
    let b = Bench::new(Timing::default());
    let a = b.instance("i-a");
    let first = b.boot(&a).await.unwrap();
    a.unmount_all();
    b.cloud
        .with(|w| w.begin_detach(&first.volume_id, Duration::from_secs(40)));

    let new = b.instance("i-b");
    let started = tokio::time::Instant::now();
    let out = b.boot(&new).await.unwrap();
    assert_eq!(out.volume_id, first.volume_id);
    assert_eq!(out.origin, Origin::Claimed);
    assert!(
        started.elapsed() >= Duration::from_secs(40),
        "it waited for the detach"
    );
    assert_eq!(b.volumes_with_tags(), 1, "no second volume");
    assert_eq!(new.st().mkfs_runs, 0);
}

/// On EC2 a terminated server shows `shutting-down` for a while with its volumes still
/// `attached`. The new server sees who holds the node's volume and waits, instead of creating.
#[tokio::test(start_paused = true)]
async fn a_volume_still_attached_to_a_server_shutting_down_is_waited_for() {
    let b = Bench::new(Timing::default());
    let a = b.instance("i-a");
    let first = b.boot(&a).await.unwrap();
    a.unmount_all();
    b.cloud
        .with(|w| w.begin_terminate("i-a", Duration::from_secs(30)));

    let new = b.instance("i-b");
    let started = tokio::time::Instant::now();
    let out = b.boot(&new).await.unwrap();
    assert_eq!(out.volume_id, first.volume_id);
    assert_eq!(out.origin, Origin::Claimed);
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert_eq!(b.volumes_with_tags(), 1, "no second volume");
    assert!(
        b.cloud.calls().count(DESCRIBE_INSTANCES) >= 1,
        "it looked up the holder"
    );
}

/// A matching volume held by a running server is that server's: in a pool, create another.
#[tokio::test(start_paused = true)]
async fn a_volume_held_by_a_running_server_is_left_to_it() {
    let b = Bench::new(Timing::default());
    let a = b.instance("i-a");
    let first = b.boot(&a).await.unwrap();
    let new = b.instance("i-b");
    let out = b.boot(&new).await.unwrap();
    assert_ne!(out.volume_id, first.volume_id);
    assert_eq!(out.origin, Origin::Created);
    assert_eq!(b.volumes_with_tags(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_is_not_running_fails_clearly_instead_of_burning_the_pool() {
    let b = Bench::new(Timing::default());
    b.cloud.with(|w| {
        w.add_volume(AZ, 10, &tags());
    });
    let me = b.instance("i-me");
    b.cloud.with(|w| w.terminate_instance("i-me"));
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Cloud);
    assert!(err.to_string().contains("IncorrectInstanceState"), "{err}");
    assert_eq!(b.cloud.calls().count(ATTACH_VOLUME), 1);
}

#[tokio::test(start_paused = true)]
async fn a_volume_stuck_detaching_is_a_timeout_not_a_second_volume() {
    let b = Bench::new(Timing::default());
    let a = b.instance("i-a");
    let first = b.boot(&a).await.unwrap();
    b.cloud
        .with(|w| w.begin_detach(&first.volume_id, Duration::from_secs(24 * 3600)));
    let new = b.instance("i-b");
    let err = b.boot(&new).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Timeout);
    let msg = err.to_string();
    assert!(
        msg.contains(&first.volume_id) && msg.contains("detaching from i-a"),
        "{msg}"
    );
    assert_eq!(b.volumes_with_tags(), 1);
    // Bounded polling: about a minute of 3 s looks, not a busy loop.
    assert!(
        b.cloud.calls().count(DESCRIBE_VOLUMES) < 120,
        "{:?}",
        b.cloud.calls().snapshot()
    );
}

#[tokio::test(start_paused = true)]
async fn losing_the_race_moves_on_to_another_candidate() {
    let b = Bench::new(Timing::default());
    let (v1, v2) = b.cloud.with(|w| {
        w.add_instance("i-rival", AZ);
        (w.add_volume(AZ, 10, &tags()), w.add_volume(AZ, 10, &tags()))
    });
    let me = b.instance("i-me");
    // Whichever this agent picks first, the rival attaches it just before.
    let (c1, c2) = (v1.clone(), v2.clone());
    b.cloud.before_next(ATTACH_VOLUME, move |w| {
        // The rival takes the first of the two this agent would try.
        let (first, _) = if cps_orchestrate::backoff::mix(
            cps_orchestrate::backoff::hash_str("i-me") ^ cps_orchestrate::backoff::hash_str(&c1),
        ) < cps_orchestrate::backoff::mix(
            cps_orchestrate::backoff::hash_str("i-me") ^ cps_orchestrate::backoff::hash_str(&c2),
        ) {
            (c1, c2)
        } else {
            (c2, c1)
        };
        w.attach(&first, "i-rival", "/dev/xvdc").unwrap();
    });
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Claimed);
    assert_eq!(out.attach_attempts, 2, "one lost race, one win");
    assert!(out.volume_id == v1 || out.volume_id == v2);
    assert_eq!(b.cloud.calls().count(CREATE_VOLUME), 0);
}

#[tokio::test(start_paused = true)]
async fn when_the_only_candidate_is_taken_a_new_volume_is_created() {
    let b = Bench::new(Timing::default());
    let v1 = b.cloud.with(|w| {
        w.add_instance("i-rival", AZ);
        w.add_volume(AZ, 10, &tags())
    });
    let me = b.instance("i-me");
    b.cloud.before_next(ATTACH_VOLUME, move |w| {
        w.attach(&v1, "i-rival", "/dev/xvdc").unwrap()
    });
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Created);
    assert_eq!(b.volumes_with_tags(), 2);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_retried_with_backoff() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    b.cloud.inject(Fault::throttle(DESCRIBE_VOLUMES, 3));
    b.cloud.inject(Fault::throttle(CREATE_VOLUME, 2));
    b.cloud.inject(Fault::throttle(ATTACH_VOLUME, 2));
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Created);
    assert_eq!(b.cloud.calls().count(CREATE_VOLUME), 3);
    assert_eq!(b.cloud.calls().count(ATTACH_VOLUME), 3);
    assert_eq!(b.volumes_with_tags(), 1);
}

#[tokio::test(start_paused = true)]
async fn endless_throttling_gives_up_with_a_cloud_error() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    b.cloud.inject(Fault::throttle(DESCRIBE_VOLUMES, 1000));
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Cloud);
    assert!(err.to_string().contains("throttled"), "{err}");
    assert_eq!(
        b.cloud.calls().count(DESCRIBE_VOLUMES),
        6,
        "bounded by the retry policy"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_attach_is_waited_for_with_few_polls() {
    let b = Bench::new(Timing {
        create_delay: Duration::from_secs(4),
        attach_delay: Duration::from_secs(20),
        latency: Duration::from_millis(40),
    });
    let me = b.instance("i-me");
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Created);
    // 4 s creating + 20 s attaching, polled 100 ms growing to 3 s: about a dozen looks, not 240.
    let describes = b.cloud.calls().count(DESCRIBE_VOLUMES);
    assert!((5..=25).contains(&describes), "{describes} DescribeVolumes");
}

#[tokio::test(start_paused = true)]
async fn an_attachment_that_never_completes_times_out_clearly() {
    let b = Bench::new(Timing {
        attach_delay: Duration::from_secs(3600),
        ..Timing::default()
    });
    let me = b.instance("i-me");
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Timeout);
    let msg = err.to_string();
    assert!(
        msg.contains("timed out after 180s")
            && msg.contains("to be attached to i-me")
            && msg.contains("attaching"),
        "{msg}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_device_that_never_appears_times_out_clearly() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    me.st().fail_next.clear();
    // The device lookup fails once with an I/O error: that is a host error, not a wait.
    me.st().fail_next.push("locate");
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Host);

    // A host that never sees the device: detach behind the agent's back after attach.
    let b = Bench::new(Timing::default());
    let other = b.instance("i-other");
    let host_that_never_sees = FakeHost::new(&b.cloud, "i-nobody", &b.disks);
    let err = device::attach(
        &b.cloud,
        host_that_never_sees,
        &identity(&other.instance),
        &b.config,
    )
    .await
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Timeout);
    assert!(err.to_string().contains("kernel device of vol-"), "{err}");
    assert!(err.to_string().contains("no device yet"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_lost_create_reply_is_retried_into_the_same_volume() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    b.cloud.inject(
        Fault::fail(
            CREATE_VOLUME,
            CloudError::Transient {
                operation: CREATE_VOLUME,
                message: "connection reset".into(),
            },
        )
        .after_effect(),
    );
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Created);
    assert_eq!(b.cloud.calls().count(CREATE_VOLUME), 2);
    assert_eq!(
        b.volumes_with_tags(),
        1,
        "the client token made the retry return the same volume"
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_that_fails_after_tagging_is_claimed_on_the_rerun() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    b.cloud.inject(
        Fault::fail(
            CREATE_VOLUME,
            CloudError::Api {
                operation: CREATE_VOLUME,
                code: Some("InternalError".into()),
                message: "failed after the volume was made".into(),
            },
        )
        .after_effect(),
    );
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Cloud);
    assert_eq!(
        b.volumes_with_tags(),
        1,
        "the volume exists, tagged, unattached"
    );
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Claimed);
    assert_eq!(b.volumes_with_tags(), 1);
}

/// A crash is a run that stops at some step; the next run (same instance, same disks) must
/// converge to the same end state: one volume, attached here, formatted, the format journal
/// saying so, mounted. A filesystem is made again only when the previous one was never
/// recorded as made (so never mounted); a later boot with data on the volume never formats.
#[tokio::test(start_paused = true)]
async fn crash_and_rerun_at_every_step_converges() {
    let cloud_steps = [DESCRIBE_VOLUMES, CREATE_VOLUME, ATTACH_VOLUME];
    let host_steps = ["locate", "probe", "mkfs", "mount", "ownership", "persist"];
    type Arm = Box<dyn Fn(&Bench, &FakeHost)>;
    let crash = |op: &'static str, passing: u32, after: bool| -> Arm {
        Box::new(move |b: &Bench, _h: &FakeHost| {
            let f = Fault::crash(op).after(passing);
            b.cloud.inject(if after { f.after_effect() } else { f });
        })
    };
    let effect = |after: bool| {
        if after {
            "after its effect"
        } else {
            "before its effect"
        }
    };
    // (name, arm, filesystems made in all)
    let mut cases: Vec<(String, Arm, u32)> = Vec::new();
    for op in cloud_steps {
        for after in [false, true] {
            cases.push((format!("{op} ({})", effect(after)), crash(op, 0, after), 1));
        }
    }
    for after in [false, true] {
        cases.push((
            format!("the journal's formatting mark ({})", effect(after)),
            crash(CREATE_TAGS, 0, after),
            1,
        ));
        // Lost before it was written, the filesystem is not known to be whole: made again.
        cases.push((
            format!("the journal's made mark ({})", effect(after)),
            crash(CREATE_TAGS, 1, after),
            if after { 1 } else { 2 },
        ));
    }
    for op in host_steps {
        cases.push((
            format!("host {op}"),
            Box::new(move |_b: &Bench, h: &FakeHost| h.st().fail_next.push(op)),
            1,
        ));
    }
    for death in [
        MkfsDeath::BeforeWriting,
        MkfsDeath::Metadata,
        MkfsDeath::Superblock,
        MkfsDeath::Finished,
    ] {
        cases.push((
            format!("inside mkfs: {death:?}"),
            Box::new(move |_b: &Bench, h: &FakeHost| h.st().mkfs_dies = Some(death)),
            1,
        ));
    }
    for (name, arm, made) in cases {
        let b = Bench::new(Timing {
            attach_delay: Duration::from_secs(2),
            create_delay: Duration::from_secs(1),
            latency: Duration::from_millis(20),
        });
        let me = b.instance("i-me");
        arm(&b, &me);
        assert!(
            b.boot(&me).await.is_err(),
            "{name}: the injected crash did not stop the run"
        );
        let out = b
            .boot(&me)
            .await
            .unwrap_or_else(|e| panic!("{name}: rerun failed: {e}"));
        assert_eq!(b.volumes_with_tags(), 1, "{name}: exactly one volume");
        assert_eq!(me.st().mkfs_runs, made, "{name}: filesystems made");
        assert_eq!(
            me.st().mounts.get(Path::new("/data")),
            Some(&out.volume_id),
            "{name}: mounted"
        );
        assert_eq!(me.st().fstab.len(), 1, "{name}: one fstab entry");
        let Content::Fs(fs) = me.content(&out.volume_id) else {
            panic!("{name}: {:?} on the volume", me.content(&out.volume_id))
        };
        assert_eq!(
            journal_of(&b, &out.volume_id),
            Journal::Made {
                fstype: fs.fstype.clone(),
                uuid: fs.uuid.clone()
            },
            "{name}: the journal records the filesystem mounted"
        );
        me.write_user_data(&out.volume_id);
        let again = b.boot(&me).await.unwrap();
        assert_eq!(
            again.origin,
            Origin::Reused,
            "{name}: a third run is a no-op"
        );
        // The replacement gets the data; the fake mkfs panics if anything formats it.
        b.terminate(&me);
        let next = b.instance("i-next");
        let out = b.boot(&next).await.unwrap();
        assert_eq!(out.filesystem, FsOutcome::Existing(fs), "{name}");
    }
}

fn journal_of(b: &Bench, volume_id: &str) -> Journal {
    let v = b
        .cloud
        .volumes()
        .into_iter()
        .find(|v| v.id == volume_id)
        .unwrap();
    Journal::of(&v)
}

/// Killed inside mkfs, a first boot leaves bytes that are neither a filesystem nor blank. The
/// format journal says they are mkfs's own, so the next run (here: the replacement instance)
/// makes the filesystem again instead of refusing it forever.
#[tokio::test(start_paused = true)]
async fn an_interrupted_mkfs_is_finished_by_the_next_boot() {
    for death in [MkfsDeath::Metadata, MkfsDeath::Superblock] {
        let b = Bench::new(Timing::default());
        let first = b.instance("i-first");
        first.st().mkfs_dies = Some(death);
        assert_eq!(b.boot(&first).await.unwrap_err().class(), ErrorClass::Host);
        b.terminate(&first);
        let next = b.instance("i-next");
        let out = b
            .boot(&next)
            .await
            .unwrap_or_else(|e| panic!("{death:?}: {e}"));
        assert!(matches!(out.filesystem, FsOutcome::Created(_)), "{death:?}");
        assert_eq!(next.st().mkfs_runs, 1);
    }
}

/// Without the journal's mark (an older cps, or the tag deleted), the same bytes are somebody's
/// data as far as cps can tell: refused, untouched, with what to do.
#[tokio::test(start_paused = true)]
async fn without_the_journal_an_interrupted_mkfs_is_still_refused() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    me.st().mkfs_dies = Some(MkfsDeath::Metadata);
    assert_eq!(b.boot(&me).await.unwrap_err().class(), ErrorClass::Host);
    let vol = b.cloud.volumes()[0].id.clone();
    b.cloud.with(|w| w.remove_volume_tag(&vol, journal::TAG));
    let left = me.content(&vol);
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Refused);
    assert!(
        err.to_string().contains("blkdiscard -z"),
        "says what to do: {err}"
    );
    assert_eq!(me.content(&vol), left, "left as it was");
    assert_eq!(me.st().mkfs_runs, 0);
}

/// A journal that says cps made a filesystem on a volume that now reads blank: the data was
/// erased somewhere else, or it is the wrong copy. Not formatted until an operator says so.
#[tokio::test(start_paused = true)]
async fn a_blank_volume_the_journal_says_held_data_is_refused() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    let first = b.boot(&me).await.unwrap();
    b.terminate(&me);
    b.disks
        .lock()
        .unwrap()
        .insert(first.volume_id.clone(), Content::Blank);
    let next = b.instance("i-next");
    let err = b.boot(&next).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Refused);
    assert!(
        err.to_string().contains("delete the tag cps:filesystem"),
        "{err}"
    );
    assert_eq!(next.st().mkfs_runs, 0);
    b.cloud
        .with(|w| w.remove_volume_tag(&first.volume_id, journal::TAG));
    let out = b.boot(&next).await.unwrap();
    assert!(matches!(out.filesystem, FsOutcome::Created(_)));
}

#[tokio::test(start_paused = true)]
async fn foreign_content_is_refused_and_left_alone() {
    for refusal in [
        Refusal::PartitionTable {
            pttype: "gpt".into(),
        },
        Refusal::Signature {
            kind: "crypto_LUKS".into(),
            usage: "crypto".into(),
        },
    ] {
        let b = Bench::new(Timing::default());
        let vol = b.cloud.with(|w| w.add_volume(AZ, 10, &tags()));
        b.disks
            .lock()
            .unwrap()
            .insert(vol.clone(), Content::Foreign(refusal.clone()));
        let me = b.instance("i-me");
        let err = b.boot(&me).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::Refused, "{refusal:?}");
        assert!(err.to_string().contains(&vol), "names the volume: {err}");
        assert_eq!(me.st().mkfs_runs, 0);
        assert!(me.st().mounts.is_empty());
        assert_eq!(b.disks.lock().unwrap()[&vol], Content::Foreign(refusal));
    }
}

#[tokio::test(start_paused = true)]
async fn another_filesystem_type_is_mounted_not_reformatted() {
    let b = Bench::new(Timing::default());
    let vol = b.cloud.with(|w| w.add_volume(AZ, 10, &tags()));
    let xfs = Filesystem {
        fstype: "xfs".into(),
        uuid: Some("u".into()),
        label: None,
    };
    b.disks
        .lock()
        .unwrap()
        .insert(vol, Content::Fs(xfs.clone()));
    let me = b.instance("i-me");
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.filesystem, FsOutcome::Existing(xfs));
    assert_eq!(me.st().mkfs_runs, 0);
}

#[tokio::test(start_paused = true)]
async fn volumes_in_other_zones_are_skipped() {
    let b = Bench::new(Timing::default());
    let far = b.cloud.with(|w| w.add_volume("us-east-1b", 10, &tags()));
    let me = b.instance("i-me");
    let out = b.boot(&me).await.unwrap();
    assert_eq!(out.origin, Origin::Created);
    assert_ne!(out.volume_id, far);
    assert_eq!(
        b.cloud.calls().count(ATTACH_VOLUME),
        1,
        "never tried the far volume"
    );
}

#[tokio::test(start_paused = true)]
async fn two_matching_volumes_attached_here_is_refused() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    b.cloud.with(|w| {
        let v1 = w.add_volume(AZ, 10, &tags());
        let v2 = w.add_volume(AZ, 10, &tags());
        w.attach(&v1, "i-me", "/dev/xvdc").unwrap();
        w.attach(&v2, "i-me", "/dev/xvdd").unwrap();
    });
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Refused);
    assert!(err.to_string().contains("will not choose"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_busy_device_name_is_a_clear_cloud_error() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    b.cloud.with(|w| {
        let other = w.add_volume(AZ, 10, &Tags::from([("other".into(), "x".into())]));
        w.attach(&other, "i-me", "/dev/xvdc").unwrap();
    });
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Cloud);
    assert!(
        err.to_string().contains("choose another block-device"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn something_else_mounted_at_the_target_is_refused() {
    let b = Bench::new(Timing::default());
    let me = b.instance("i-me");
    me.st()
        .mounts
        .insert(PathBuf::from("/data"), "vol-someone-else".into());
    let err = b.boot(&me).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Refused);
    assert!(
        err.to_string().contains("already has vol-someone-else"),
        "{err}"
    );
}

/// N agents boot at once against N pooled volumes (with API latency, so they really overlap):
/// every agent gets a volume, none is created, and the lost races stay well under N².
#[tokio::test(start_paused = true)]
async fn a_herd_claims_the_pool_without_creating_or_piling_up() {
    for n in [10usize, 50] {
        let b = Bench::new(Timing {
            latency: Duration::from_millis(50),
            ..Timing::default()
        });
        b.cloud.with(|w| {
            for _ in 0..n {
                w.add_volume(AZ, 10, &tags());
            }
        });
        let ids: Vec<String> = (0..n).map(|i| format!("i-{i:03}")).collect();
        for id in &ids {
            b.cloud.with(|w| w.add_instance(id, AZ));
        }
        let runs = ids.iter().map(|id| {
            let (cloud, config, id) = (b.cloud.clone(), b.config.clone(), id.clone());
            async move {
                claim::claim_volume(
                    &cloud,
                    &identity(&id),
                    &config,
                    &ClaimTarget::pool(&config),
                    Default::default(),
                )
                .await
            }
        });
        let claims = futures_join_all(runs).await;
        let mut claimed: Vec<String> = claims.into_iter().map(|c| c.unwrap().volume.id).collect();
        claimed.sort();
        claimed.dedup();
        assert_eq!(claimed.len(), n, "every agent got its own volume");
        assert_eq!(b.cloud.calls().count(CREATE_VOLUME), 0);
        let attempts = b.cloud.calls().count(ATTACH_VOLUME);
        assert!(
            attempts <= 2 * n as u64,
            "{attempts} attach attempts for {n} agents"
        );
    }
}

/// A herd that must create, with every matching volume held by a running server: who holds
/// them costs one DescribeInstances per look, so the herd's requests grow with the agents, not
/// with agents × held volumes.
#[tokio::test(start_paused = true)]
async fn a_herd_against_held_volumes_looks_up_holders_once_per_look() {
    for (agents, held) in [(20usize, 10usize), (40, 20)] {
        let b = Bench::new(Timing {
            latency: Duration::from_millis(50),
            ..Timing::default()
        });
        b.cloud.with(|w| {
            for i in 0..held {
                let v = w.add_volume(AZ, 10, &tags());
                w.add_instance(&format!("i-holder-{i}"), AZ);
                w.attach(&v, &format!("i-holder-{i}"), "/dev/xvdc").unwrap();
            }
        });
        let ids: Vec<String> = (0..agents).map(|i| format!("i-{i:03}")).collect();
        for id in &ids {
            b.cloud.with(|w| w.add_instance(id, AZ));
        }
        b.cloud.calls().reset();
        let runs = ids.iter().map(|id| {
            let (cloud, config, id) = (b.cloud.clone(), b.config.clone(), id.clone());
            async move {
                claim::claim_volume(
                    &cloud,
                    &identity(&id),
                    &config,
                    &ClaimTarget::pool(&config),
                    Default::default(),
                )
                .await
            }
        });
        for claim in futures_join_all(runs).await {
            assert_eq!(claim.unwrap().origin, Origin::Created);
        }
        assert_eq!(
            b.cloud.calls().count(DESCRIBE_INSTANCES),
            agents as u64,
            "{agents} agents against {held} held volumes: one lookup per agent's look"
        );
    }
}

/// Runs futures as concurrent tasks and collects their outputs in order.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn the_client_token_is_stable_per_instance_spec_and_attempt() {
    let c = config("");
    let spec = claim::volume_spec(&identity("i-a"), &c, &c.tags);
    let t = claim::client_token(&identity("i-a"), &spec, 0);
    assert_eq!(t, claim::client_token(&identity("i-a"), &spec, 0));
    assert_ne!(t, claim::client_token(&identity("i-b"), &spec, 0));
    assert_ne!(t, claim::client_token(&identity("i-a"), &spec, 1));
    assert!(t.len() <= 64 && t.is_ascii());
}

// Growing in place: the volume is modified to the configuration (growth only, never while
// another modification is under way, a cooldown is a warning), then the filesystem is grown
// to the device — also when someone else enlarged the volume.

fn sized(gib: i32, extra: &str) -> AttachConfig {
    let text = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: kafka, role: broker}}\n    size: {gib}\nmount:\n  target: /data\n{extra}"
    );
    AttachConfig::parse("test.yml", &text, &Overrides::default()).unwrap()
}

/// Boots once at 10 GiB and returns the bench, the host and the volume id.
async fn booted_at_10() -> (Bench, Arc<FakeHost>, String) {
    let mut b = Bench::new(Timing::default());
    b.config = sized(10, "");
    let a = b.instance("i-a");
    let out = b.boot(&a).await.unwrap();
    assert_eq!(
        out.grow,
        GrowOutcome::default(),
        "a new volume is as configured"
    );
    (b, a, out.volume_id)
}

#[tokio::test(start_paused = true)]
async fn a_larger_size_modifies_the_volume_then_grows_the_filesystem_once() {
    let (mut b, a, vid) = booted_at_10().await;
    b.config = sized(20, "");
    b.cloud.with(|w| {
        w.set_modification_delays(ModificationDelays {
            modifying: Duration::from_secs(20),
            optimizing: Duration::from_secs(600),
        })
    });
    let before = b.cloud.calls().count(MODIFY_VOLUME);
    let out = b.boot(&a).await.unwrap();
    assert_eq!(
        out.grow.modified,
        Some(VolumeChange {
            size_gib: Some(20),
            ..VolumeChange::default()
        })
    );
    assert_eq!(out.grow.filesystem, Some((10 << 30, 20 << 30)));
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME) - before, 1);
    assert_eq!(a.st().grow_runs, 1);
    assert_eq!(b.cloud.volumes()[0].size_gib, 20);

    // The next run finds the volume and the filesystem as configured: no call, no grow.
    let describes = b.cloud.calls().count(DESCRIBE_VOLUMES_MODIFICATIONS);
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow, GrowOutcome::default());
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME) - before, 1);
    assert_eq!(
        b.cloud.calls().count(DESCRIBE_VOLUMES_MODIFICATIONS),
        describes
    );
    assert_eq!(a.st().grow_runs, 1);
    let _ = vid;
}

#[tokio::test(start_paused = true)]
async fn a_smaller_size_is_never_a_shrink() {
    let (mut b, a, _) = booted_at_10().await;
    b.config = sized(5, "");
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow.modified, None);
    assert!(out.grow.deferred.unwrap().contains("5 GiB < volume 10 GiB"));
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME), 0);
    assert_eq!(b.cloud.volumes()[0].size_gib, 10);
}

#[tokio::test(start_paused = true)]
async fn a_volume_enlarged_elsewhere_grows_its_filesystem_with_no_call() {
    let (b, a, vid) = booted_at_10().await;
    // Terraform (or an operator) modified the volume: the listing says 20 GiB already.
    b.cloud.with(|w| {
        w.modify(
            &vid,
            &VolumeChange {
                size_gib: Some(20),
                ..VolumeChange::default()
            },
        )
        .unwrap();
    });
    let mut b = b;
    b.config = sized(20, "");
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow.modified, None);
    assert_eq!(out.grow.filesystem, Some((10 << 30, 20 << 30)));
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME), 0);
    assert_eq!(b.cloud.calls().count(DESCRIBE_VOLUMES_MODIFICATIONS), 0);

    // The device alone larger (the configuration unchanged): grown too.
    a.enlarge_device(&vid, 5 << 30);
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow.filesystem, Some((20 << 30, 25 << 30)));
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME), 0);
}

#[tokio::test(start_paused = true)]
async fn no_modification_while_another_is_under_way_and_a_cooldown_is_a_warning() {
    let (mut b, a, vid) = booted_at_10().await;
    b.cloud.with(|w| {
        w.set_modification_delays(ModificationDelays {
            modifying: Duration::from_secs(3600),
            optimizing: Duration::from_secs(3600),
        });
        // An operator's iops change, still modifying.
        w.modify(
            &vid,
            &VolumeChange {
                iops: Some(4000),
                ..VolumeChange::default()
            },
        )
        .unwrap();
    });
    b.config = sized(20, "");
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow.modified, None);
    assert!(out.grow.deferred.unwrap().contains("Modifying"), "busy");
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME), 0, "not even tried");
    assert_eq!(b.cloud.volumes()[0].size_gib, 10);

    // Done, but within 6 hours of its start: AWS refuses; the boot goes on at 10 GiB.
    b.cloud.with(|w| {
        w.set_modification_delays(ModificationDelays::default());
    });
    tokio::time::advance(Duration::from_secs(2 * 3600 + 1)).await;
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow.modified, None);
    assert!(out.grow.deferred.unwrap().contains("too soon"));
    assert_eq!(b.cloud.calls().count(MODIFY_VOLUME), 1, "tried once");
    assert_eq!(b.cloud.volumes()[0].size_gib, 10);
    assert_eq!(a.st().grow_runs, 0);

    // After the cooldown the next run grows it.
    b.cloud
        .with(|w| w.age_modifications(&vid, Duration::from_secs(6 * 3600)));
    let out = b.boot(&a).await.unwrap();
    assert_eq!(out.grow.filesystem, Some((10 << 30, 20 << 30)));
}

#[tokio::test(start_paused = true)]
async fn a_failed_modification_fails_the_boot_and_changes_nothing() {
    let (mut b, a, vid) = booted_at_10().await;
    b.config = sized(20, "");
    b.cloud.with(|w| {
        w.set_modification_delays(ModificationDelays {
            modifying: Duration::from_secs(3600),
            optimizing: Duration::from_secs(3600),
        })
    });
    let cloud = b.cloud.clone();
    let v = vid.clone();
    // AWS fails the modification while cps-attach waits for it.
    let failer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        cloud.with(|w| w.fail_modification(&v, "the requested configuration is not supported"));
    });
    let err = b.boot(&a).await.unwrap_err();
    failer.await.unwrap();
    assert!(matches!(err, Error::ModificationFailed { .. }), "{err}");
    assert!(err.to_string().contains("not supported"), "{err}");
    assert_eq!(b.cloud.volumes()[0].size_gib, 10, "AWS restores the volume");
    assert_eq!(a.st().grow_runs, 0);
}

#[tokio::test(start_paused = true)]
async fn an_ext_filesystem_the_kernel_will_not_grow_online_is_a_warning() {
    let (mut b, a, _) = booted_at_10().await;
    a.st().online_ext_grow_refused = true;
    b.config = sized(20, "");
    let out = b.boot(&a).await.unwrap();
    assert!(out.grow.modified.is_some(), "the volume is modified");
    assert_eq!(out.grow.filesystem, None);
    let why = out.grow.deferred.unwrap();
    assert!(why.contains("cannot grow its ext4 filesystem"), "{why}");
}
