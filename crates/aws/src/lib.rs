//! The cps cloud traits on AWS: volumes, instances and network interfaces through
//! `aws-sdk-ec2`, groups and lifecycle hooks through `aws-sdk-autoscaling`, node file secrets
//! through `aws-sdk-ssm` and `aws-sdk-secretsmanager`, the relocation lock on a DynamoDB table
//! through `aws-sdk-dynamodb`, instance identity through IMDSv2.
//!
//! Every SDK failure is classified into a [`cps_provider::Error`] the orchestration can act on;
//! its message is what AWS said (code, sentence, request id) or the chain of causes, never a
//! bare "service error" and never the SDK's Debug dump of the raw response. Endpoints are overridable so the same code runs against the local emulator.

mod autoscaling;
mod classify;
mod dynamodb;
mod ec2;
mod error;
mod imds;
mod pages;
mod secrets;

pub use autoscaling::AutoScalingApi;
pub use dynamodb::LockTable;
pub use ec2::Ec2Api;
pub use error::Error;
pub use imds::fetch_identity;
pub use secrets::SecretsApi;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// How to reach AWS.
#[derive(Clone, Debug)]
pub struct AwsSettings {
    pub region: String,
    /// Another endpoint for every service (an emulator); `None` for the regional defaults.
    pub endpoint_url: Option<String>,
    /// Attempts per request, including the first, made by the SDK itself.
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// Bound on one attempt; the SDK only sets a connect timeout by default.
    pub attempt_timeout: Duration,
}

/// The HTTPS client of every AWS request and of IMDS: hyper with rustls on ring and the
/// system's trust store (as the SDK's default client, which would bring aws-lc instead).
pub(crate) fn https_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

impl AwsSettings {
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(20),
        }
    }

    /// The SDK configuration: default credential chain (environment, profile, web identity,
    /// container, instance profile), this region, these timeouts and retries.
    pub async fn load(&self) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.connect_timeout)
                    .operation_attempt_timeout(self.attempt_timeout)
                    .operation_timeout(
                        self.attempt_timeout * self.max_attempts.max(1) + self.connect_timeout,
                    )
                    .build(),
            );
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        loader.http_client(https_client()).load().await
    }
}
