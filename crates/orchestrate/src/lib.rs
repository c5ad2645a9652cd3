//! The attach flow and the rolling update of cps, written against the [`cps_provider`] and [`cps_blockdev`] traits
//! only: this crate never talks to AWS or to the kernel itself, so every decision it makes can
//! be tested on the in-memory cloud and a fake host, and proven on the real ones by the same
//! code.
//!
//! - [`config`] reads and validates the YAML configuration (and command-line overrides).
//! - [`boot`] is cps-attach's boot: the node's identity, its volume claimed ([`boot::claim`]:
//!   reuse, pool, slot, create) and prepared ([`boot::device`]: find the device, format it only
//!   if proven empty, mount it, persist the mount), its interface, files, hooks and lifecycle.
//! - [`roll`] replaces a cluster's outdated nodes one at a time, never breaking quorum.
//! - [`backoff`] holds the retry and polling schedules every wait uses.

pub mod backoff;
pub mod boot;
pub mod config;
mod error;
pub mod roll;

pub use boot::claim::{Claim, ClaimTarget, Origin, claim_volume};
pub use boot::device::{AttachOutcome, FsOutcome, MountOutcome, attach, prepare_device};
pub use boot::{
    BootOutcome, Hosts, InterfaceOutcome, LifecycleOutcome, Services, boot, boot_until,
};
pub use config::{AttachConfig, ConfigError, Overrides};
pub use error::{Error, ErrorClass};
