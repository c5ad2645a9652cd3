//! [`SecretService`] on SSM Parameter Store (`GetParameter`, decrypted) and Secrets Manager
//! (`GetSecretValue`): node file contents read at boot with the instance's role.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use cps_provider::{CallLog, Error, SecretRef, SecretService, SecretValue};

use crate::classify::{Context, classify};

const GET_PARAMETER: &str = "GetParameter";
const GET_SECRET_VALUE: &str = "GetSecretValue";

/// Error codes that mean "there is no such parameter or secret (version)".
const NOT_FOUND: &[&str] = &[
    "ParameterNotFound",
    "ParameterVersionNotFound",
    "ResourceNotFoundException",
];

/// Both secret stores through their clients. Counts every request it sends.
#[derive(Clone, Debug)]
pub struct SecretsApi {
    ssm: aws_sdk_ssm::Client,
    secrets_manager: aws_sdk_secretsmanager::Client,
    calls: Arc<CallLog>,
}

impl SecretsApi {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self {
            ssm: aws_sdk_ssm::Client::new(config),
            secrets_manager: aws_sdk_secretsmanager::Client::new(config),
            calls: Arc::new(CallLog::default()),
        }
    }

    pub fn calls(&self) -> &CallLog {
        &self.calls
    }
}

/// A missing parameter or secret is `NotFound` naming it; anything else is classified as usual.
fn failed<E>(
    operation: &'static str,
    name: &str,
    err: aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if err.code().is_some_and(|c| NOT_FOUND.contains(&c)) {
        return Error::NotFound {
            operation,
            resource: name.to_owned(),
            message: DisplayErrorContext(&err).to_string(),
        };
    }
    classify(operation, Context::default(), err)
}

fn empty(operation: &'static str, name: &str) -> Error {
    Error::Api {
        operation,
        code: None,
        message: format!("{name}: the reply carried no value"),
    }
}

#[async_trait]
impl SecretService for SecretsApi {
    async fn secret(&self, secret: &SecretRef) -> Result<SecretValue, Error> {
        match secret {
            SecretRef::Parameter(name) => {
                self.calls.record(GET_PARAMETER);
                let out = self
                    .ssm
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(|e| failed(GET_PARAMETER, name, e))?;
                out.parameter
                    .and_then(|p| p.value)
                    .map(SecretValue::new)
                    .ok_or_else(|| empty(GET_PARAMETER, name))
            }
            SecretRef::Secret(id) => {
                self.calls.record(GET_SECRET_VALUE);
                let out = self
                    .secrets_manager
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|e| failed(GET_SECRET_VALUE, id, e))?;
                // A secret holds text or binary data, never both.
                out.secret_string
                    .map(SecretValue::new)
                    .or_else(|| out.secret_binary.map(|b| SecretValue::new(b.into_inner())))
                    .ok_or_else(|| empty(GET_SECRET_VALUE, id))
            }
        }
    }
}
