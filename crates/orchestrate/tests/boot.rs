//! The whole boot on the in-memory cloud with fake hosts, on a paused clock: lifecycle heartbeats
//! and completion, node ids and their holders, slots under races, the interface, files, hooks.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Disks, FakeHost};
use cps_node::{Hook, HookExit, NodeFile, NodeHost};
use cps_orchestrate::boot::relocate;
use cps_orchestrate::{
    AttachConfig, BootOutcome, Error, ErrorClass, Hosts, LifecycleOutcome, Overrides, Services,
    boot,
};
use cps_provider::memory::{CREATE_SNAPSHOT, CREATE_VOLUME, LifecycleEvent, MemoryCloud, Timing};
use cps_provider::{AttachmentState, InstanceIdentity, LifecycleResult, Tags};
use tokio::time::Instant;

const AZ: &str = "us-east-1a";
const GROUP: &str = "kafka-nodes";
const HOOK: &str = "cps-launch";

fn identity(id: &str, zone: &str) -> InstanceIdentity {
    InstanceIdentity {
        instance_id: id.into(),
        region: "us-east-1".into(),
        availability_zone: zone.into(),
    }
}

fn cluster_tags() -> Tags {
    Tags::from([("cluster".to_string(), "kafka".to_string())])
}

fn node_tags(id: &str) -> Tags {
    let mut t = cluster_tags();
    t.insert("cps:node-id".into(), id.into());
    t
}

/// (hook, start time, environment)
type HookRun = (String, Instant, Vec<(String, String)>);

/// The node side: hooks take simulated time and follow a script; the OS shows an interface
/// once the cloud says it is attached here.
#[derive(Default)]
struct NodeState {
    files: BTreeMap<PathBuf, Vec<u8>>,
    env: Vec<(String, String)>,
    marker: bool,
    runs: Vec<HookRun>,
    configure: Option<(Duration, HookExit)>,
    /// Health runs, in order; when empty, health passes at once.
    health: VecDeque<(Duration, HookExit)>,
    health_always_fails: bool,
}

struct FakeNode {
    cloud: MemoryCloud,
    instance: String,
    state: Mutex<NodeState>,
}

impl FakeNode {
    fn st(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap()
    }
    fn runs_of(&self, hook: &str) -> usize {
        self.st().runs.iter().filter(|r| r.0 == hook).count()
    }
}

#[async_trait]
impl NodeHost for FakeNode {
    fn interface_by_mac(&self, mac: &str) -> Result<Option<String>, cps_node::Error> {
        let shown = self.cloud.with(|w| w.interfaces()).into_iter().any(|e| {
            e.mac == mac
                && e.attachment.as_ref().is_some_and(|a| {
                    a.instance_id == self.instance && a.state == AttachmentState::Attached
                })
        });
        Ok(shown.then(|| "eth1".to_string()))
    }
    fn write_file(&self, file: &NodeFile) -> Result<bool, cps_node::Error> {
        let old = self
            .st()
            .files
            .insert(file.path.clone(), file.content.clone());
        Ok(old.as_ref() != Some(&file.content))
    }
    fn write_env_file(
        &self,
        _path: &Path,
        vars: &[(String, String)],
    ) -> Result<(), cps_node::Error> {
        self.st().env = vars.to_vec();
        Ok(())
    }
    fn ran_this_boot(&self, _marker: &Path) -> Result<bool, cps_node::Error> {
        Ok(self.st().marker)
    }
    fn mark_ran_this_boot(&self, _marker: &Path) -> Result<(), cps_node::Error> {
        self.st().marker = true;
        Ok(())
    }
    async fn run_hook(
        &self,
        hook: &Hook,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<HookExit, cps_node::Error> {
        let (takes, exit) = {
            let mut st = self.st();
            st.runs
                .push((hook.name.clone(), Instant::now(), env.to_vec()));
            match hook.name.as_str() {
                "configure" => st
                    .configure
                    .unwrap_or((Duration::from_secs(5), HookExit::Success)),
                _ if st.health_always_fails => {
                    (Duration::from_secs(2), HookExit::Failed { code: Some(1) })
                }
                _ => st
                    .health
                    .pop_front()
                    .unwrap_or((Duration::from_secs(1), HookExit::Success)),
            }
        };
        if takes > timeout {
            tokio::time::sleep(timeout).await;
            return Ok(HookExit::TimedOut);
        }
        tokio::time::sleep(takes).await;
        Ok(exit)
    }
}

struct Cluster {
    cloud: MemoryCloud,
    disks: Disks,
}

struct Machine {
    id: String,
    zone: String,
    block: Arc<FakeHost>,
    node: Arc<FakeNode>,
}

impl Cluster {
    fn new(timing: Timing) -> Self {
        let cloud = MemoryCloud::new(timing);
        cloud.with(|w| {
            w.add_group(GROUP, &cluster_tags());
            w.add_launch_hook(
                GROUP,
                HOOK,
                Duration::from_secs(300),
                LifecycleResult::Abandon,
            );
        });
        Self {
            cloud,
            disks: Disks::default(),
        }
    }

    /// A new instance launched by the group (Pending:Wait) in `zone`.
    fn launch(&self, id: &str, zone: &str) -> Machine {
        self.cloud.with(|w| {
            w.add_instance(id, zone);
            w.join_group(id, GROUP);
        });
        Machine {
            id: id.into(),
            zone: zone.into(),
            block: FakeHost::new(&self.cloud, id, &self.disks),
            node: Arc::new(FakeNode {
                cloud: self.cloud.clone(),
                instance: id.into(),
                state: Mutex::new(NodeState::default()),
            }),
        }
    }

    /// A new instance the group launched that is `Pending` for `for_` before the hook holds it.
    fn launch_pending(&self, id: &str, zone: &str, for_: Duration) -> Machine {
        let m = self.launch(id, zone);
        self.cloud.with(|w| w.join_group_pending(id, GROUP, for_));
        m
    }

    async fn boot(&self, m: &Machine, config: &AttachConfig) -> Result<BootOutcome, Error> {
        let services = Services {
            volumes: &self.cloud,
            interfaces: &self.cloud,
            lifecycle: &self.cloud,
            secrets: &self.cloud,
            locks: Some(&self.cloud),
        };
        let hosts = Hosts {
            block: m.block.clone(),
            node: m.node.clone(),
        };
        boot(services, hosts, &identity(&m.id, &m.zone), config).await
    }

    fn log_for(&self, instance: &str) -> Vec<LifecycleEvent> {
        self.cloud
            .with(|w| w.lifecycle_log())
            .into_iter()
            .filter(|e| match e {
                LifecycleEvent::Heartbeat { instance_id, .. }
                | LifecycleEvent::Completed { instance_id, .. }
                | LifecycleEvent::TimedOut { instance_id, .. } => instance_id == instance,
            })
            .collect()
    }

    fn completions(&self, instance: &str) -> Vec<LifecycleResult> {
        self.log_for(instance)
            .into_iter()
            .filter_map(|e| match e {
                LifecycleEvent::Completed { result, .. } => Some(result),
                _ => None,
            })
            .collect()
    }
}

fn config(extra: &str) -> AttachConfig {
    let text = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: kafka}}\n    size: 10\nmount:\n  target: /data\nlifecycle:\n  hook: {HOOK}\n{extra}"
    );
    AttachConfig::parse("node.yml", &text, &Overrides::default()).unwrap()
}

const NODE: &str = "identity:\n  mode: node-id\n";

