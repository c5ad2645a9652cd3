//! Parameters and secrets in the in-memory cloud, for node files that take their content
//! from them.

use async_trait::async_trait;

use super::{MemoryCloud, World};
use crate::{Error, SecretRef, SecretService, SecretValue};

pub const GET_PARAMETER: &str = "GetParameter";
pub const GET_SECRET_VALUE: &str = "GetSecretValue";

impl World {
    /// Stores a parameter of the parameter store (replacing its value).
    pub fn put_parameter(&mut self, name: &str, value: &[u8]) {
        self.secrets
            .insert(SecretRef::Parameter(name.to_owned()), value.to_vec());
    }

    /// Stores a secret of the secret manager (replacing its value).
    pub fn put_secret(&mut self, name: &str, value: &[u8]) {
        self.secrets
            .insert(SecretRef::Secret(name.to_owned()), value.to_vec());
    }
}

#[async_trait]
impl SecretService for MemoryCloud {
    async fn secret(&self, secret: &SecretRef) -> Result<SecretValue, Error> {
        let (operation, name, code) = match secret {
            SecretRef::Parameter(n) => (GET_PARAMETER, n, "ParameterNotFound"),
            SecretRef::Secret(n) => (GET_SECRET_VALUE, n, "ResourceNotFoundException"),
        };
        self.request(operation, |world| {
            world
                .secrets
                .get(secret)
                .map(|v| SecretValue::new(v.clone()))
                .ok_or_else(|| Error::NotFound {
                    operation,
                    resource: name.clone(),
                    message: format!("{code}: {secret} does not exist"),
                })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Fault;

    #[tokio::test(start_paused = true)]
    async fn values_are_kept_per_store_and_missing_ones_are_not_found() {
        let cloud = MemoryCloud::default();
        cloud.with(|w| {
            w.put_parameter("/kafka/password", b"p4ss");
            w.put_secret("kafka/tls", b"-----BEGIN-----");
        });
        let value = cloud
            .secret(&SecretRef::Parameter("/kafka/password".into()))
            .await
            .unwrap();
        assert_eq!(value.clone().into_bytes(), b"p4ss");
        assert_eq!(format!("{value:?}"), "SecretValue(4 bytes)");
        let err = cloud
            .secret(&SecretRef::Secret("/kafka/password".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        cloud.inject(Fault::throttle(GET_SECRET_VALUE, 1));
        let tls = SecretRef::Secret("kafka/tls".into());
        assert!(cloud.secret(&tls).await.unwrap_err().is_retryable());
        assert_eq!(
            cloud.secret(&tls).await.unwrap().into_bytes(),
            b"-----BEGIN-----"
        );
        assert_eq!(cloud.calls().count(GET_PARAMETER), 1);
        assert_eq!(cloud.calls().count(GET_SECRET_VALUE), 3);
    }
}
