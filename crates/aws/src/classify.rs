//! SDK errors → [`cps_provider::Error`], by the EC2 / Auto Scaling / DynamoDB error code — and, for a
//! request that never reached AWS, by why: missing credentials, a malformed endpoint or region
//! and a host that does not exist are permanent (retrying for the command timeout would only
//! delay the message); timeouts and connection failures are transient.

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use cps_provider::Error;

/// What the failing request was about, for the error's context.
#[derive(Clone, Copy, Default)]
pub(crate) struct Context<'a> {
    pub volume_id: Option<&'a str>,
    pub interface_id: Option<&'a str>,
    pub instance_id: Option<&'a str>,
    pub device: Option<&'a str>,
    pub device_index: Option<i32>,
    pub client_token: Option<&'a str>,
    pub group: Option<&'a str>,
    pub snapshot_id: Option<&'a str>,
}

impl Context<'_> {
    fn resource(&self) -> String {
        self.volume_id
            .or(self.snapshot_id)
            .or(self.interface_id)
            .or(self.group)
            .or(self.instance_id)
            .unwrap_or("the resource")
            .to_owned()
    }

    fn instance(&self) -> String {
        self.instance_id.unwrap_or("the instance").to_owned()
    }
}

/// An error and its causes, `a: b: c`, each said once, on one line. `DisplayErrorContext`
/// would append the whole Debug dump of the error (raw HTTP headers and body) after them.
pub(crate) fn causes(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    // Bounded: source chains are short, but a cycle must not hang a boot.
    for _ in 0..16 {
        let Some(e) = next else { break };
        // One line: a list the SDK writes one item a line ("Attempted:\n  Environment: …")
        // becomes "Attempted: Environment: …; Profile: …".
        let mut text = String::new();
        for l in without_dumps(&e.to_string()).lines().map(str::trim) {
            if l.is_empty() {
                continue;
            }
            if !text.is_empty() {
                text.push_str(if text.ends_with(':') { " " } else { "; " });
            }
            text.push_str(l);
        }
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Some SDK messages quote a whole request or response in backticks (``failed to apply endpoint
/// `…` to request `Request { body: …, headers: … }` ``); such a quote is left out.
fn without_dumps(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(1024));
    let mut rest = text;
    while let Some(open) = rest.find('`') {
        let Some(len) = rest[open + 1..].find('`') else {
            break;
        };
        let quoted = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..=open]);
        if quoted.len() > 120 && quoted.contains('{') {
            out.push('…');
        } else {
            out.push_str(quoted);
        }
        out.push('`');
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// What AWS said: for a service error its code, its sentence and the request id; otherwise the
/// chain of causes.
pub(crate) fn said<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    let SdkError::ServiceError(service) = err else {
        return causes(err);
    };
    let e = service.err();
    let mut text = match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        (None, Some(message)) => message.to_owned(),
        // Not an AWS error document (a proxy, an emulator): its status and the start of what
        // it said, on one line.
        (None, None) => {
            let raw = service.raw();
            let body = raw
                .body()
                .bytes()
                .map(|b| {
                    String::from_utf8_lossy(b)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let shown: String = body.chars().take(300).collect();
            let cut = if shown.len() < body.len() { "…" } else { "" };
            format!(
                "HTTP {} without an AWS error code: {shown}{cut}",
                raw.status()
            )
        }
    };
    if let Some(id) = e.meta().extra("aws_request_id") {
        text.push_str(&format!(" (request id {id})"));
    }
    text
}

/// Why a request that never reached AWS failed, if retrying cannot help.
fn permanent(operation: &'static str, err: &(dyn StdError + 'static)) -> Option<Error> {
    let message = causes(err);
    let mut next = Some(err);
    for _ in 0..16 {
        let Some(e) = next else { break };
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            // Timeouts and provider failures (STS or IMDS answering 5xx) may pass; no
            // credentials at all, or a broken profile, will not.
            return match c {
                CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_) => None,
                _ => Some(Error::Credentials { operation, message }),
            };
        }
        next = e.source();
    }
    // getaddrinfo's EAI_NONAME: the name does not exist (an unknown region, a typo in the
    // endpoint). EAI_AGAIN ("Temporary failure in name resolution") stays transient.
    let no_such_host = [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided",
    ];
    let bad_url = [
        "unsupported scheme",
        "failed to apply endpoint",
        "invalid uri",
        "invalid URL",
    ];
    if no_such_host
        .iter()
        .chain(&bad_url)
        .any(|m| message.contains(m))
    {
        return Some(Error::Endpoint { operation, message });
    }
    None
}

