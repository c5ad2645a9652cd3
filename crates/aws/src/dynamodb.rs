//! [`LockService`] on a DynamoDB table: one item per key, every change one conditional
//! `UpdateItem`, reads `GetItem` with `ConsistentRead`.
//!
//! The table's partition key is `key` (S); the item carries `owner` (S, absent once
//! released), `token` (N, the fencing token), `expires` (N, Unix milliseconds by the holder's
//! clock, absent once released) and `record` (M of S, the protocol's record).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use cps_provider::lock::{from_unix_millis, lease_end, unix_millis};
use cps_provider::{Acquired, CallLog, Error, Lease, LockItem, LockService};

use crate::classify::{Context, classify, said};

const UPDATE_ITEM: &str = "UpdateItem";
const GET_ITEM: &str = "GetItem";

const TAKE_CONDITION: &str =
    "attribute_not_exists(#k) OR attribute_not_exists(#owner) OR #exp < :now OR #owner = :me";
const HELD_CONDITION: &str = "#owner = :me AND #token = :tok";

/// The lock table through the DynamoDB client. Counts every request it sends.
#[derive(Clone, Debug)]
pub struct LockTable {
    client: aws_sdk_dynamodb::Client,
    table: String,
    calls: Arc<CallLog>,
}

impl LockTable {
    /// The table `table` (a name or an ARN) with the SDK configuration's region, endpoint,
    /// credentials, timeouts and retries.
    pub fn new(config: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        Self {
            client: aws_sdk_dynamodb::Client::new(config),
            table: table.into(),
            calls: Arc::new(CallLog::default()),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn calls(&self) -> &CallLog {
        &self.calls
    }

    /// A conditional update of `key`'s item; `Ok(None)` when the condition failed.
    async fn update(
        &self,
        key: &str,
        condition: &str,
        update: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<Option<HashMap<String, AttributeValue>>, SdkError<UpdateError, HttpResponse>> {
        self.calls.record(UPDATE_ITEM);
        let names = [
            ("#k", "key"),
            ("#owner", "owner"),
            ("#exp", "expires"),
            ("#token", "token"),
            ("#rec", "record"),
        ];
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("key", AttributeValue::S(key.to_owned()))
            .condition_expression(condition)
            .update_expression(update)
            .return_values(ReturnValue::AllNew);
        // DynamoDB refuses names and values the expressions do not use.
        for (placeholder, name) in names {
            if condition.contains(placeholder) || update.contains(placeholder) {
                request = request.expression_attribute_names(placeholder, name);
            }
        }
        for (placeholder, value) in values {
            request = request.expression_attribute_values(placeholder, value);
        }
        match request.send().await {
            Ok(out) => Ok(Some(out.attributes.unwrap_or_default())),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A write that holds only while `lease` does (owner and token).
    async fn update_held(
        &self,
        lease: &Lease,
        update: &str,
        mut values: Vec<(&str, AttributeValue)>,
    ) -> Result<(), Error> {
        values.push((":me", AttributeValue::S(lease.owner.clone())));
        values.push((":tok", number(lease.token)));
        match self
            .update(&lease.key, HELD_CONDITION, update, values)
            .await
        {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(Error::LockLost {
                key: lease.key.clone(),
                message: format!(
                    "ConditionalCheckFailedException: {} in {} is no longer held by {} with \
                     token {} (it expired and was taken, or was released)",
                    lease.key, self.table, lease.owner, lease.token
                ),
            }),
            Err(e) => Err(self.failed(UPDATE_ITEM, &lease.key, e)),
        }
    }

    /// A missing table is `NotFound` naming it; the rest is classified as for every service.
    fn failed<E>(&self, operation: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match err.code() {
            Some("ResourceNotFoundException") => Error::NotFound {
                operation,
                resource: format!("lock table {}", self.table),
                message: said(&err),
            },
            // The item is part of a transaction under way: the same request may pass later.
            Some("TransactionConflictException") => Error::Transient {
                operation,
                message: format!("{key}: {}", said(&err)),
            },
            _ => classify(operation, Context::default(), err),
        }
    }
}

type UpdateError = aws_sdk_dynamodb::operation::update_item::UpdateItemError;

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// The item as stored → [`LockItem`]; a malformed item (not written by cps) is an error.
fn parse_item(
    table: &str,
    key: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<LockItem, Error> {
    let bad = |what: &str| Error::Api {
        operation: GET_ITEM,
        code: None,
        message: format!("lock item {key} in {table}: {what}"),
    };
    let num = |name: &str| -> Result<Option<u64>, Error> {
        match item.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_n()
                .ok()
                .and_then(|n| n.parse().ok())
                .map(Some)
                .ok_or_else(|| bad(&format!("{name} is not a whole number"))),
        }
    };
    let owner = match item.get("owner") {
        None => None,
        Some(v) => Some(v.as_s().map_err(|_| bad("owner is not a string"))?.clone()),
    };
    let mut record = BTreeMap::new();
    if let Some(v) = item.get("record") {
        let map = v.as_m().map_err(|_| bad("record is not a map"))?;
        for (k, v) in map {
            let s = v
                .as_s()
                .map_err(|_| bad("a record value is not a string"))?;
            record.insert(k.clone(), s.clone());
        }
    }
    Ok(LockItem {
        key: key.to_owned(),
        owner,
        token: num("token")?.unwrap_or(0),
        expires: num("expires")?.map_or(UNIX_EPOCH, from_unix_millis),
        record,
    })
}

#[async_trait]
impl LockService for LockTable {
    async fn acquire(
        &self,
        key: &str,
        owner: &str,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Acquired, Error> {
        let until = lease_end(now, lease_for);
        let values = vec![
            (":me", AttributeValue::S(owner.to_owned())),
            (":now", number(unix_millis(now))),
            (":until", number(unix_millis(until))),
            (":one", number(1)),
        ];
        let update = "SET #owner = :me, #exp = :until ADD #token :one";
        let taken = self
            .update(key, TAKE_CONDITION, update, values)
            .await
            .map_err(|e| self.failed(UPDATE_ITEM, key, e))?;
        let taken = taken
            .map(|attributes| parse_item(&self.table, key, &attributes))
            .transpose()?;
        let in_table = format!(" in {}", self.table);
        cps_provider::lock::after_take(key, owner, &in_table, taken, self.read(key)).await
    }

    async fn renew(
        &self,
        lease: &Lease,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Lease, Error> {
        let until = lease_end(now, lease_for);
        let values = vec![(":until", number(unix_millis(until)))];
        self.update_held(lease, "SET #exp = :until", values).await?;
        Ok(Lease {
            expires: until,
            ..lease.clone()
        })
    }

    async fn write_record(
        &self,
        lease: &Lease,
        record: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let map = record
            .iter()
            .map(|(k, v)| (k.clone(), AttributeValue::S(v.clone())))
            .collect();
        let values = vec![(":rec", AttributeValue::M(map))];
        self.update_held(lease, "SET #rec = :rec", values).await
    }

    async fn read(&self, key: &str) -> Result<Option<LockItem>, Error> {
        self.calls.record(GET_ITEM);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("key", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.failed(GET_ITEM, key, e))?;
        out.item
            .map(|item| parse_item(&self.table, key, &item))
            .transpose()
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.update_held(lease, "REMOVE #owner, #exp", Vec::new())
            .await
    }
}
