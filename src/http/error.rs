//! REST errors in IoT Hub's own terms (service-api §2): status, `iothub-errorcode` header and
//! `{"Message":"ErrorCode:{Name};{text}","ExceptionMessage":"Tracking ID:…"}`.
//!
//! Every domain error is mapped here, once. The body form is the one Node and C# both parse
//! (Node splits `Message` on `;` and `:`; C# falls back to it and checks the header).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use chrono::Utc;
use iothubd_actors::deployment::HubAdminError;
use iothubd_actors::messages::{C2dFailure, RegistryError};
use iothubd_actors::store::StoreError;

use crate::auth::AuthError;

/// The error names of service-api §2 that this hub answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    ArgumentInvalid,
    ArgumentNull,
    InvalidOperation,
    IotHubFormatError,
    DeviceDefinedMultipleTimes,
    BulkRegistryOperationFailure,
    IotHubUnauthorizedAccess,
    DeviceNotFound,
    ModuleNotFound,
    DeviceAlreadyExists,
    ModuleAlreadyExistsOnDevice,
    PreconditionFailed,
    MessageTooLarge,
    TooManyDevices,
    DeviceNotOnline,
    DeviceMaximumQueueDepthExceeded,
    DeviceMessageLockLost,
    GatewayTimeout,
    ServerError,
    ServiceUnavailable,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            Self::ArgumentInvalid => "ArgumentInvalid",
            Self::ArgumentNull => "ArgumentNull",
            Self::InvalidOperation => "InvalidOperation",
            Self::IotHubFormatError => "IotHubFormatError",
            Self::DeviceDefinedMultipleTimes => "DeviceDefinedMultipleTimes",
            Self::BulkRegistryOperationFailure => "BulkRegistryOperationFailure",
            Self::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::ModuleNotFound => "ModuleNotFound",
            Self::DeviceAlreadyExists => "DeviceAlreadyExists",
            Self::ModuleAlreadyExistsOnDevice => "ModuleAlreadyExistsOnDevice",
            Self::PreconditionFailed => "PreconditionFailed",
            Self::MessageTooLarge => "MessageTooLarge",
            Self::TooManyDevices => "TooManyDevices",
            Self::DeviceNotOnline => "DeviceNotOnline",
            Self::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            Self::DeviceMessageLockLost => "DeviceMessageLockLost",
            Self::GatewayTimeout => "GatewayTimeout",
            Self::ServerError => "ServerError",
            Self::ServiceUnavailable => "ServiceUnavailable",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::ArgumentInvalid
            | Self::ArgumentNull
            | Self::InvalidOperation
            | Self::IotHubFormatError
            | Self::DeviceDefinedMultipleTimes
            | Self::BulkRegistryOperationFailure => StatusCode::BAD_REQUEST,
            Self::IotHubUnauthorizedAccess => StatusCode::UNAUTHORIZED,
            Self::DeviceNotFound | Self::ModuleNotFound | Self::DeviceNotOnline => StatusCode::NOT_FOUND,
            Self::DeviceAlreadyExists | Self::ModuleAlreadyExistsOnDevice => StatusCode::CONFLICT,
            Self::DeviceMaximumQueueDepthExceeded => StatusCode::FORBIDDEN,
            Self::PreconditionFailed | Self::DeviceMessageLockLost => StatusCode::PRECONDITION_FAILED,
            Self::TooManyDevices | Self::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error answered to a service or device REST call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }
}

/// `{"Message":…,"ExceptionMessage":…}` of service-api §2.
pub fn error_body(code: ErrorCode, message: &str) -> serde_json::Value {
    let now = Utc::now();
    serde_json::json!({
        "Message": format!("ErrorCode:{};{}", code.name(), message),
        "ExceptionMessage": format!(
            "Tracking ID:{}-G:0-TimeStamp:{}",
            uuid::Uuid::new_v4().simple(),
            now.format("%m/%d/%Y %H:%M:%S")
        ),
    })
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.code.status())
            .insert_header(("iothub-errorcode", self.code.name()))
            .json(error_body(self.code, &self.message))
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::new(ErrorCode::ServiceUnavailable, e.to_string()),
            _ => Self::new(ErrorCode::ServerError, e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let text = e.to_string();
        let code = match &e {
            RegistryError::NotFound(k) if k.is_module() => ErrorCode::ModuleNotFound,
            RegistryError::NotFound(_) => ErrorCode::DeviceNotFound,
            RegistryError::AlreadyExists(k) if k.is_module() => ErrorCode::ModuleAlreadyExistsOnDevice,
            RegistryError::AlreadyExists(_) => ErrorCode::DeviceAlreadyExists,
            RegistryError::PreconditionFailed(_) => ErrorCode::PreconditionFailed,
            RegistryError::Invalid(_)
            | RegistryError::ETagRequired(_)
            | RegistryError::TwinETagRequired(_)
            | RegistryError::InvalidTwin { .. } => ErrorCode::ArgumentInvalid,
            RegistryError::Store(s) => return s.clone().into(),
            RegistryError::HubStopped => ErrorCode::ServiceUnavailable,
        };
        Self::new(code, text)
    }
}

impl From<C2dFailure> for ApiError {
    fn from(e: C2dFailure) -> Self {
        let text = e.to_string();
        let code = match &e {
            C2dFailure::NotFound(k) if k.is_module() => ErrorCode::ModuleNotFound,
            C2dFailure::NotFound(_) => ErrorCode::DeviceNotFound,
            C2dFailure::QueueFull { .. } => ErrorCode::DeviceMaximumQueueDepthExceeded,
            C2dFailure::LockLost => ErrorCode::DeviceMessageLockLost,
            C2dFailure::Store(s) => return s.clone().into(),
        };
        Self::new(code, text)
    }
}

/// Errors of the operator API, ARM-shaped: `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OperatorError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl OperatorError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl ResponseError for OperatorError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status)
            .json(serde_json::json!({ "error": { "code": self.code, "message": self.message } }))
    }
}

impl From<HubAdminError> for OperatorError {
    fn from(e: HubAdminError) -> Self {
        let (status, code) = match &e {
            HubAdminError::Invalid(_) => (StatusCode::BAD_REQUEST, "InvalidHub"),
            HubAdminError::AlreadyExists => (StatusCode::CONFLICT, "HubAlreadyExists"),
            HubAdminError::NotFound => (StatusCode::NOT_FOUND, "HubNotFound"),
            HubAdminError::PreconditionFailed => (StatusCode::PRECONDITION_FAILED, "PreconditionFailed"),
            HubAdminError::Store(StoreError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "StoreUnavailable"),
            HubAdminError::Store(_) | HubAdminError::ActorGone => (StatusCode::INTERNAL_SERVER_ERROR, "ServerError"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<StoreError> for OperatorError {
    fn from(e: StoreError) -> Self {
        HubAdminError::from(e).into()
    }
}
