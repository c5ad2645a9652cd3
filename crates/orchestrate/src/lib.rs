//! The attach flow and the rolling update of cps, written against the [`cps_provider`] and [`cps_blockdev`] traits
//! only: this crate never talks to AWS or to the kernel itself, so every decision it makes can
//! be tested on the in-memory cloud and a fake host, and proven on the real ones by the same
//! code.
//!
//! - [`config`] reads and validates the YAML configuration (and command-line overrides).
//! - [`attach`] claims the volume (reuse, pool, create), waits for it, then has the host find
//!   the device, format it only if proven empty, mount it and persist the mount.
//! - [`roll`] replaces a cluster's outdated nodes one at a time, never breaking quorum.
//! - [`backoff`] holds the retry and polling schedules every wait uses.

pub mod attach;
pub mod backoff;
pub mod boot;
pub mod claim;
pub mod config;
mod error;
pub mod journal;
pub mod roll;

pub use attach::{AttachOutcome, FsOutcome, MountOutcome, attach, prepare_device};
pub use boot::{
    BootOutcome, Hosts, InterfaceOutcome, LifecycleOutcome, Services, boot, boot_until,
};
pub use claim::{Claim, ClaimTarget, Origin, claim_volume};
pub use config::{AttachConfig, ConfigError, Overrides};
pub use error::{Error, ErrorClass};
