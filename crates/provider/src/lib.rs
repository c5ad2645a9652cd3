//! Domain types and the cloud traits the cps orchestration is written against.
//!
//! Two implementations exist: `cps-aws` (EC2 over the real wire protocol) and [`memory`], an
//! in-process cloud with simulated latency and fault injection for logic tests and benchmarks.
//! Nothing here knows about AWS SDK types; errors are classified into [`Error`] variants the
//! orchestration can act on (a `VolumeInUse` means "try the next candidate", a `Throttled`
//! means "back off and retry").

mod calls;
mod error;
pub mod memory;
mod types;

pub use calls::CallLog;
pub use error::Error;
pub use types::{
    Attachment, AttachmentState, InstanceIdentity, InstanceState, Tags, Volume, VolumeSpec,
    VolumeState,
};

use std::collections::BTreeMap;

use async_trait::async_trait;

/// The block-storage operations of a cloud, as the attach flow needs them.
///
/// Every method is one logical API request (implementations may follow pagination inside
/// [`VolumeService::volumes_tagged`]); callers count on that when they budget calls.
#[async_trait]
pub trait VolumeService: Send + Sync {
    /// Every volume carrying all of `tags` (key and value), in any state and any zone.
    async fn volumes_tagged(&self, tags: &Tags) -> Result<Vec<Volume>, Error>;

    /// One volume by id.
    async fn volume(&self, volume_id: &str) -> Result<Volume, Error>;

    /// Creates a volume with its tags applied atomically. `client_token` makes the request
    /// idempotent: the same token and spec return the volume the first request created.
    async fn create_volume(&self, spec: &VolumeSpec, client_token: &str) -> Result<Volume, Error>;

    /// Requests attachment of `volume_id` to `instance_id` as `device`. Succeeds for exactly
    /// one caller while the volume is available; the others get [`Error::VolumeInUse`].
    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<AttachmentState, Error>;

    /// The states of the given instances (one request). Instances the cloud no longer knows
    /// are reported as [`InstanceState::Terminated`].
    async fn instance_states(
        &self,
        instance_ids: &[String],
    ) -> Result<BTreeMap<String, InstanceState>, Error>;
}
