//! Parameters and secrets on the emulator, for node files that take their content from them.
//! Sent as the bench's own (unrestricted) requests over moto's JSON protocols; moto reads the
//! service from the credential scope and does not check the signature.

use std::io;

use crate::Bench;

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
        crate::emulator::json_call(self.endpoint(), service, "1.1", target, body)
    }
}
