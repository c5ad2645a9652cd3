//! Creating the volume: under a client token, so racing agents of one identity make one
//! volume, and walking on to the next token when the one it named was deleted.

use cps_provider::{Error as CloudError, InstanceIdentity, Volume, VolumeService, VolumeSpec};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::backoff::{self, RetryPolicy, Schedule};
use crate::config::AttachConfig;
use crate::error::Error;

use super::*;

/// How one creation went.
pub(super) enum Creation {
    Attached(Volume),
    /// Another instance attached the new volume first.
    Lost,
    /// List again: the identity's volume may show up, or the next token is due.
    Again,
}

/// Where an identity's creation token is: the generation in use, and since when the volume it
/// names (or the identity's volume, after IdempotentParameterMismatch) has been nowhere to see.
#[derive(Default)]
pub(super) struct TokenWalk {
    pub(super) generation: u32,
    unseen_since: Option<Instant>,
    looks: u32,
}

impl TokenWalk {
    fn next_token(&mut self, token: &str, why: &str) {
        info!(
            client_token = token,
            generation = self.generation,
            reason = why,
            "the volume this identity's creation token names is gone (deleted?); moving on to the next token"
        );
        *self = Self {
            generation: self.generation + 1,
            ..Self::default()
        };
    }
}

/// What a creation needs to know.
pub(super) struct Creator<'a> {
    pub(super) cloud_api: &'a dyn VolumeService,
    pub(super) config: &'a AttachConfig,
    pub(super) identity: &'a InstanceIdentity,
    pub(super) pool: bool,
    pub(super) seed: u64,
    pub(super) policy: RetryPolicy,
}

impl Creator<'_> {
    /// CreateVolume with `token`, wait for the volume, attach it.
    pub(super) async fn create_once(
        &self,
        spec: &VolumeSpec,
        token: &str,
        walk: &mut TokenWalk,
        attach_attempts: &mut u32,
    ) -> Result<Creation, Error> {
        let (cloud_api, seed, policy) = (self.cloud_api, self.seed, self.policy);
        let gone_after = GONE_AFTER.min(self.config.timeouts.create / 2);
        let created = match backoff::retry(policy, "CreateVolume", seed, || {
            cloud_api.create_volume(spec, token)
        })
        .await
        {
            Ok(v) => v,
            // Used with other settings: by another instance creating this identity's volume
            // (another zone or size; it shows up in a listing), or long ago for a volume since
            // deleted, when nothing ever shows up.
            Err(CloudError::IdempotencyMismatch { .. }) if !self.pool => {
                let since = *walk.unseen_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= gone_after {
                    let why = format!(
                        "it was used with other settings and no volume with this identity appeared for {}s",
                        since.elapsed().as_secs()
                    );
                    walk.next_token(token, &why);
                } else {
                    debug!("this identity's token was used with other settings; looking again");
                    tokio::time::sleep(Schedule::CLOUD_STATE.delay(walk.looks)).await;
                    walk.looks += 1;
                }
                return Ok(Creation::Again);
            }
            Err(e) => return Err(Error::cloud("creating a volume")(e)),
        };
        info!(volume_id = %created.id, "volume created");
        let me = self.identity.instance_id.as_str();
        match wait_available(
            cloud_api,
            self.config,
            &created.id,
            gone_after,
            seed,
            policy,
        )
        .await?
        {
            Fresh::Available => {}
            Fresh::Taken => {
                debug!(volume_id = %created.id, "the new volume was claimed by another instance; looking again");
                return Ok(Creation::Lost);
            }
            // Pool mode's next creation has a token of its own.
            Fresh::Gone(_) if self.pool => return Ok(Creation::Lost),
            Fresh::Gone(why) => {
                walk.next_token(token, &why);
                return Ok(Creation::Again);
            }
        }
        *attach_attempts += 1;
        let device = self.config.block_device.as_str();
        info!(volume_id = %created.id, device, "attaching new volume");
        if try_attach(cloud_api, &created.id, me, device, seed, policy).await? {
            let volume =
                wait_attached(cloud_api, self.identity, self.config, &created.id, policy).await?;
            return Ok(Creation::Attached(volume));
        }
        Ok(Creation::Lost)
    }
}
