//! SDK errors → [`cps_provider::Error`], by the EC2 error code.

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use cps_provider::Error;

/// What the failing request was about, for the error's context.
#[derive(Clone, Copy, Default)]
pub(crate) struct Context<'a> {
    pub volume_id: Option<&'a str>,
    pub instance_id: Option<&'a str>,
    pub device: Option<&'a str>,
    pub client_token: Option<&'a str>,
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
    let volume_id = ctx.volume_id.unwrap_or("the volume").to_owned();
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return Error::Transient { operation, message };
        }
        SdkError::ServiceError(_) | SdkError::ConstructionFailure(_) => {}
        _ => {}
    }
    match code.as_deref() {
        Some("VolumeInUse") => Error::VolumeInUse { volume_id, message },
        Some("InvalidVolume.ZoneMismatch") => Error::ZoneMismatch {
            volume_id,
            instance_id: ctx.instance_id.unwrap_or("the instance").to_owned(),
            message,
        },
        Some("InvalidParameterValue")
            if operation == "AttachVolume" && message.contains("already in use") =>
        {
            Error::DeviceNameInUse {
                device: ctx.device.unwrap_or("the device").to_owned(),
                instance_id: ctx.instance_id.unwrap_or("the instance").to_owned(),
                message,
            }
        }
        // IncorrectInstanceState (this instance is not running) is no reason to try another
        // volume: it falls through to Api, a plain failure.
        Some("IncorrectState") => Error::IncorrectState {
            operation,
            resource: ctx
                .volume_id
                .or(ctx.instance_id)
                .unwrap_or("the resource")
                .to_owned(),
            message,
        },
        Some(
            "InvalidVolume.NotFound"
            | "InvalidInstanceID.NotFound"
            | "InvalidInstanceID.Malformed"
            | "InvalidVolumeID.Malformed",
        ) => Error::NotFound {
            operation,
            resource: ctx
                .volume_id
                .or(ctx.instance_id)
                .unwrap_or("the resource")
                .to_owned(),
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