/// [`config`] with more lines under `aws-ebs:`.
fn config_ebs(ebs: &str, extra: &str) -> AttachConfig {
    let text = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: kafka}}\n    size: 10\n{ebs}mount:\n  target: /data\nlifecycle:\n  hook: {HOOK}\n{extra}"
    );
    AttachConfig::parse("node.yml", &text, &Overrides::default()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_slow_boot_alive_and_continue_is_sent_once() {
    let c = Cluster::new(Timing::default());
    let m = c.launch("i-1", AZ);
    c.cloud.with(|w| w.tag_instance("i-1", "cps:node-id", "1"));
    // Health fails three times, each run taking 80 s, then passes: about six minutes in all,
    // longer than the hook's 300 s heartbeat timeout would allow without heartbeats.
    m.node.st().health = VecDeque::from([
        (Duration::from_secs(80), HookExit::Failed { code: Some(1) }),
        (Duration::from_secs(80), HookExit::Failed { code: Some(1) }),
        (Duration::from_secs(80), HookExit::Failed { code: Some(1) }),
        (Duration::from_secs(80), HookExit::Success),
    ]);
    let cfg = config(&format!(
        "{NODE}hooks:\n  configure: [/bin/configure]\n  health: [/bin/health]\n  health-interval: 10s\n  health-timeout: 10m\n"
    ));
    let started = Instant::now();
    let out = c.boot(&m, &cfg).await.unwrap();
    assert_eq!(
        out.lifecycle,
        LifecycleOutcome::Completed(LifecycleResult::Continue)
    );
    assert_eq!(out.health_runs, 4);
    assert_eq!(out.node_id.as_deref(), Some("1"));
    assert!(
        started.elapsed() > Duration::from_secs(300),
        "the boot outlived the heartbeat timeout"
    );

    // Heartbeats every 100 s (a third of 300 s), none missing, and CONTINUE exactly once, last.
    let log = c.log_for("i-1");
    let beats: Vec<Instant> = log
        .iter()
        .filter_map(|e| match e {
            LifecycleEvent::Heartbeat { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    assert!(beats.len() >= 2, "{log:?}");
    let mut previous = started;
    for at in &beats {
        let gap = *at - previous;
        assert!(gap <= Duration::from_secs(101), "heartbeat gap {gap:?}");
        previous = *at;
    }
    assert_eq!(c.completions("i-1"), [LifecycleResult::Continue]);
    assert!(matches!(log.last(), Some(LifecycleEvent::Completed { .. })));
    assert!(
        !log.iter()
            .any(|e| matches!(e, LifecycleEvent::TimedOut { .. }))
    );
    assert_eq!(
        c.cloud.with(|w| w.lifecycle_state("i-1")).as_deref(),
        Some("InService")
    );
    // The hooks saw the identity.
    let runs = &m.node.st().runs;
    assert!(
        runs[0]
            .2
            .iter()
            .any(|(k, v)| k == "CPS_NODE_ID" && v == "1"),
        "{:?}",
        runs[0].2
    );
    assert!(runs[0].2.iter().any(|(k, _)| k == "CPS_VOLUME_ID"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_health_hook_abandons_so_the_group_replaces_the_node() {
    let c = Cluster::new(Timing::default());
    let m = c.launch("i-1", AZ);
    m.node.st().health_always_fails = true;
    let cfg = config(&format!(
        "{NODE}  node-id: '1'\nhooks:\n  health: [/bin/health]\n  health-timeout: 2m\n  health-interval: 10s\n"
    ));
    let err = c.boot(&m, &cfg).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Hook);
    assert!(
        err.to_string().contains("did not pass within 120s"),
        "{err}"
    );
    assert_eq!(c.completions("i-1"), [LifecycleResult::Abandon]);
    assert_eq!(
        c.cloud.with(|w| w.lifecycle_state("i-1")),
        None,
        "abandoned: terminated, out of the group"
    );
    // Bounded: about 120 s / 12 s per try.
    assert!(
        (5..=12).contains(&m.node.runs_of("health")),
        "{}",
        m.node.runs_of("health")
    );
}

#[tokio::test(start_paused = true)]
async fn on_failure_leave_keeps_the_instance_waiting() {
    let c = Cluster::new(Timing::default());
    let m = c.launch("i-1", AZ);
    m.node.st().configure = Some((Duration::from_secs(1), HookExit::Failed { code: Some(2) }));
    let cfg = config(&format!(
        "{NODE}  node-id: '1'\nhooks:\n  configure: [/bin/configure]\n"
    ));
    let cfg = AttachConfig {
        node: cps_orchestrate::config::NodeOptions {
            lifecycle: cfg.node.lifecycle.clone().map(|l| {
                cps_orchestrate::config::LifecycleOptions {
                    on_failure: cps_orchestrate::config::OnFailure::Leave,
                    ..l
                }
            }),
            ..cfg.node.clone()
        },
        ..cfg
    };
    let err = c.boot(&m, &cfg).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("hook configure failed: `/bin/configure`: exit 2"),
        "{err}"
    );
    assert!(c.completions("i-1").is_empty());
    assert_eq!(
        c.cloud.with(|w| w.lifecycle_state("i-1")).as_deref(),
        Some("Pending:Wait")
    );
}

#[tokio::test(start_paused = true)]
async fn a_rerun_is_not_waiting_and_configure_runs_once_per_boot() {
    let c = Cluster::new(Timing::default());
    let m = c.launch("i-1", AZ);
    let cfg = config(&format!(
        "{NODE}  node-id: '1'\nhooks:\n  configure: [/bin/configure]\n  health: [/bin/health]\n"
    ));
    let first = c.boot(&m, &cfg).await.unwrap();
    assert_eq!(first.configured, Some(true));
    let second = c.boot(&m, &cfg).await.unwrap();
    assert_eq!(second.lifecycle, LifecycleOutcome::NotWaiting);
    assert_eq!(second.configured, Some(false));
    assert_eq!(m.node.runs_of("configure"), 1);
    assert_eq!(
        m.node.runs_of("health"),
        2,
        "health is checked on every run"
    );
    assert_eq!(c.completions("i-1"), [LifecycleResult::Continue]);
}

/// Node 2's old server is shutting down and still holds its volume and interface: the new
/// one waits, then gets both.
#[tokio::test(start_paused = true)]
async fn the_old_holder_releases_after_a_delay_and_the_node_gets_its_volume_and_ip() {
    let c = Cluster::new(Timing::default());
    let cfg = config(&format!(
        "{NODE}  node-id: '2'\nnetwork-interface:\n  device-index: 1\nfiles:\n  - path: /etc/kafka/id.properties\n    content: \"broker.id=${{CPS_NODE_ID}}\\nadvertised=${{CPS_ENI_IP}}\\n\"\n"
    ));
    let eni = c
        .cloud
        .with(|w| w.add_interface(AZ, "10.0.1.12", &node_tags("2")));
    let old = c.launch("i-old", AZ);
    let first = c.boot(&old, &cfg).await.unwrap();
    assert_eq!(first.interface.as_ref().unwrap().id, eni);
    old.block.unmount_all();

    c.cloud
        .with(|w| w.begin_terminate("i-old", Duration::from_secs(45)));
    let new = c.launch("i-new", AZ);
    let started = Instant::now();
    let out = c.boot(&new, &cfg).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(45),
        "it waited for the old server"
    );
    assert_eq!(
        out.attach.volume_id, first.attach.volume_id,
        "node 2's volume"
    );
    let i = out.interface.unwrap();
    assert_eq!(
        (i.id.as_str(), i.private_ip.as_deref(), i.attached_now),
        (eni.as_str(), Some("10.0.1.12"), true)
    );
    assert_eq!(
        new.node.st().files[Path::new("/etc/kafka/id.properties")],
        b"broker.id=2\nadvertised=10.0.1.12\n"
    );
    assert!(
        new.node
            .st()
            .env
            .iter()
            .any(|(k, v)| k == "CPS_ENI_INTERFACE" && v == "eth1")
    );
    let volumes = c.cloud.volumes();
    assert_eq!(volumes.len(), 1, "no second volume for node 2");
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_never_releases_is_a_timeout_and_nothing_is_detached() {
    let c = Cluster::new(Timing::default());
    let cfg = config(&format!("{NODE}  node-id: '2'\n  release-timeout: 2m\n"));
    let old = c.launch("i-old", AZ);
    let first = c.boot(&old, &cfg).await.unwrap();
    let new = c.launch("i-new", AZ);
    let err = c.boot(&new, &cfg).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Timeout);
    let msg = err.to_string();
    assert!(
        msg.contains(&first.attach.volume_id) && msg.contains("i-old, which is running"),
        "{msg}"
    );
    assert!(msg.contains("never detached"), "{msg}");
    let vols = c.cloud.volumes();
    assert_eq!(vols.len(), 1);
    assert_eq!(
        vols[0].attachments[0].instance_id, "i-old",
        "still the old server's"
    );
    assert_eq!(c.completions("i-new"), [LifecycleResult::Abandon]);
}

#[tokio::test(start_paused = true)]
async fn the_node_id_comes_from_the_instance_or_its_group_or_nowhere() {
    let c = Cluster::new(Timing::default());
    let tagged = c.launch("i-a", AZ);
    c.cloud.with(|w| w.tag_instance("i-a", "cps:node-id", "7"));
    assert_eq!(
        c.boot(&tagged, &config(NODE))
            .await
            .unwrap()
            .node_id
            .as_deref(),
        Some("7")
    );

    let c = Cluster::new(Timing::default());
    c.cloud.with(|w| w.add_group(GROUP, &node_tags("9")));
    c.cloud.with(|w| {
        w.add_launch_hook(
            GROUP,
            HOOK,
            Duration::from_secs(300),
            LifecycleResult::Abandon,
        )
    });
    let from_group = c.launch("i-b", AZ);
    assert_eq!(
        c.boot(&from_group, &config(NODE))
            .await
            .unwrap()
            .node_id
            .as_deref(),
        Some("9")
    );

    let c = Cluster::new(Timing::default());
    let untagged = c.launch("i-c", AZ);
    let err = c.boot(&untagged, &config(NODE)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Identity);
    assert!(
        err.to_string()
            .contains("tag the instance or its Auto Scaling group with cps:node-id"),
        "{err}"
    );
    assert!(c.cloud.volumes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_node_whose_volume_is_in_another_zone_is_refused() {
    let c = Cluster::new(Timing::default());
    c.cloud
        .with(|w| w.add_volume("us-east-1b", 10, &node_tags("3")));
    let m = c.launch("i-1", AZ);
    let err = c
        .boot(&m, &config(&format!("{NODE}  node-id: '3'\n")))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Identity);
    assert!(err.to_string().contains("us-east-1b"), "{err}");
    assert_eq!(c.cloud.volumes().len(), 1, "no second volume for node 3");
}

/// Five instances boot at once against three slots: three claim distinct slots, none creates an
/// extra volume, two fail cleanly and abandon.
#[tokio::test(start_paused = true)]
async fn slot_claims_under_races_give_distinct_slots_and_clean_failures() {
    let c = Arc::new(Cluster::new(Timing {
        latency: Duration::from_millis(50),
        create_delay: Duration::from_secs(2),
        attach_delay: Duration::from_secs(1),
    }));
    let cfg = Arc::new(config("identity:\n  mode: slot\n  max-slots: 3\n"));
    let machines: Vec<Arc<Machine>> = (0..5)
        .map(|i| Arc::new(c.launch(&format!("i-{i}"), AZ)))
        .collect();
    let tasks: Vec<_> = machines
        .iter()
        .map(|m| {
            let (c, m, cfg) = (c.clone(), m.clone(), cfg.clone());
            tokio::spawn(async move { c.boot(&m, &cfg).await })
        })
        .collect();
    let mut slots = Vec::new();
    let mut failures = Vec::new();
    for (m, t) in machines.iter().zip(tasks) {
        match t.await.unwrap() {
            Ok(out) => slots.push(out.slot.unwrap()),
            Err(e) => failures.push((m.id.clone(), e)),
        }
    }
    slots.sort();
    assert_eq!(slots, [1, 2, 3]);
    assert_eq!(failures.len(), 2);
    for (id, e) in &failures {
        assert_eq!(e.class(), ErrorClass::Identity, "{e}");
        assert!(e.to_string().contains("no free slot: all 3 slots"), "{e}");
        assert_eq!(c.completions(id), [LifecycleResult::Abandon]);
    }
    assert_eq!(
        c.cloud.volumes().len(),
        3,
        "one volume per slot, none extra"
    );
}

#[tokio::test(start_paused = true)]
async fn a_single_boot_takes_the_lowest_free_slot() {
    let c = Cluster::new(Timing::default());
    c.cloud.with(|w| {
        for k in 1..=3 {
            let mut t = cluster_tags();
            t.insert("cps:slot".into(), k.to_string());
            let v = w.add_volume(AZ, 10, &t);
            if k != 2 {
                w.add_instance(&format!("i-holder-{k}"), AZ);
                w.attach(&v, &format!("i-holder-{k}"), "/dev/xvdc").unwrap();
            }
        }
    });
    let m = c.launch("i-new", AZ);
    let out = c
        .boot(&m, &config("identity:\n  mode: slot\n  max-slots: 5\n"))
        .await
        .unwrap();
    assert_eq!(out.slot, Some(2), "the free slot, not a new one");
    assert_eq!(out.node_id.as_deref(), Some("2"));
    assert_eq!(c.cloud.volumes().len(), 3);
}

/// Instances arriving at different moments (each having lost different races before) must
/// still never make two volumes for one slot: the creation token is the slot's, not the try's.
#[tokio::test(start_paused = true)]
async fn staggered_slot_claims_never_duplicate_a_slot() {
    for stagger_ms in [0u64, 150, 400, 900] {
        let c = Arc::new(Cluster::new(Timing {
            latency: Duration::from_millis(60),
            create_delay: Duration::from_millis(800),
            attach_delay: Duration::from_millis(300),
        }));
        let cfg = Arc::new(config("identity:\n  mode: slot\n  max-slots: 6\n"));
        let machines: Vec<Arc<Machine>> = (0..6)
            .map(|i| Arc::new(c.launch(&format!("i-{i}"), AZ)))
            .collect();
        let tasks: Vec<_> = machines
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (c, m, cfg) = (c.clone(), m.clone(), cfg.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(stagger_ms * i as u64)).await;
                    c.boot(&m, &cfg).await
                })
            })
            .collect();
        let mut slots = Vec::new();
        for t in tasks {
            slots.push(t.await.unwrap().unwrap().slot.unwrap());
        }
        slots.sort();
        assert_eq!(slots, [1, 2, 3, 4, 5, 6], "stagger {stagger_ms} ms");
        let vols = c.cloud.volumes();
        let mut per_slot = BTreeMap::new();
        for v in &vols {
            *per_slot.entry(v.tags["cps:slot"].clone()).or_insert(0) += 1;
        }
        assert!(
            per_slot.values().all(|n| *n == 1),
            "stagger {stagger_ms} ms: {per_slot:?}"
        );
    }
}

/// Two configurations (another size after a template change) creating the same node's volume
/// at once: one volume, the other request is refused by the token and finds it.
#[tokio::test(start_paused = true)]
async fn a_node_volume_is_created_once_even_by_differing_configs() {
    let c = Arc::new(Cluster::new(Timing {
        latency: Duration::from_millis(50),
        create_delay: Duration::from_secs(1),
        attach_delay: Duration::from_millis(200),
    }));
    let small = Arc::new(config(&format!(
        "{NODE}  node-id: '4'\n  release-timeout: 1m\n"
    )));
    let big =
        Arc::new(config(&format!("{NODE}  node-id: '4'\n  release-timeout: 1m\n")).tap_size(20));
    let a = Arc::new(c.launch("i-a", AZ));
    let b = Arc::new(c.launch("i-b", AZ));
    let ta = {
        let (c, a, small) = (c.clone(), a.clone(), small.clone());
        tokio::spawn(async move { c.boot(&a, &small).await })
    };
    let tb = {
        let (c, b, big) = (c.clone(), b.clone(), big.clone());
        tokio::spawn(async move { c.boot(&b, &big).await })
    };
    let (ra, rb) = (ta.await.unwrap(), tb.await.unwrap());
    assert_eq!(c.cloud.volumes().len(), 1, "one volume for node 4");
    // One of them is node 4; the other waited for it and timed out (it is held by a running node).
    assert_eq!(
        [ra.is_ok(), rb.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{ra:?} {rb:?}"
    );
}

trait TapSize {
    fn tap_size(self, gib: i32) -> Self;
}

impl TapSize for AttachConfig {
    fn tap_size(mut self, gib: i32) -> Self {
        self.volume.size_gib = gib;
        self
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_heartbeat_goes_out_at_once() {
    let c = Cluster::new(Timing::default());
    let m = c.launch("i-1", AZ);
    let started = Instant::now();
    c.boot(&m, &config(&format!("{NODE}  node-id: '1'\n")))
        .await
        .unwrap();
    let first = c.log_for("i-1").into_iter().find_map(|e| match e {
        LifecycleEvent::Heartbeat { at, .. } => Some(at),
        _ => None,
    });
    assert!(
        first.is_some_and(|at| at - started < Duration::from_secs(1)),
        "{:?}",
        c.log_for("i-1")
    );
}

/// Heartbeats refused (a missing permission): the hook expires and its default result decides.
/// cps-attach must not report success.
#[tokio::test(start_paused = true)]
async fn an_expired_lifecycle_action_is_not_success() {
    let c = Cluster::new(Timing::default());
    c.cloud.with(|w| {
        w.add_launch_hook(
            GROUP,
            HOOK,
            Duration::from_secs(60),
            LifecycleResult::Continue,
        )
    });
    let m = c.launch("i-1", AZ);
    c.cloud.inject(
        cps_provider::memory::Fault::fail(
            cps_provider::memory::RECORD_LIFECYCLE_ACTION_HEARTBEAT,
            cps_provider::Error::Unauthorized {
                operation: "RecordLifecycleActionHeartbeat",
                message: "not allowed".into(),
            },
        )
        .times(1000),
    );
    m.node.st().health = VecDeque::from([(Duration::from_secs(120), HookExit::Success)]);
    let err = c
        .boot(
            &m,
            &config(&format!(
                "{NODE}  node-id: '1'\nhooks:\n  health: [/bin/health]\n"
            )),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("expired before cps-attach completed it"),
        "{err}"
    );
    assert!(
        c.log_for("i-1")
            .iter()
            .any(|e| matches!(e, LifecycleEvent::TimedOut { .. }))
    );
}

/// The hook cannot be read (a missing permission), but its name is configured: the instance is
/// still abandoned at once rather than left to the hook's timeout.
#[tokio::test(start_paused = true)]
async fn a_failed_hook_lookup_still_abandons() {
    let c = Cluster::new(Timing::default());
    let m = c.launch("i-1", AZ);
    c.cloud.inject(
        cps_provider::memory::Fault::fail(
            cps_provider::memory::DESCRIBE_LIFECYCLE_HOOKS,
            cps_provider::Error::Unauthorized {
                operation: "DescribeLifecycleHooks",
                message: "not allowed".into(),
            },
        )
        .times(1000),
    );
    let err = c
        .boot(&m, &config(&format!("{NODE}  node-id: '1'\n")))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Cloud);
    assert_eq!(c.completions("i-1"), [LifecycleResult::Abandon]);
    assert!(c.cloud.volumes().is_empty(), "nothing was claimed");
}

/// With other instances booting in another zone, a single boot here still takes the free slot
/// here instead of creating a new one.
#[tokio::test(start_paused = true)]
async fn a_free_slot_is_taken_before_a_missing_one_is_created() {
    let c = Cluster::new(Timing::default());
    c.cloud.with(|w| {
        let mut t = cluster_tags();
        t.insert("cps:slot".into(), "1".into());
        w.add_volume(AZ, 10, &t);
    });
    for i in 0..3 {
        c.launch(&format!("i-far-{i}"), "us-east-1b");
    }
    let m = c.launch("i-here", AZ);
    let out = c
        .boot(&m, &config("identity:\n  mode: slot\n  max-slots: 5\n"))
        .await
        .unwrap();
    assert_eq!(out.slot, Some(1));
    assert_eq!(c.cloud.volumes().len(), 1, "no new slot created");
}

/// A small seeded generator (splitmix64), so every generated case can be replayed by its seed.
struct Draw(u64);

impl Draw {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = cps_orchestrate::backoff::mix(self.0);
        self.0 % n.max(1)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// Slot herds, generated: `n` slots in use (max-slots `max` ≥ n), the servers of `k` of them
/// shutting down with their volumes still attached, and `m` new instances booting at once. In
/// every case the leaving slots go to the new instances before any slot is created (min(m, k)
/// of them), only the others create (up to the headroom), no slot ever has two volumes, and
/// whoever gets nothing fails with "no free slot".
#[tokio::test(start_paused = true)]
async fn slot_herds_give_leaving_slots_to_replacements_before_creating() {
    for case in 0..48u64 {
        let mut d = Draw(case);
        let n = d.between(1, 5) as u32;
        let k = d.between(0, u64::from(n)) as u32;
        let max = n + d.between(0, 3) as u32;
        let m = d.between(1, 6) as u32;
        let shutdown = Duration::from_secs(d.between(2, 60));
        let c = Arc::new(Cluster::new(Timing {
            latency: Duration::from_millis(d.between(10, 80)),
            create_delay: Duration::from_millis(d.between(100, 1500)),
            attach_delay: Duration::from_millis(d.between(100, 1000)),
        }));
        let mut leaving = BTreeMap::new();
        c.cloud.with(|w| {
            for slot in 1..=n {
                let mut t = cluster_tags();
                t.insert("cps:slot".into(), slot.to_string());
                let v = w.add_volume(AZ, 10, &t);
                let holder = format!("i-old-{slot}");
                w.add_instance(&holder, AZ);
                w.attach(&v, &holder, "/dev/xvdc").unwrap();
                if slot > n - k {
                    w.begin_terminate(&holder, shutdown);
                    leaving.insert(slot, v);
                }
            }
        });
        let cfg = Arc::new(config(&format!(
            "identity:\n  mode: slot\n  max-slots: {max}\n"
        )));
        let machines: Vec<Arc<Machine>> = (0..m)
            .map(|i| Arc::new(c.launch(&format!("i-new-{i}"), AZ)))
            .collect();
        let tasks: Vec<_> = machines
            .iter()
            .map(|mach| {
                let (c, mach, cfg) = (c.clone(), mach.clone(), cfg.clone());
                tokio::spawn(async move { c.boot(&mach, &cfg).await })
            })
            .collect();
        let mut got = BTreeMap::new();
        let mut failed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(out) => {
                    let slot = out.slot.unwrap();
                    assert!(
                        got.insert(slot, out.attach.volume_id).is_none(),
                        "case {case}: slot {slot} claimed twice"
                    );
                }
                Err(e) => {
                    assert!(
                        e.to_string().contains("no free slot"),
                        "case {case} (n {n}, k {k}, max {max}, m {m}): {e}"
                    );
                    failed += 1;
                }
            }
        }
        let what = format!("case {case}: n {n}, k {k}, max {max}, m {m}: got {got:?}");
        let reclaimed = leaving
            .iter()
            .filter(|(slot, v)| got.get(slot) == Some(v))
            .count() as u32;
        assert_eq!(
            reclaimed,
            m.min(k),
            "leaving slots go to replacements; {what}"
        );
        let created = got.keys().filter(|s| **s > n).count() as u32;
        assert_eq!(
            created,
            m.saturating_sub(k).min(max - n),
            "only the rest create; {what}"
        );
        assert_eq!(failed, m - reclaimed - created, "{what}");
        let mut per_slot: BTreeMap<String, u32> = BTreeMap::new();
        for v in c.cloud.volumes() {
            *per_slot.entry(v.tags["cps:slot"].clone()).or_default() += 1;
        }
        assert!(per_slot.values().all(|c| *c == 1), "{what}: {per_slot:?}");
    }
}

/// Node 4's volume was deleted by an operator; two of its instances boot at once. The node's
/// token answers with the deleted volume, so both move on to the next token — the same one —
/// and node 4 gets exactly one new volume.
#[tokio::test(start_paused = true)]
async fn two_instances_recreating_a_deleted_node_volume_make_one() {
    let c = Arc::new(Cluster::new(Timing {
        latency: Duration::from_millis(50),
        create_delay: Duration::from_secs(1),
        attach_delay: Duration::from_millis(200),
    }));
    let cfg = Arc::new(config(&format!(
        "{NODE}  node-id: '4'\n  release-timeout: 2m\n"
    )));
    let first = c.launch("i-first", AZ);
    let out = c.boot(&first, &cfg).await.unwrap();
    first.block.unmount_all();
    c.cloud.with(|w| {
        w.terminate_instance("i-first");
        w.delete_volume(&out.attach.volume_id);
    });
    let a = Arc::new(c.launch("i-a", AZ));
    let b = Arc::new(c.launch("i-b", AZ));
    let runs: Vec<_> = [a, b]
        .into_iter()
        .map(|m| {
            let (c, cfg) = (c.clone(), cfg.clone());
            tokio::spawn(async move { c.boot(&m, &cfg).await })
        })
        .collect();
    let mut ok = 0;
    for r in runs {
        if r.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    let volumes = c.cloud.volumes();
    assert_eq!(volumes.len(), 1, "one new volume for node 4: {volumes:?}");
    assert_ne!(volumes[0].id, out.attach.volume_id);
    assert_eq!(ok, 1, "one of them is node 4, the other waits for it");
}

/// The heartbeat and lifecycle state machine, generated: the instance is `Pending` for a while
/// (up to two heartbeat intervals) before its hook holds it, the boot takes up to three hook
/// timeouts, heartbeats fail now and then, and in some cases are refused for good. Whenever the
/// heartbeats get through, the action never expires and the boot ends with CONTINUE; whenever
/// the action expired, the boot is not reported as a success.
#[tokio::test(start_paused = true)]
async fn heartbeats_keep_the_action_alive_from_pending_to_completion() {
    for case in 0..40u64 {
        let mut d = Draw(1000 + case);
        let timeout = Duration::from_secs(d.between(30, 300));
        let interval = timeout / 3;
        let pending = Duration::from_secs(d.between(0, 2 * interval.as_secs()));
        let boot_takes = Duration::from_secs(d.between(1, 3 * timeout.as_secs()));
        let refused = d.below(4) == 0;
        let flaky = d.below(3) as u32;
        let c = Cluster::new(Timing::default());
        c.cloud.with(|w| {
            w.add_launch_hook(GROUP, HOOK, timeout, LifecycleResult::Abandon);
        });
        let m = c.launch_pending("i-1", AZ, pending);
        let failure = if refused {
            cps_provider::Error::Unauthorized {
                operation: "RecordLifecycleActionHeartbeat",
                message: "not allowed".into(),
            }
        } else {
            cps_provider::Error::Transient {
                operation: "RecordLifecycleActionHeartbeat",
                message: "connection reset".into(),
            }
        };
        c.cloud.inject(
            cps_provider::memory::Fault::fail(
                cps_provider::memory::RECORD_LIFECYCLE_ACTION_HEARTBEAT,
                failure,
            )
            .times(if refused { 10_000 } else { flaky }),
        );
        m.node.st().configure = Some((boot_takes, HookExit::Success));
        let cfg = config(&format!(
            "{NODE}  node-id: '1'\nhooks:\n  configure: [/bin/configure]\n  timeout: 1h\n"
        ));
        let out = c.boot(&m, &cfg).await;
        let expired = c
            .log_for("i-1")
            .iter()
            .any(|e| matches!(e, LifecycleEvent::TimedOut { .. }));
        let what = format!(
            "case {case}: timeout {timeout:?}, pending {pending:?}, boot {boot_takes:?}, refused {refused}, flaky {flaky}: {out:?} {:?}",
            c.log_for("i-1")
        );
        if expired {
            assert!(out.is_err(), "an expired action is not a success; {what}");
        }
        if !refused {
            assert!(!expired, "heartbeats kept the action alive; {what}");
            assert_eq!(
                out.as_ref().map(|o| o.lifecycle).ok(),
                Some(LifecycleOutcome::Completed(LifecycleResult::Continue)),
                "{what}"
            );
            assert_eq!(c.completions("i-1"), [LifecycleResult::Continue], "{what}");
        }
    }
}

/// The node's interface looks available, but every AttachNetworkInterface is refused as in use
/// (another instance keeps winning it): the attach loop backs off between tries and gives up at
/// the release timeout, like every other wait, instead of retrying at once forever.
#[tokio::test(start_paused = true)]
async fn an_interface_that_keeps_being_taken_is_retried_with_backoff_and_a_deadline() {
    let c = Cluster::new(Timing {
        latency: Duration::from_millis(50),
        ..Timing::default()
    });
    c.cloud
        .with(|w| w.add_interface(AZ, "10.0.1.15", &node_tags("5")));
    c.cloud.inject(
        cps_provider::memory::Fault::fail(
            cps_provider::memory::ATTACH_NETWORK_INTERFACE,
            cps_provider::Error::InterfaceInUse {
                interface_id: "eni".into(),
                message: "Interface: [eni] in use.".into(),
            },
        )
        .times(u32::MAX),
    );
    let m = c.launch("i-1", AZ);
    let cfg = config(&format!(
        "{NODE}  node-id: '5'\n  release-timeout: 2m\nnetwork-interface:\n  device-index: 1\n"
    ));
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(3600), c.boot(&m, &cfg)).await;
    let tries = c
        .cloud
        .calls()
        .count(cps_provider::memory::ATTACH_NETWORK_INTERFACE);
    let Ok(out) = out else {
        panic!("still retrying after an hour: {tries} AttachNetworkInterface");
    };
    let err = out.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Timeout, "{err}");
    assert!(
        started.elapsed() <= Duration::from_secs(130),
        "{:?}",
        started.elapsed()
    );
    assert!((5..=80).contains(&tries), "{tries} tries in 2 minutes");
    assert_eq!(c.completions("i-1"), [LifecycleResult::Abandon]);
}

/// `boot_until`: a stop while the boot waits for a holder ends the wait at once, abandons the
/// lifecycle action (the configured on-failure) and leaves the holder's volume alone.
#[tokio::test(start_paused = true)]
async fn a_stop_ends_the_wait_and_abandons() {
    let c = Cluster::new(Timing::default());
    let cfg = config(&format!("{NODE}  node-id: '2'\n  release-timeout: 10m\n"));
    let old = c.launch("i-old", AZ);
    c.boot(&old, &cfg).await.unwrap();
    let new = c.launch("i-new", AZ);
    let services = Services {
        volumes: &c.cloud,
        interfaces: &c.cloud,
        lifecycle: &c.cloud,
        secrets: &c.cloud,
        locks: Some(&c.cloud),
    };
    let hosts = Hosts {
        block: new.block.clone(),
        node: new.node.clone(),
    };
    let started = Instant::now();
    let stop = tokio::time::sleep(Duration::from_secs(20));
    let err = cps_orchestrate::boot_until(services, hosts, &identity("i-new", AZ), &cfg, stop)
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Interrupted, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(21),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(c.completions("i-new"), [LifecycleResult::Abandon]);
    let vols = c.cloud.volumes();
    assert_eq!(vols[0].attachments[0].instance_id, "i-old");
}

/// Files from the secret stores: read with retries (throttling), written as is; a missing one
/// fails the boot before any file is written, naming the file and the parameter, and the
/// group is told ABANDON.
#[tokio::test(start_paused = true)]
async fn secrets_are_read_before_any_file_is_written_and_a_missing_one_fails_the_boot() {
    use cps_provider::memory::{Fault, GET_PARAMETER};
    let c = Cluster::new(Timing::default());
    c.cloud.with(|w| {
        w.put_secret("kafka/tls-key", b"-----KEY-----\n");
        w.put_parameter("/kafka/jaas", b"password=${CPS_NODE_ID} stays as is");
    });
    c.cloud.inject(Fault::throttle(GET_PARAMETER, 2));
    let files = "files:\n  - path: /etc/kafka/tls.key\n    content-from: secretsmanager:kafka/tls-key\n    mode: '0600'\n  - path: /etc/kafka/jaas.conf\n    content-from: ssm:/kafka/jaas\n";
    let m = c.launch("i-1", AZ);
    let out = c
        .boot(&m, &config(&format!("{NODE}  node-id: '1'\n{files}")))
        .await
        .unwrap();
    assert_eq!(out.files_changed, 2);
    assert_eq!(
        m.node.st().files[Path::new("/etc/kafka/jaas.conf")],
        b"password=${CPS_NODE_ID} stays as is"
    );
    assert_eq!(
        m.node.st().files[Path::new("/etc/kafka/tls.key")],
        b"-----KEY-----\n"
    );

    let missing =
        format!("{files}  - path: /etc/kafka/other\n    content-from: ssm:/kafka/missing\n");
    let m = c.launch("i-2", AZ);
    let err = c
        .boot(&m, &config(&format!("{NODE}  node-id: '2'\n{missing}")))
        .await
        .unwrap_err();
    assert_eq!(err.class(), cps_orchestrate::ErrorClass::Cloud);
    let text = err.to_string();
    assert!(
        text.contains("/etc/kafka/other") && text.contains("/kafka/missing"),
        "{text}"
    );
    assert!(m.node.st().files.is_empty(), "no file written");
    assert_eq!(c.completions("i-2"), [LifecycleResult::Abandon]);
}

// Restore and relocation: a created volume from a snapshot, and a node's volume moved from
// another zone under the lock — also by agents racing in two zones that crash at any point.

const OTHER_AZ: &str = "us-east-1b";
const RELOCATION: &str = "relocation:\n  mode: snapshot\n  lock-table: cps-locks\n";

/// Node `id`'s first boot in `zone`, its service writing data; then the instance is gone.
/// Returns the volume id.
async fn node_with_data(c: &Cluster, id: &str, zone: &str, cfg: &AttachConfig) -> String {
    let first = c.launch(&format!("i-first-{id}"), zone);
    let out = c.boot(&first, cfg).await.unwrap();
    first.block.write_user_data(&out.attach.volume_id);
    first.block.unmount_all();
    c.cloud.with(|w| w.terminate_instance(&first.id));
    out.attach.volume_id
}

#[tokio::test(start_paused = true)]
async fn a_deleted_node_volume_comes_back_from_its_newest_completed_snapshot() {
    let c = Cluster::new(Timing::default());
    let cfg = config(&format!("{NODE}  node-id: '4'\n"));
    let vid = node_with_data(&c, "4", AZ, &cfg).await;
    let data = c.disks.lock().unwrap().get(&vid).cloned().unwrap();
    let (older, newest) = c.cloud.with(|w| {
        let older = w.create_snapshot(&vid, "older", &node_tags("4")).unwrap();
        let newest = w.create_snapshot(&vid, "newest", &node_tags("4")).unwrap();
        // One still pending, newer than both: never restored from.
        w.set_snapshot_delay(Duration::from_secs(3600));
        w.create_snapshot(&vid, "pending", &node_tags("4")).unwrap();
        w.delete_volume(&vid);
        (older, newest)
    });
    assert_ne!(older.id, newest.id);

    let restore = config_ebs(
        "    restore-if-missing: true\n",
        &format!("{NODE}  node-id: '4'\n"),
    );
    let m = c.launch("i-back", AZ);
    let creates = c.cloud.calls().count(CREATE_VOLUME);
    let out = c.boot(&m, &restore).await.unwrap();
    // The deleted volume's creation token is not in the way: one CreateVolume, no wait for it.
    assert_eq!(c.cloud.calls().count(CREATE_VOLUME) - creates, 1);
    let volume = c
        .cloud
        .volumes()
        .into_iter()
        .find(|v| v.id == out.attach.volume_id)
        .unwrap();
    assert_eq!(volume.snapshot_id.as_deref(), Some(newest.id.as_str()));
    assert!(
        matches!(
            out.attach.filesystem,
            cps_orchestrate::FsOutcome::Existing(_)
        ),
        "kept, not formatted: {:?}",
        out.attach.filesystem
    );
    assert_eq!(m.block.st().mkfs_runs, 0);
    assert_eq!(c.disks.lock().unwrap().get(&volume.id), Some(&data));
}

#[tokio::test(start_paused = true)]
async fn restore_without_a_snapshot_is_refused_or_starts_empty_as_configured() {
    let c = Cluster::new(Timing::default());
    let strict = config_ebs("    snapshot: latest\n", &format!("{NODE}  node-id: '5'\n"));
    let m = c.launch("i-strict", AZ);
    let err = c.boot(&m, &strict).await.unwrap_err();
    assert!(matches!(err, Error::NoSnapshot { .. }), "{err}");
    assert!(c.cloud.volumes().is_empty(), "nothing created");

    let lenient = config_ebs(
        "    restore-if-missing: true\n",
        &format!("{NODE}  node-id: '5'\n"),
    );
    let m = c.launch("i-lenient", AZ);
    let out = c.boot(&m, &lenient).await.unwrap();
    assert!(matches!(
        out.attach.filesystem,
        cps_orchestrate::FsOutcome::Created(_)
    ));

    let pending = c.cloud.with(|w| {
        w.set_snapshot_delay(Duration::from_secs(3600));
        w.create_snapshot(&out.attach.volume_id, "pending", &node_tags("5"))
            .unwrap()
    });
    let named = config_ebs(
        &format!("    snapshot-id: {}\n", pending.id),
        &format!("{NODE}  node-id: '6'\n"),
    );
    let m = c.launch("i-named", AZ);
    let err = c.boot(&m, &named).await.unwrap_err();
    assert!(matches!(err, Error::SnapshotNotReady { .. }), "{err}");
}

/// The moved-volume checks every relocation test ends with: one claimable volume for the node
/// (its identity tag, not retired), holding the data, attached to at most one instance; the
/// source retired, not deleted; at most one relocation snapshot and one copy.
fn assert_moved(c: &Cluster, source: &str, data: &common::Content, what: &str) -> String {
    let volumes = c.cloud.volumes();
    let claimable: Vec<_> = volumes
        .iter()
        .filter(|v| {
            v.tags.get("cps:node-id").map(String::as_str) == Some("7")
                && !v.tags.contains_key("cps:retired-by")
        })
        .collect();
    assert_eq!(
        claimable.len(),
        1,
        "{what}: one claimable volume: {volumes:?}"
    );
    let node = claimable[0];
    assert!(node.attachments.len() <= 1, "{what}: {node:?}");
    assert_eq!(
        c.disks.lock().unwrap().get(&node.id),
        Some(data),
        "{what}: the node's data"
    );
    let copies = volumes
        .iter()
        .filter(|v| v.tags.get("cps:relocated-from").map(String::as_str) == Some(source))
        .count();
    assert!(copies <= 1, "{what}: {copies} copies");
    let src = volumes
        .iter()
        .find(|v| v.id == source)
        .unwrap_or_else(|| panic!("{what}: the source was deleted"));
    if node.id != source {
        assert_eq!(
            src.tags.get("cps:retired-by"),
            Some(&node.id),
            "{what}: source retired"
        );
        assert!(!src.tags.contains_key("cps:node-id"), "{what}");
    }
    let snaps = c.cloud.with(|w| {
        w.snapshots_tagged(&Tags::from([(
            "cps:relocation-of".to_string(),
            source.to_string(),
        )]))
    });
    assert!(snaps.len() <= 1, "{what}: {} snapshots", snaps.len());
    node.id.clone()
}

#[tokio::test(start_paused = true)]
async fn a_node_volume_in_another_zone_is_moved_here_with_its_data() {
    let c = Cluster::new(Timing::default());
    c.cloud
        .with(|w| w.set_snapshot_delay(Duration::from_secs(40)));
    let cfg = config(&format!("{NODE}  node-id: '7'\n{RELOCATION}"));
    let source = node_with_data(&c, "7", OTHER_AZ, &cfg).await;
    let data = c.disks.lock().unwrap().get(&source).cloned().unwrap();

    let m = c.launch("i-moved", AZ);
    let out = c.boot(&m, &cfg).await.unwrap();
    let copy = assert_moved(&c, &source, &data, "moved");
    assert_eq!(out.attach.volume_id, copy);
    assert_ne!(copy, source);
    assert_eq!(m.block.st().mkfs_runs, 0, "the copy is never formatted");
    let item = c
        .cloud
        .with(|w| w.lock_item(&relocate::lock_key(&node_tags("7"))))
        .unwrap();
    assert_eq!(item.owner, None, "released");
    assert!(item.record.is_empty(), "the move is finished: {item:?}");

    // A re-run and a replacement here just claim the copy.
    let snapshots = c.cloud.calls().count(CREATE_SNAPSHOT);
    c.boot(&m, &cfg).await.unwrap();
    m.block.unmount_all();
    c.cloud.with(|w| w.terminate_instance(&m.id));
    let next = c.launch("i-next", AZ);
    assert_eq!(c.boot(&next, &cfg).await.unwrap().attach.volume_id, copy);
    assert_eq!(c.cloud.calls().count(CREATE_SNAPSHOT), snapshots);

    // Relocation off: the refusal stands, as before.
    let off = config(&format!("{NODE}  node-id: '7'\n"));
    next.block.unmount_all();
    c.cloud.with(|w| w.terminate_instance(&next.id));
    let far = c.launch("i-far", OTHER_AZ);
    let err = c.boot(&far, &off).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Identity, "{err}");
}

