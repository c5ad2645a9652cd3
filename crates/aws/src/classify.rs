//! SDK errors → [`cps_provider::Error`], by the EC2 / Auto Scaling error code.

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
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
}

impl Context<'_> {
    fn resource(&self) -> String {
        self.volume_id
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

/// The request was never sent because no credentials could be loaded (a provider timing out
/// or failing, STS or IMDS answering 5xx, may pass and stays transient).
fn no_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut next = Some(err);
    // Bounded: source chains are short.
    for _ in 0..16 {
        let Some(e) = next else { return false };
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return matches!(
                c,
                CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_)
            );
        }
        next = e.source();
    }
    false
}

pub(crate) fn classify<E>(
    operation: &'static str,
    ctx: Context<'_>,
    err: SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = DisplayErrorContext(&err).to_string();
    let code = err.code().map(str::to_owned);
    if matches!(
        err,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    ) {
        // No credentials at all (or a broken profile) will not pass: retrying would only
        // delay the message by the command's timeout.
        if no_credentials(&err) {
            return Error::Unauthorized { operation, message };
        }
        return Error::Transient { operation, message };
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
            | "AuthFailure"
            | "AccessDenied"
            | "AccessDeniedException"
            | "Blocked"
            | "OptInRequired",
        ) => Error::Unauthorized { operation, message },
        Some(
            "RequestLimitExceeded"
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
        _ => Error::Api {
            operation,
            code,
            message,
        },
    }
}
