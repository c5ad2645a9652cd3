//! Instance identity from IMDSv2 (session token first, then the identity document).

use std::time::Duration;

use aws_config::imds;
use cps_provider::InstanceIdentity;
use serde::Deserialize;

use crate::Error;

const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
const DOCUMENT: &str = "/latest/dynamic/instance-identity/document";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityDocument {
    instance_id: String,
    region: String,
    availability_zone: String,
}

/// Reads instance id, region and availability zone. `endpoint` overrides the link-local
/// address (tests and the bench point it at a fake per simulated instance).
pub async fn fetch_identity(endpoint: Option<&str>) -> Result<InstanceIdentity, Error> {
    let shown = endpoint.unwrap_or(DEFAULT_ENDPOINT).to_owned();
    let mut builder = imds::Client::builder()
        .configure(
            &aws_config::provider_config::ProviderConfig::default()
                .with_http_client(crate::https_client()),
        )
        .max_attempts(4)
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(2));
    if let Some(url) = endpoint {
        builder = builder.endpoint(url).map_err(|e| Error::Imds {
            endpoint: shown.clone(),
            message: format!("not a usable endpoint: {e}"),
        })?;
    }
    let client = builder.build();
    let text = client.get(DOCUMENT).await.map_err(|e| Error::Imds {
        endpoint: shown.clone(),
        message: crate::classify::causes(&e),
    })?;
    let doc: IdentityDocument =
        serde_json::from_str(text.as_ref()).map_err(|e| Error::IdentityDocument {
            endpoint: shown.clone(),
            message: e.to_string(),
        })?;
    if doc.instance_id.is_empty() || doc.region.is_empty() || doc.availability_zone.is_empty() {
        return Err(Error::IdentityDocument {
            endpoint: shown,
            message: "instanceId, region or availabilityZone is empty".into(),
        });
    }
    Ok(InstanceIdentity {
        instance_id: doc.instance_id,
        region: doc.region,
        availability_zone: doc.availability_zone,
    })
}