/// One agent per zone in `zones`, started within 3 s of each other, each killed (its run
/// dropped wherever it is; nothing released) up to twice at random times and run again, then
/// run to its end: whether each got through.
fn racing_agents(
    c: &Arc<Cluster>,
    cfg: &Arc<AttachConfig>,
    zones: &[&str],
    seed: u64,
    next: &mut impl FnMut(u64) -> u64,
) -> Vec<tokio::task::JoinHandle<bool>> {
    zones
        .iter()
        .enumerate()
        .map(|(i, zone)| {
            let m = c.launch(&format!("i-{seed}-{i}"), zone);
            let start = Duration::from_millis(next(3000));
            let kills: Vec<Duration> = (0..next(3))
                .map(|_| Duration::from_millis(200 + next(60_000)))
                .collect();
            let (c, cfg) = (c.clone(), cfg.clone());
            tokio::spawn(async move {
                tokio::time::sleep(start).await;
                for kill in kills {
                    if let Ok(Ok(_)) = tokio::time::timeout(kill, c.boot(&m, &cfg)).await {
                        return true;
                    }
                }
                c.boot(&m, &cfg).await.is_ok()
            })
        })
        .collect()
}

/// Awaits the racing runs while sampling the cloud every 10 ms of virtual time; returns how
/// many runs succeeded and the worst of each of `measure`'s two counts seen meanwhile.
async fn race_watched(
    c: &Arc<Cluster>,
    runs: Vec<tokio::task::JoinHandle<bool>>,
    measure: impl Fn(&[cps_provider::Volume]) -> (usize, usize) + Send + 'static,
) -> (usize, usize, usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (c, stop) = (c.clone(), stop.clone());
        tokio::spawn(async move {
            let mut worst = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (a, b) = measure(&c.cloud.volumes());
                worst = (worst.0.max(a), worst.1.max(b));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            worst
        })
    };
    let mut ok = 0;
    for r in runs {
        ok += usize::from(r.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (a, b) = watcher.await.unwrap();
    (ok, a, b)
}

/// Agents of node 7 in two zones race while its volume sits in one of them, and each may be
/// killed at any moment (its run dropped at a random virtual time: mid-request, between a
/// snapshot and its copy, between retiring the source and handing over, holding the lock),
/// then run again on the same machine. Whatever happens: never two claimable volumes, never
/// the data lost, at most one snapshot and one copy, the source never deleted — and once the
/// crashes stop, every surviving run converges.
#[tokio::test(start_paused = true)]
async fn racing_agents_in_two_zones_crashing_anywhere_move_the_volume_at_most_once() {
    let mut moved = 0;
    for seed in 0..24u64 {
        let c = Arc::new(Cluster::new(Timing {
            latency: Duration::from_millis(50),
            create_delay: Duration::from_secs(1),
            attach_delay: Duration::from_millis(500),
        }));
        c.cloud
            .with(|w| w.set_snapshot_delay(Duration::from_secs(20)));
        let cfg = Arc::new(config(&format!(
            "{NODE}  node-id: '7'\n  release-timeout: 2m\n{RELOCATION}  lease: 20s\n"
        )));
        let source = node_with_data(&c, "7", OTHER_AZ, &cfg).await;
        let data = c.disks.lock().unwrap().get(&source).cloned().unwrap();
        let mut rng = cps_orchestrate::backoff::mix(seed + 1);
        let mut next = move |n: u64| {
            rng = cps_orchestrate::backoff::mix(rng);
            rng % n
        };
        // Two agents here, one in the source's zone (in 1 of 3 seeds).
        let mut zones = vec![AZ, AZ];
        if seed % 3 == 0 {
            zones.push(OTHER_AZ);
        }
        let runs = racing_agents(&c, &cfg, &zones, seed, &mut next);
        // Never two claimable volumes of node 7, never two of its volumes attached (two live
        // copies).
        let (ok, claimable, attached) = race_watched(&c, runs, |volumes| {
            let of_node = |v: &&cps_provider::Volume| {
                v.tags.get("cps:node-id").map(String::as_str) == Some("7")
            };
            let claimable = volumes
                .iter()
                .filter(of_node)
                .filter(|v| !v.tags.contains_key("cps:retired-by"))
                .count();
            let attached = volumes
                .iter()
                .filter(|v| of_node(v) || v.tags.contains_key("cps:relocated-from"))
                .filter(|v| !v.attachments.is_empty())
                .count();
            (claimable, attached)
        })
        .await;
        let what = format!("seed {seed}");
        assert!(
            claimable <= 1,
            "{what}: {claimable} claimable volumes at once"
        );
        assert!(
            attached <= 1,
            "{what}: {attached} of the node's volumes attached at once"
        );
        if assert_moved(&c, &source, &data, &what) != source {
            moved += 1;
        }
        assert!(ok >= 1, "{what}: someone is node 7");
    }
    // Not a vacuous pass: in most seeds an agent here moved the volume.
    assert!(moved >= 12, "moved in {moved} of 24 seeds");
}

/// A move stopped at each of its requests (before and after its effect) is finished by the
/// next run, on this instance or another one here: the lock's record says a move is unfinished,
/// and every step finds what the stopped one did. Never two claimable volumes, the data kept.
#[tokio::test(start_paused = true)]
async fn a_move_stopped_at_every_step_is_finished_by_the_next_run() {
    use cps_provider::memory::{
        CREATE_VOLUME, DELETE_TAGS, DESCRIBE_SNAPSHOTS, Fault, UPDATE_ITEM,
    };
    let steps: [(&str, &'static str, u32); 8] = [
        ("the snapshot", CREATE_SNAPSHOT, 0),
        ("a look at the snapshot", DESCRIBE_SNAPSHOTS, 2),
        ("the copy", CREATE_VOLUME, 0),
        ("retiring the source", "CreateTags", 0),
        ("removing its identity", DELETE_TAGS, 0),
        ("handing the identity over", "CreateTags", 1),
        ("writing the record", UPDATE_ITEM, 1),
        ("clearing the record", UPDATE_ITEM, 2),
    ];
    for (name, op, passing) in steps {
        for after in [false, true] {
            let what = format!(
                "{name} ({})",
                if after { "after its effect" } else { "before" }
            );
            let c = Cluster::new(Timing::default());
            c.cloud
                .with(|w| w.set_snapshot_delay(Duration::from_secs(10)));
            let cfg = config(&format!("{NODE}  node-id: '7'\n{RELOCATION}"));
            let source = node_with_data(&c, "7", OTHER_AZ, &cfg).await;
            let data = c.disks.lock().unwrap().get(&source).cloned().unwrap();
            let fault = Fault::crash(op).after(passing);
            c.cloud
                .inject(if after { fault.after_effect() } else { fault });
            let m = c.launch("i-stopped", AZ);
            assert!(c.boot(&m, &cfg).await.is_err(), "{what}: the run stopped");
            assert!(
                c.cloud
                    .volumes()
                    .iter()
                    .filter(
                        |v| v.tags.get("cps:node-id").map(String::as_str) == Some("7")
                            && !v.tags.contains_key("cps:retired-by")
                    )
                    .count()
                    <= 1,
                "{what}: two claimable volumes after the stop"
            );
            // The next run: another instance here (the stopped one is gone).
            m.block.unmount_all();
            c.cloud.with(|w| w.terminate_instance(&m.id));
            let next = c.launch("i-next", AZ);
            let out = c
                .boot(&next, &cfg)
                .await
                .unwrap_or_else(|e| panic!("{what}: the next run failed: {e}"));
            let copy = assert_moved(&c, &source, &data, &what);
            assert_eq!(out.attach.volume_id, copy, "{what}");
            assert_ne!(copy, source, "{what}: moved");
            assert_eq!(next.block.st().mkfs_runs, 0, "{what}: never formatted");
        }
    }
}

// Relocation in slot and pool modes: a volume free only in another zone is moved here when
// nothing here is to be had, and every attach takes the lock of what it takes.

const SLOTS: &str = "identity:\n  mode: slot\n  max-slots: 3\n";

/// Slots 1..=3 booted in `zone`, each written to, then their instances gone: slot → (volume,
/// its content).
async fn slots_with_data(c: &Cluster, zone: &str) -> BTreeMap<u32, (String, common::Content)> {
    let cfg = config(SLOTS);
    let mut slots = BTreeMap::new();
    // All three up before any goes: a slot freed early would be taken again.
    let mut up = Vec::new();
    for i in 1..=3 {
        let m = c.launch(&format!("i-old-{i}"), zone);
        let out = c.boot(&m, &cfg).await.unwrap();
        up.push((m, out));
    }
    for (m, out) in up {
        m.block.write_user_data(&out.attach.volume_id);
        m.block.unmount_all();
        c.cloud.with(|w| w.terminate_instance(&m.id));
        let data = c
            .disks
            .lock()
            .unwrap()
            .get(&out.attach.volume_id)
            .cloned()
            .unwrap();
        slots.insert(out.slot.unwrap(), (out.attach.volume_id, data));
    }
    slots
}

/// Per slot: one claimable volume (its slot tag, not retired), holding the slot's data and
/// attached to at most one instance; a moved source retired (not deleted, its slot tag gone);
/// at most one relocation snapshot and one copy per source. Returns slot → the volume now.
fn assert_slots_moved(
    c: &Cluster,
    slots: &BTreeMap<u32, (String, common::Content)>,
    what: &str,
) -> BTreeMap<u32, String> {
    let volumes = c.cloud.volumes();
    let mut now = BTreeMap::new();
    for (k, (source, data)) in slots {
        let claimable: Vec<_> = volumes
            .iter()
            .filter(|v| {
                v.tags.get("cps:slot") == Some(&k.to_string())
                    && !v.tags.contains_key("cps:retired-by")
            })
            .collect();
        assert_eq!(claimable.len(), 1, "{what}: slot {k}: {volumes:?}");
        let v = claimable[0];
        assert!(v.attachments.len() <= 1, "{what}: {v:?}");
        assert_eq!(
            c.disks.lock().unwrap().get(&v.id),
            Some(data),
            "{what}: slot {k}'s data"
        );
        let src = volumes
            .iter()
            .find(|s| &s.id == source)
            .unwrap_or_else(|| panic!("{what}: slot {k}'s source was deleted"));
        if &v.id != source {
            assert_eq!(src.tags.get("cps:retired-by"), Some(&v.id), "{what}");
            assert!(!src.tags.contains_key("cps:slot"), "{what}: {src:?}");
        }
        let copies = volumes
            .iter()
            .filter(|x| x.tags.get("cps:relocated-from") == Some(source))
            .count();
        assert!(copies <= 1, "{what}: slot {k}: {copies} copies");
        now.insert(*k, v.id.clone());
    }
    now
}

#[tokio::test(start_paused = true)]
async fn slots_left_in_a_lost_zone_are_moved_one_to_each_agent_here() {
    let c = Arc::new(Cluster::new(Timing::default()));
    c.cloud
        .with(|w| w.set_snapshot_delay(Duration::from_secs(30)));
    let slots = slots_with_data(&c, OTHER_AZ).await;

    // Relocation off: no slot here, and the refusal names the free ones elsewhere.
    let m = c.launch("i-off", AZ);
    let err = c.boot(&m, &config(SLOTS)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no free slot") && text.contains("free in other zones"),
        "{text}"
    );
    c.cloud.with(|w| w.terminate_instance(&m.id));

    // Three agents here at once: each moves a different slot.
    let cfg = Arc::new(config(&format!("{SLOTS}{RELOCATION}")));
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let (c, cfg) = (c.clone(), cfg.clone());
            let m = c.launch(&format!("i-new-{i}"), AZ);
            tokio::spawn(async move { (c.boot(&m, &cfg).await, m) })
        })
        .collect();
    let mut got = Vec::new();
    for r in runs {
        let (out, m) = r.await.unwrap();
        let out = out.unwrap();
        assert_eq!(m.block.st().mkfs_runs, 0, "a moved slot is never formatted");
        got.push((out.slot.unwrap(), out.attach.volume_id));
    }
    got.sort();
    let now = assert_slots_moved(&c, &slots, "three agents");
    assert_eq!(got, now.into_iter().collect::<Vec<_>>());
    assert_eq!(
        c.cloud.calls().count(CREATE_SNAPSHOT),
        3,
        "one snapshot per slot"
    );

    // A fourth agent: nothing left to move, nothing to create.
    let m = c.launch("i-fourth", AZ);
    let err = c.boot(&m, &cfg).await.unwrap_err();
    assert!(err.to_string().contains("no free slot"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_pool_volume_free_only_elsewhere_is_moved_before_a_new_one_is_made() {
    let c = Arc::new(Cluster::new(Timing::default()));
    let pool = config("");
    let mut sources = BTreeMap::new();
    let mut up = Vec::new();
    for i in 0..2 {
        let m = c.launch(&format!("i-old-{i}"), OTHER_AZ);
        let out = c.boot(&m, &pool).await.unwrap();
        up.push((m, out));
    }
    for (m, out) in up {
        m.block.write_user_data(&out.attach.volume_id);
        m.block.unmount_all();
        c.cloud.with(|w| w.terminate_instance(&m.id));
        let data = c.disks.lock().unwrap()[&out.attach.volume_id].clone();
        sources.insert(out.attach.volume_id, data);
    }
    let cfg = Arc::new(config(RELOCATION));
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let (c, cfg) = (c.clone(), cfg.clone());
            let m = c.launch(&format!("i-new-{i}"), AZ);
            tokio::spawn(async move { (c.boot(&m, &cfg).await.unwrap(), m) })
        })
        .collect();
    let mut moved = BTreeMap::new();
    let mut created = 0;
    for r in runs {
        let (out, m) = r.await.unwrap();
        match out.attach.filesystem {
            cps_orchestrate::FsOutcome::Created(_) => created += 1,
            _ => {
                assert_eq!(m.block.st().mkfs_runs, 0);
                let v = c
                    .cloud
                    .volumes()
                    .into_iter()
                    .find(|v| v.id == out.attach.volume_id)
                    .unwrap();
                let from = v.tags["cps:relocated-from"].clone();
                assert!(!v.tags.contains_key("cps:handover"), "handed over: {v:?}");
                assert_eq!(v.tags.get("cluster").map(String::as_str), Some("kafka"));
                assert_eq!(
                    c.disks.lock().unwrap().get(&v.id),
                    sources.get(&from),
                    "the moved volume holds its source's data"
                );
                moved.insert(from, v.id);
            }
        }
    }
    assert_eq!(created, 1, "the third agent found nothing to move");
    assert_eq!(
        moved.len(),
        2,
        "both free volumes elsewhere were moved once each"
    );
    for (source, copy) in &moved {
        let s = c
            .cloud
            .volumes()
            .into_iter()
            .find(|v| &v.id == source)
            .expect("never deleted");
        assert_eq!(s.tags.get("cps:retired-by"), Some(copy));
    }
    // Retired sources are never claimed again: an agent in their zone makes a new volume.
    let m = c.launch("i-there", OTHER_AZ);
    let out = c.boot(&m, &cfg).await.unwrap();
    assert!(!moved.contains_key(&out.attach.volume_id));
    assert!(matches!(
        out.attach.filesystem,
        cps_orchestrate::FsOutcome::Created(_)
    ));
}

/// Agents in both zones race for three slots whose volumes sit in the other zone, and each may
/// be killed at any moment and run again. Whatever happens: per slot never two claimable
/// volumes and never two of its volumes attached at once, its data never lost, at most one
/// snapshot and one copy, no source deleted; once the crashes stop every run converges.
#[tokio::test(start_paused = true)]
async fn racing_slot_agents_in_two_zones_crashing_anywhere_never_make_two_live_copies() {
    let mut moved = 0;
    for seed in 0..16u64 {
        let c = Arc::new(Cluster::new(Timing {
            latency: Duration::from_millis(50),
            create_delay: Duration::from_secs(1),
            attach_delay: Duration::from_millis(500),
        }));
        c.cloud
            .with(|w| w.set_snapshot_delay(Duration::from_secs(20)));
        let slots = slots_with_data(&c, OTHER_AZ).await;
        let cfg = Arc::new(config(&format!(
            "{SLOTS}{RELOCATION}  lease: 20s\n  grace: 1s\n"
        )));
        let mut rng = cps_orchestrate::backoff::mix(seed + 101);
        let mut next = move |n: u64| {
            rng = cps_orchestrate::backoff::mix(rng);
            rng % n
        };
        // Two agents here and, in half the seeds, one in the slots' own zone.
        let mut zones = vec![AZ, AZ];
        if seed % 2 == 0 {
            zones.push(OTHER_AZ);
        }
        let agents = zones.len();
        let runs = racing_agents(&c, &cfg, &zones, seed, &mut next);
        let sources: BTreeMap<String, u32> =
            slots.iter().map(|(k, (v, _))| (v.clone(), *k)).collect();
        // Per slot: never two claimable volumes, never two attached.
        let (ok, claimable, attached) = race_watched(&c, runs, move |volumes| {
            let mut worst = (0, 0);
            for k in 1..=3u32 {
                let of_slot = |v: &&cps_provider::Volume| {
                    v.tags.get("cps:slot") == Some(&k.to_string())
                        || v.tags
                            .get("cps:relocated-from")
                            .and_then(|s| sources.get(s))
                            == Some(&k)
                        || sources.get(&v.id) == Some(&k)
                };
                let claimable = volumes
                    .iter()
                    .filter(of_slot)
                    .filter(|v| {
                        v.tags.contains_key("cps:slot") && !v.tags.contains_key("cps:retired-by")
                    })
                    .count();
                let attached = volumes
                    .iter()
                    .filter(of_slot)
                    .filter(|v| !v.attachments.is_empty())
                    .count();
                worst = (worst.0.max(claimable), worst.1.max(attached));
            }
            worst
        })
        .await;
        let what = format!("seed {seed}");
        assert!(
            claimable <= 1,
            "{what}: a slot had {claimable} claimable volumes"
        );
        assert!(
            attached <= 1,
            "{what}: a slot had {attached} volumes attached"
        );
        let now = assert_slots_moved(&c, &slots, &what);
        moved += now.iter().filter(|(k, v)| **v != slots[k].0).count();
        assert_eq!(ok, agents, "{what}: every agent got a slot (three slots)");
    }
    // Not a vacuous pass: the two agents here moved a slot each in (nearly) every seed.
    assert!(moved >= 28, "slots moved in all: {moved}");
}

/// While an agent here moves slot 1's volume, an agent booting in the volume's own zone finds
/// the slot's lock held and does not attach it (had it, the move would find its source in use
/// and fail, or — between the mover's last look and its retiring tag — make two live copies).
#[tokio::test(start_paused = true)]
async fn an_agent_in_the_source_zone_leaves_a_slot_being_moved_alone() {
    let c = Arc::new(Cluster::new(Timing::default()));
    c.cloud
        .with(|w| w.set_snapshot_delay(Duration::from_secs(60)));
    let one = "identity:\n  mode: slot\n  max-slots: 1\n";
    let old = c.launch("i-old", OTHER_AZ);
    let out = c.boot(&old, &config(one)).await.unwrap();
    let source = out.attach.volume_id;
    old.block.write_user_data(&source);
    old.block.unmount_all();
    c.cloud.with(|w| w.terminate_instance(&old.id));

    let cfg = Arc::new(config(&format!("{one}{RELOCATION}  grace: 5s\n")));
    let mover = {
        let (c, cfg) = (c.clone(), cfg.clone());
        let m = c.launch("i-mover", AZ);
        tokio::spawn(async move { c.boot(&m, &cfg).await })
    };
    let late = {
        let (c, cfg) = (c.clone(), cfg.clone());
        let m = c.launch("i-late", OTHER_AZ);
        tokio::spawn(async move {
            // Mid-snapshot.
            tokio::time::sleep(Duration::from_secs(10)).await;
            c.boot(&m, &cfg).await
        })
    };
    let moved = mover.await.unwrap().expect("the move succeeds");
    assert_ne!(moved.attach.volume_id, source);
    let err = late.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::NoFreeSlot { .. }),
        "the late agent waited for the lock, then found the slot taken: {err}"
    );
    assert_eq!(
        c.cloud.calls().count("AttachVolume"),
        2,
        "the first instance's and the mover's: the late agent never tried the source"
    );
}

