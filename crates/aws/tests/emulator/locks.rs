//! The relocation lock on DynamoDB (moto, with conditional writes made atomic): races, leases,
//! takeover with the next token, stale holders refused, the record kept, throttling retried,
//! and the node policy evaluated on the table's ARN.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use cps_aws::{AwsSettings, LockTable};
use cps_provider::lock::from_unix_millis;
use cps_provider::{Acquired, Error, Lease, LockService};
use cps_testbed::{Delays, Emulator, NODE_KEY, REGION};

use super::{emulator, ready};

const LEASE: Duration = Duration::from_secs(30);

fn at(secs: u64) -> SystemTime {
    from_unix_millis(1_800_000_000_000 + secs * 1000)
}

async fn table(emu: &Emulator, name: &str) -> LockTable {
    emu.create_lock_table(name).unwrap();
    // SAFETY: as in `provider`: the same static values for every test.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    let mut settings = AwsSettings::new(REGION);
    settings.endpoint_url = Some(emu.endpoint().to_owned());
    LockTable::new(&settings.load().await, name)
}

fn held(acquired: Acquired) -> (Lease, BTreeMap<String, String>) {
    match acquired {
        Acquired::Held(lease, record) => (lease, record),
        Acquired::Busy(item) => panic!("busy: {item:?}"),
    }
}

/// What an operator reads: AWS's code and sentence, no SDK wording, no raw document.
fn readable(err: &Error) {
    let text = err.to_string();
    for dump in [
        "service error",
        "unhandled error",
        "<?xml",
        "Response {",
        "__type",
    ] {
        assert!(!text.contains(dump), "{text}");
    }
}

#[tokio::test]
async fn owners_racing_for_a_lock_get_exactly_one_holder_per_key() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let locks = table(&emu, "cps-locks").await;
    let mut races = tokio::task::JoinSet::new();
    for key in 0..12 {
        for owner in 0..6 {
            let locks = locks.clone();
            races.spawn(async move {
                let (key, owner) = (format!("node-{key}"), format!("agent-{owner}"));
                let got = locks.acquire(&key, &owner, LEASE, at(0)).await.unwrap();
                (key, owner, got)
            });
        }
    }
    let mut holders: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    let mut busy = Vec::new();
    while let Some(done) = races.join_next().await {
        match done.unwrap() {
            (key, owner, Acquired::Held(lease, record)) => {
                assert!(record.is_empty());
                assert_eq!(lease.expires, at(30));
                holders.entry(key).or_default().push((owner, lease.token));
            }
            (key, owner, Acquired::Busy(item)) => busy.push((key, owner, item)),
        }
    }
    for (key, won) in &holders {
        assert_eq!(won.len(), 1, "{key}: more than one holder: {won:?}");
        assert_eq!(won[0].1, 1, "{key}: the first take has token 1");
    }
    assert_eq!(holders.len(), 12);
    assert_eq!(busy.len(), 12 * 5);
    for (key, owner, item) in busy {
        let holder = &holders[&key][0].0;
        assert_eq!(item.owner.as_deref(), Some(holder.as_str()), "{key}");
        assert_ne!(&owner, holder);
        assert_eq!((item.token, item.expires), (1, at(30)));
    }
    assert_eq!(locks.calls().count("UpdateItem"), 72);
    assert_eq!(
        locks.calls().count("GetItem"),
        60,
        "one read per refused take"
    );
}

