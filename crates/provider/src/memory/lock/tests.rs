use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::*;
use crate::lock::from_unix_millis;
use crate::memory::Fault;

const LEASE: Duration = Duration::from_secs(30);

fn at(secs: u64) -> SystemTime {
    from_unix_millis(1_800_000_000_000 + secs * 1000)
}

fn held(acquired: Acquired) -> (Lease, BTreeMap<String, String>) {
    match acquired {
        Acquired::Held(lease, record) => (lease, record),
        Acquired::Busy(item) => panic!("busy: {item:?}"),
    }
}

fn record(step: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("step".to_owned(), step.to_owned())])
}

#[tokio::test(start_paused = true)]
async fn one_of_two_racing_owners_holds_and_the_other_sees_it() {
    let cloud = MemoryCloud::default();
    let (a, b) = tokio::join!(
        cloud.acquire("node-1", "a", LEASE, at(0)),
        cloud.acquire("node-1", "b", LEASE, at(0)),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (lease, busy) = match (a, b) {
        (Acquired::Held(l, _), Acquired::Busy(i)) | (Acquired::Busy(i), Acquired::Held(l, _)) => {
            (l, i)
        }
        other => panic!("exactly one must hold: {other:?}"),
    };
    assert_eq!(lease.token, 1);
    assert_eq!(lease.expires, at(30));
    assert_eq!(busy.owner.as_deref(), Some(lease.owner.as_str()));
    assert_eq!(busy.holder_at(at(0)), Some(lease.owner.as_str()));
    assert_eq!(cloud.calls().count(UPDATE_ITEM), 2);
    assert_eq!(
        cloud.calls().count(GET_ITEM),
        1,
        "only the refused take reads"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_taken_over_and_the_stale_holder_is_refused() {
    let cloud = MemoryCloud::default();
    let (old, _) = held(cloud.acquire("k", "a", LEASE, at(0)).await.unwrap());
    let old = cloud.renew(&old, LEASE, at(20)).await.unwrap();
    assert_eq!((old.token, old.expires), (1, at(50)));
    // Still running at its last millisecond, expired one after.
    let busy = cloud.acquire("k", "b", LEASE, at(50)).await.unwrap();
    assert!(matches!(busy, Acquired::Busy(_)), "{busy:?}");
    let (new, _) = held(cloud.acquire("k", "b", LEASE, at(51)).await.unwrap());
    assert_eq!((new.owner.as_str(), new.token), ("b", 2));
    let lost = [
        cloud.renew(&old, LEASE, at(52)).await.unwrap_err(),
        cloud
            .write_record(&old, &record("stale"))
            .await
            .unwrap_err(),
        cloud.release(&old).await.unwrap_err(),
    ];
    for err in lost {
        assert!(
            matches!(&err, Error::LockLost { key, .. } if key == "k") && !err.is_retryable(),
            "{err}"
        );
        assert!(err.to_string().contains("holder b, token 2"), "{err}");
    }
    let item = cloud.read("k").await.unwrap().unwrap();
    assert!(item.record.is_empty(), "the stale write left nothing");
    assert_eq!(item.owner.as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn the_record_survives_release_and_goes_to_the_next_holder() {
    let cloud = MemoryCloud::default();
    assert_eq!(cloud.read("k").await.unwrap(), None);
    let (a, first) = held(cloud.acquire("k", "a", LEASE, at(0)).await.unwrap());
    assert!(first.is_empty());
    cloud.write_record(&a, &record("snapshot")).await.unwrap();
    cloud.release(&a).await.unwrap();
    let item = cloud.read("k").await.unwrap().unwrap();
    assert_eq!((item.owner, item.token), (None, 1));
    assert_eq!(item.record, record("snapshot"));
    // Released: takeable at once, even by a clock far behind the old lease's end.
    let (b, left) = held(cloud.acquire("k", "b", LEASE, at(1)).await.unwrap());
    assert_eq!((b.token, left), (2, record("snapshot")));
    assert!(matches!(
        cloud.release(&a).await,
        Err(Error::LockLost { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn every_take_raises_the_token_even_the_holders_own() {
    let cloud = MemoryCloud::default();
    let (first, _) = held(cloud.acquire("k", "a", LEASE, at(0)).await.unwrap());
    let (again, _) = held(cloud.acquire("k", "a", LEASE, at(1)).await.unwrap());
    assert_eq!((first.token, again.token), (1, 2));
    assert!(matches!(
        cloud.write_record(&first, &record("x")).await,
        Err(Error::LockLost { .. })
    ));
    cloud.write_record(&again, &record("x")).await.unwrap();
    let (other, _) = held(cloud.acquire("other", "a", LEASE, at(1)).await.unwrap());
    assert_eq!(other.token, 1, "tokens count per key");
}

#[tokio::test(start_paused = true)]
async fn throttling_is_retryable_and_a_lost_reply_is_resumed_by_taking_again() {
    let cloud = MemoryCloud::default();
    cloud.inject(Fault::throttle(UPDATE_ITEM, 1));
    let err = cloud.acquire("k", "a", LEASE, at(0)).await.unwrap_err();
    assert!(matches!(err, Error::Throttled { .. }) && err.is_retryable());
    assert_eq!(cloud.with(|w| w.lock_item("k")), None, "no effect");
    cloud.inject(
        Fault::fail(
            UPDATE_ITEM,
            Error::Transient {
                operation: UPDATE_ITEM,
                message: "reply lost".into(),
            },
        )
        .after_effect(),
    );
    assert!(cloud.acquire("k", "a", LEASE, at(0)).await.is_err());
    let taken = cloud.with(|w| w.lock_item("k")).unwrap();
    assert_eq!((taken.owner.as_deref(), taken.token), (Some("a"), 1));
    // The owner does not know it holds the lock; taking it again is how it finds out.
    let (lease, _) = held(cloud.acquire("k", "a", LEASE, at(1)).await.unwrap());
    assert_eq!(lease.token, 2);
    assert!(matches!(
        cloud.acquire("k", "b", LEASE, at(2)).await.unwrap(),
        Acquired::Busy(item) if item.token == 2
    ));
    cloud.inject(Fault::throttle(GET_ITEM, 1));
    assert!(cloud.read("k").await.unwrap_err().is_retryable());
}
