//! Lock tables on the emulator (DynamoDB), for the relocation lock's tests: created as the
//! Terraform module creates its table (partition key `key`, on-demand, encrypted), and
//! throttling injected on demand.

use std::io;

use crate::emulator::json_call;
use crate::{Bench, Emulator};

impl Emulator {
    /// Creates an on-demand, encrypted DynamoDB table with the partition key `key` (S).
    pub fn create_lock_table(&self, name: &str) -> io::Result<()> {
        let body = serde_json::json!({
            "TableName": name,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [{"AttributeName": "key", "AttributeType": "S"}],
            "KeySchema": [{"AttributeName": "key", "KeyType": "HASH"}],
            "SSESpecification": {"Enabled": true},
        });
        json_call(
            self.endpoint(),
            "dynamodb",
            "1.0",
            "DynamoDB_20120810.CreateTable",
            &body,
        )
    }

    /// The next `times` DynamoDB requests of `action` (`UpdateItem`, `GetItem`) fail with
    /// `code` (a throttling error) before they take effect.
    pub fn fail_dynamodb(&self, action: &str, code: &str, times: u32) -> io::Result<()> {
        let body = serde_json::json!({
            "service": "dynamodb", "action": action, "code": code, "times": times,
        });
        self.control("POST", "/cps/faults", &body.to_string())
            .map(drop)
    }
}

impl Bench {
    /// See [`Emulator::create_lock_table`].
    pub fn create_lock_table(&self, name: &str) -> io::Result<()> {
        self.emulator().create_lock_table(name)
    }
}