#[tokio::test]
async fn a_lease_is_renewed_taken_over_after_expiry_and_its_stale_holder_refused() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let locks = table(&emu, "cps-locks").await;
    assert_eq!(locks.read("node-1").await.unwrap(), None);
    let (old, _) = held(locks.acquire("node-1", "a", LEASE, at(0)).await.unwrap());
    let old = locks.renew(&old, LEASE, at(20)).await.unwrap();
    let item = locks.read("node-1").await.unwrap().unwrap();
    assert_eq!(
        (item.owner.as_deref(), item.token, item.expires),
        (Some("a"), 1, at(50))
    );
    // The lease runs through its last millisecond by the taker's clock.
    let busy = locks.acquire("node-1", "b", LEASE, at(50)).await.unwrap();
    assert!(
        matches!(&busy, Acquired::Busy(i) if i.owner.as_deref() == Some("a")),
        "{busy:?}"
    );
    let (new, _) = held(
        locks
            .acquire("node-1", "b", LEASE, at(50) + Duration::from_millis(1))
            .await
            .unwrap(),
    );
    assert_eq!((new.owner.as_str(), new.token), ("b", 2));

    let record = BTreeMap::from([("step".to_owned(), "stale".to_owned())]);
    let refusals = [
        locks
            .renew(&old, LEASE, at(60))
            .await
            .map(drop)
            .unwrap_err(),
        locks.write_record(&old, &record).await.unwrap_err(),
        locks.release(&old).await.unwrap_err(),
    ];
    for err in &refusals {
        assert!(
            matches!(err, Error::LockLost { key, .. } if key == "node-1"),
            "{err}"
        );
        assert!(!err.is_retryable());
        readable(err);
        let text = err.to_string();
        assert!(
            text.contains("ConditionalCheckFailedException") && text.contains("token 1"),
            "{text}"
        );
    }
    let item = locks.read("node-1").await.unwrap().unwrap();
    assert_eq!((item.owner.as_deref(), item.token), (Some("b"), 2));
    assert!(item.record.is_empty(), "the stale write left nothing");
    // The holder's own take raises the token too: its older lease is stale from then on.
    let (again, _) = held(locks.acquire("node-1", "b", LEASE, at(61)).await.unwrap());
    assert_eq!(again.token, 3);
    assert!(matches!(
        locks.write_record(&new, &record).await,
        Err(Error::LockLost { .. })
    ));
}

#[tokio::test]
async fn the_record_survives_release_and_goes_to_the_next_holder() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let locks = table(&emu, "cps-locks").await;
    let (a, first) = held(locks.acquire("node-2", "a", LEASE, at(0)).await.unwrap());
    assert!(first.is_empty());
    let record = BTreeMap::from([
        ("snapshot".to_owned(), "snap-0123".to_owned()),
        ("step".to_owned(), "copied".to_owned()),
    ]);
    locks.write_record(&a, &BTreeMap::new()).await.unwrap();
    locks.write_record(&a, &record).await.unwrap();
    locks.release(&a).await.unwrap();
    let item = locks.read("node-2").await.unwrap().unwrap();
    assert_eq!((item.owner, item.token, &item.record), (None, 1, &record));
    assert_eq!(
        item.expires,
        SystemTime::UNIX_EPOCH,
        "no expiry once released"
    );
    // Released: free at once, whatever the taker's clock says.
    let (b, left) = held(locks.acquire("node-2", "b", LEASE, at(1)).await.unwrap());
    assert_eq!((b.token, left), (2, record));
    assert!(matches!(
        locks.release(&a).await,
        Err(Error::LockLost { .. })
    ));
}

