//! Parameters and secrets on the emulator, for node files that take their content from them.
//! Sent as the bench's own (unrestricted) requests over moto's JSON protocols; moto reads the
//! service from the credential scope and does not check the signature.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::{Bench, REGION};

impl Bench {
    /// Stores an SSM SecureString parameter.
    pub fn put_parameter(&self, name: &str, value: &str) -> io::Result<()> {
        let body = serde_json::json!({"Name": name, "Value": value, "Type": "SecureString"});
        self.json_call("ssm", "AmazonSSM.PutParameter", &body)
    }

    /// Creates a Secrets Manager secret holding `value` as text.
    pub fn create_secret(&self, name: &str, value: &str) -> io::Result<()> {
        let body = serde_json::json!({"Name": name, "SecretString": value});
        self.json_call("secretsmanager", "secretsmanager.CreateSecret", &body)
    }

    fn json_call(&self, service: &str, target: &str, body: &serde_json::Value) -> io::Result<()> {
        let body = body.to_string();
        let addr = self
            .endpoint()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let mut stream = std::net::TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-amz-json-1.1\r\n\
             X-Amz-Target: {target}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0\r\n\
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
}