/// A pool volume's move stopped at each of its requests (before and after its effect) is
/// finished by the next run here: it finds the copy waiting for its handover (or the source
/// still free elsewhere) and goes on under the source's lock — never a new, empty volume, never
/// two claimable copies, the data kept.
#[tokio::test(start_paused = true)]
async fn a_pool_move_stopped_at_every_step_is_finished_by_the_next_run() {
    use cps_provider::memory::{
        CREATE_VOLUME, DELETE_TAGS, DESCRIBE_SNAPSHOTS, Fault, UPDATE_ITEM,
    };
    let steps: [(&str, &'static str, u32); 7] = [
        ("the snapshot", CREATE_SNAPSHOT, 0),
        ("a look at the snapshot", DESCRIBE_SNAPSHOTS, 2),
        ("the copy", CREATE_VOLUME, 0),
        ("retiring the source", "CreateTags", 0),
        ("the handover", DELETE_TAGS, 0),
        ("writing the record", UPDATE_ITEM, 1),
        ("clearing the record", UPDATE_ITEM, 2),
    ];
    for (name, op, passing) in steps {
        for after in [false, true] {
            let what = format!("{name} ({})", if after { "after" } else { "before" });
            let c = Cluster::new(Timing::default());
            c.cloud
                .with(|w| w.set_snapshot_delay(Duration::from_secs(10)));
            let old = c.launch("i-old", OTHER_AZ);
            let source = c.boot(&old, &config("")).await.unwrap().attach.volume_id;
            old.block.write_user_data(&source);
            old.block.unmount_all();
            c.cloud.with(|w| w.terminate_instance(&old.id));
            let data = c.disks.lock().unwrap()[&source].clone();

            let cfg = config(RELOCATION);
            let fault = Fault::crash(op).after(passing);
            c.cloud
                .inject(if after { fault.after_effect() } else { fault });
            let m = c.launch("i-stopped", AZ);
            assert!(c.boot(&m, &cfg).await.is_err(), "{what}: the run stopped");
            m.block.unmount_all();
            c.cloud.with(|w| w.terminate_instance(&m.id));
            // The stopped run's lease runs out before the next run looks.
            tokio::time::sleep(Duration::from_secs(61)).await;

            let next = c.launch("i-next", AZ);
            let out = c
                .boot(&next, &cfg)
                .await
                .unwrap_or_else(|e| panic!("{what}: the next run failed: {e}"));
            assert_eq!(next.block.st().mkfs_runs, 0, "{what}: never formatted");
            let volumes = c.cloud.volumes();
            let claimable: Vec<_> = volumes
                .iter()
                .filter(|v| {
                    v.tags.get("cluster").map(String::as_str) == Some("kafka")
                        && !v.tags.contains_key("cps:retired-by")
                        && !v.tags.contains_key("cps:handover")
                })
                .collect();
            assert_eq!(claimable.len(), 1, "{what}: {volumes:?}");
            assert_eq!(claimable[0].id, out.attach.volume_id, "{what}");
            assert_ne!(out.attach.volume_id, source, "{what}: moved");
            assert_eq!(
                c.disks.lock().unwrap().get(&out.attach.volume_id),
                Some(&data),
                "{what}: the data"
            );
            assert_eq!(
                volumes.len(),
                2,
                "{what}: the source and one copy: {volumes:?}"
            );
        }
    }
}

/// A node's move left unfinished by an agent here is finished by an agent in a third zone
/// towards the zone it was going to (no second copy from that move), and only then moved on to
/// the third zone, where the node's agent now is: the data follows, one claimable volume.
#[tokio::test(start_paused = true)]
async fn a_move_resumed_from_a_third_zone_makes_no_second_copy() {
    use cps_provider::memory::{DELETE_TAGS, Fault};
    const THIRD_AZ: &str = "us-east-1c";
    let c = Cluster::new(Timing::default());
    let cfg = config(&format!("{NODE}  node-id: '7'\n{RELOCATION}"));
    let source = node_with_data(&c, "7", OTHER_AZ, &cfg).await;
    let data = c.disks.lock().unwrap().get(&source).cloned().unwrap();
    // The mover here dies after retiring the source, before handing the identity over.
    c.cloud.inject(Fault::crash(DELETE_TAGS));
    let m = c.launch("i-stopped", AZ);
    assert!(c.boot(&m, &cfg).await.is_err());
    c.cloud.with(|w| w.terminate_instance(&m.id));
    tokio::time::sleep(Duration::from_secs(61)).await;

    let far = c.launch("i-third", THIRD_AZ);
    let out = c.boot(&far, &cfg).await.unwrap();
    let volumes = c.cloud.volumes();
    let first_copies: Vec<_> = volumes
        .iter()
        .filter(|v| v.tags.get("cps:relocated-from") == Some(&source))
        .collect();
    assert_eq!(
        first_copies.len(),
        1,
        "one copy from the first move: {volumes:?}"
    );
    assert_eq!(
        first_copies[0].availability_zone, AZ,
        "made where it was going"
    );
    let now: Vec<_> = volumes
        .iter()
        .filter(|v| {
            v.tags.get("cps:node-id").map(String::as_str) == Some("7")
                && !v.tags.contains_key("cps:retired-by")
        })
        .collect();
    assert_eq!(now.len(), 1, "{volumes:?}");
    assert_eq!(now[0].id, out.attach.volume_id);
    assert_eq!(now[0].availability_zone, THIRD_AZ);
    assert_eq!(
        now[0].tags.get("cps:relocated-from"),
        Some(&first_copies[0].id)
    );
    assert_eq!(c.disks.lock().unwrap().get(&now[0].id), Some(&data));
}

/// A slot free in another zone is left to that zone for `relocation.grace`: its replacement,
/// booting there meanwhile, takes it, and the agent here moves nothing (no slot crosses zones
/// and back); after the grace, with the slot still free, the agent here moves it.
#[tokio::test(start_paused = true)]
async fn a_slot_elsewhere_is_left_to_its_own_zone_for_the_grace() {
    let c = Arc::new(Cluster::new(Timing::default()));
    let one = "identity:\n  mode: slot\n  max-slots: 1\n";
    let old = c.launch("i-old", OTHER_AZ);
    let source = c.boot(&old, &config(one)).await.unwrap().attach.volume_id;
    old.block.unmount_all();
    c.cloud.with(|w| w.terminate_instance(&old.id));

    let cfg = Arc::new(config(&format!("{one}{RELOCATION}  grace: 2m\n")));
    let here = {
        let (c, cfg) = (c.clone(), cfg.clone());
        let m = c.launch("i-here", AZ);
        tokio::spawn(async move { c.boot(&m, &cfg).await })
    };
    tokio::time::sleep(Duration::from_secs(90)).await;
    let replacement = c.launch("i-replacement", OTHER_AZ);
    let out = c.boot(&replacement, &cfg).await.unwrap();
    assert_eq!(out.attach.volume_id, source, "the replacement has its slot");
    let err = here.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::NoFreeSlot { .. }), "{err}");
    assert_eq!(c.cloud.calls().count(CREATE_SNAPSHOT), 0, "nothing moved");

    // Its replacement gone too and none coming: after the grace the agent here moves it.
    replacement.block.unmount_all();
    c.cloud.with(|w| w.terminate_instance(&replacement.id));
    let m = c.launch("i-later", AZ);
    let started = Instant::now();
    let out = c.boot(&m, &cfg).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(120),
        "waited the grace"
    );
    assert_ne!(out.attach.volume_id, source, "moved here");
    assert_eq!(c.cloud.calls().count(CREATE_SNAPSHOT), 1);
}