#[tokio::test]
async fn throttling_is_retried_and_a_missing_table_is_named() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let locks = table(&emu, "cps-locks").await;
    // Two throttled attempts, then the SDK's third passes: one request for the caller.
    emu.fail_dynamodb("UpdateItem", "ProvisionedThroughputExceededException", 2)
        .unwrap();
    let (lease, _) = held(locks.acquire("node-3", "a", LEASE, at(0)).await.unwrap());
    assert_eq!(lease.token, 1, "throttled attempts took no effect");
    assert_eq!(locks.calls().count("UpdateItem"), 1);
    for (action, code) in [
        ("UpdateItem", "ThrottlingException"),
        ("GetItem", "RequestLimitExceeded"),
    ] {
        emu.fail_dynamodb(action, code, 3).unwrap();
        let err = match action {
            "UpdateItem" => locks.renew(&lease, LEASE, at(1)).await.map(drop),
            _ => locks.read("node-3").await.map(drop),
        }
        .unwrap_err();
        assert!(
            matches!(err, Error::Throttled { .. }) && err.is_retryable(),
            "{err}"
        );
        assert!(err.to_string().contains(code), "{err}");
        readable(&err);
    }
    let item = locks.read("node-3").await.unwrap().unwrap();
    assert_eq!(
        (item.token, item.expires),
        (1, at(30)),
        "the throttled renew changed nothing"
    );

    let missing = LockTable::new(
        &AwsSettings {
            endpoint_url: Some(emu.endpoint().to_owned()),
            ..AwsSettings::new(REGION)
        }
        .load()
        .await,
        "no-such-table",
    );
    let err = missing
        .acquire("node-3", "a", LEASE, at(0))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { resource, .. } if resource == "lock table no-such-table"),
        "{err}"
    );
    assert!(
        err.to_string().contains("ResourceNotFoundException"),
        "{err}"
    );
    readable(&err);
}

/// A lock table as the node's key sees it: the emulator holds that key to the node policy.
async fn node_table(emu: &Emulator, name: &str) -> LockTable {
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    let config = aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(emu.endpoint())
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
            Credentials::new(NODE_KEY, "testing", None, None, "node"),
        ))
        .build();
    LockTable::new(&config, name)
}

#[tokio::test]
async fn the_node_policy_is_evaluated_on_the_tables_arn() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    emu.create_lock_table("cps-locks").unwrap();
    emu.create_lock_table("other").unwrap();
    let arn = format!("arn:aws:dynamodb:{REGION}:123456789012:table/cps-locks");
    let policy = serde_json::json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["dynamodb:UpdateItem", "dynamodb:GetItem"], "Resource": arn,
    }]});
    let body = serde_json::json!({"access_key": NODE_KEY, "policy": policy});
    emu.control("POST", "/cps/node-policy", &body.to_string())
        .unwrap();
    let ours = node_table(&emu, "cps-locks").await;
    held(ours.acquire("node-1", "a", LEASE, at(0)).await.unwrap());
    assert!(
        matches!(
            ours.acquire("node-1", "b", LEASE, at(0)).await.unwrap(),
            Acquired::Busy(_)
        ),
        "a refused take reads the holder"
    );
    let err = node_table(&emu, "other")
        .await
        .acquire("node-1", "a", LEASE, at(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unauthorized {
                operation: "UpdateItem",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("table/other"), "{err}");
    readable(&err);
    let denied = emu.control("GET", "/cps/node-policy", "").unwrap();
    assert!(denied.contains(r#"["dynamodb:UpdateItem"]"#), "{denied}");
}

/// The first EC2 request and the first DynamoDB request at once, on a fresh emulator, are both
/// answered. (They once deadlocked: the DynamoDB request, holding the emulator's lock, waited
/// for moto's backend lock while the EC2 backend, being built under that lock, made its AMIs'
/// snapshots through the emulator's lock — seen as a bench stalled at CreateTable.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_requests_of_two_services_at_once_are_both_answered() {
    if !ready() {
        return;
    }
    // At several points inside the EC2 backend's construction (it loads moto's AMIs, making a
    // snapshot for each, for a second or more).
    for delay in [100, 300, 500, 800, 1200] {
        let (emu, _dir) = emulator(Delays::default());
        let ec2 = emu.ec2();
        let first = tokio::spawn(async move { ec2.describe_volumes().send().await.is_ok() });
        tokio::time::sleep(Duration::from_millis(delay)).await;
        // Bounded: the emulator's reply is waited for 60 s at most.
        let created = tokio::task::block_in_place(|| emu.create_lock_table("t-race"));
        assert!(created.is_ok(), "{created:?}");
        assert!(
            tokio::time::timeout(Duration::from_secs(90), first)
                .await
                .expect("DescribeVolumes answered")
                .unwrap()
        );
    }
}
