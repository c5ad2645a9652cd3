//! Lock tables on the emulator (DynamoDB), for the relocation lock's tests: created as the
//! Terraform module creates its table (partition key `key`, on-demand, encrypted), and
//! throttling injected on demand.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::{Bench, Emulator, REGION};

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
        dynamodb_call(self.endpoint(), "DynamoDB_20120810.CreateTable", &body)
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

/// One DynamoDB request, signed (in form) with the bench's own unrestricted key.
fn dynamodb_call(endpoint: &str, target: &str, body: &serde_json::Value) -> io::Result<()> {
    let body = body.to_string();
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-amz-json-1.0\r\n\
         X-Amz-Target: {target}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/dynamodb/aws4_request, SignedHeaders=host, Signature=0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{target} on the emulator failed: {}",
            reply.lines().last().unwrap_or("")
        )))
    }
}
