/// Failures of this crate's own setup steps; API failures are [`cps_provider::Error`]s.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("instance metadata service at {endpoint}: {message}")]
    Imds { endpoint: String, message: String },

    #[error("instance identity document from {endpoint} is not usable: {message}")]
    IdentityDocument { endpoint: String, message: String },
}