pub(crate) fn classify<E>(
    operation: &'static str,
    ctx: Context<'_>,
    err: SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    let message = said(&err);
    let code = err.code().map(str::to_owned);
    match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            return permanent(operation, &err).unwrap_or(Error::Transient { operation, message });
        }
        // The request could not even be built because of where it goes: the region is not a
        // host name, an endpoint parameter is invalid. (Anything else is a plain failure.)
        SdkError::ConstructionFailure(_)
            if message.contains("region") || message.contains("endpoint") =>
        {
            return Error::Endpoint { operation, message };
        }
        _ => {}
    }
    match code.as_deref() {
        Some("VolumeInUse") => Error::VolumeInUse {
            volume_id: ctx.resource(),
            message,
        },
        Some("InvalidNetworkInterface.InUse") => Error::InterfaceInUse {
            interface_id: ctx.resource(),
            message,
        },
        Some("InvalidVolume.ZoneMismatch") => Error::ZoneMismatch {
            resource: ctx.resource(),
            instance_id: ctx.instance(),
            message,
        },
        Some("InvalidParameterCombination") if message.contains("availability zone") => {
            Error::ZoneMismatch {
                resource: ctx.resource(),
                instance_id: ctx.instance(),
                message,
            }
        }
        Some("InvalidParameterValue")
            if operation == "AttachVolume" && message.contains("already in use") =>
        {
            Error::DeviceNameInUse {
                device: ctx.device.unwrap_or("the device").to_owned(),
                instance_id: ctx.instance(),
                message,
            }
        }
        Some("InvalidParameterValue") if message.contains("device index") => {
            Error::DeviceIndexInUse {
                instance_id: ctx.instance(),
                device_index: ctx.device_index.unwrap_or_default(),
                message,
            }
        }
        Some("ValidationError") if message.contains("No active Lifecycle Action") => {
            Error::NoActiveLifecycleAction {
                instance_id: ctx.instance(),
                message,
            }
        }
        Some("VolumeModificationRateExceeded") => Error::ModificationCooldown {
            volume_id: ctx.resource(),
            message,
        },
        Some("IncorrectModificationState") => Error::ModificationInProgress {
            volume_id: ctx.resource(),
            message,
        },
        // IncorrectInstanceState (this instance is not running) is no reason to try another
        // volume: it falls through to Api, a plain failure.
        Some("IncorrectState") => Error::IncorrectState {
            operation,
            resource: ctx.resource(),
            message,
        },
        Some(
            "InvalidVolume.NotFound"
            | "InvalidInstanceID.NotFound"
            | "InvalidInstanceID.Malformed"
            | "InvalidSnapshot.NotFound"
            | "InvalidSnapshotID.Malformed"
            | "InvalidVolumeID.Malformed"
            | "InvalidNetworkInterfaceID.NotFound"
            | "InvalidNetworkInterfaceID.Malformed",
        ) => Error::NotFound {
            operation,
            resource: ctx.resource(),
            message,
        },
        Some("IdempotentParameterMismatch") => Error::IdempotencyMismatch {
            operation,
            token: ctx.client_token.unwrap_or("").to_owned(),
            message,
        },
        Some(
            "UnauthorizedOperation"
            | "AccessDenied"
            | "AccessDeniedException"
            | "Blocked"
            | "OptInRequired",
        ) => Error::Unauthorized { operation, message },
        // AWS does not accept the credentials themselves.
        Some(
            "AuthFailure"
            | "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "InvalidSignatureException"
            | "MissingAuthenticationToken"
            | "InvalidAccessKeyId"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "RequestExpired",
        ) => Error::Credentials { operation, message },
        Some(
            "RequestLimitExceeded"
            | "ProvisionedThroughputExceededException"
            | "Throttling"
            | "ThrottlingException"
            | "RequestThrottled"
            | "TooManyRequestsException",
        ) => Error::Throttled { operation, message },
        Some("InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable") => {
            Error::Transient { operation, message }
        }
        _ if err
            .raw_response()
            .is_some_and(|r| r.status().is_server_error()) =>
        {
            Error::Transient { operation, message }
        }
        None if err
            .raw_response()
            .is_some_and(|r| r.status().as_u16() == 403) =>
        {
            Error::Unauthorized { operation, message }
        }
        _ => Error::Api {
            operation,
            code,
            message,
        },
    }
}
