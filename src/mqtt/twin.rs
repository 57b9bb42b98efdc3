//! Device twin over MQTT (device-protocol §2.6): GET and reported PATCH, answered on
//! `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]` with the `$rid` echoed verbatim.
//! Desired-property notifications are published by the session when its actor sends them.

use actix::Addr;
use iothubd_actors::device::DeviceActor;
use iothubd_actors::messages::{GetDeviceTwin, ReportProperties, TwinFailure};
use serde_json::Value;

use super::topic;

/// A twin response: status, body, and the reported `$version` after a PATCH.
pub struct TwinReply {
    status: u16,
    body: Vec<u8>,
    version: Option<i64>,
}

impl TwinReply {
    fn status(status: u16) -> Self {
        Self { status, body: Vec::new(), version: None }
    }

    /// The response topic for request `rid`, and its body.
    pub fn into_publish(self, rid: &str) -> (String, Vec<u8>) {
        (topic::twin_response(self.status, rid, self.version), self.body)
    }
}

fn failure(e: TwinFailure) -> TwinReply {
    TwinReply::status(match e {
        TwinFailure::NotFound(_) => 404,
        TwinFailure::PreconditionFailed => 412,
        TwinFailure::Invalid(_) => 400,
        TwinFailure::Store(_) => 503,
    })
}

/// GET: `{"desired":{…,"$version"},"reported":{…,"$version"}}`, status 200.
pub async fn get(actor: Addr<DeviceActor>) -> TwinReply {
    match actor.send(GetDeviceTwin).await {
        Ok(Ok(view)) => TwinReply { status: 200, body: view.to_string().into_bytes(), version: None },
        Ok(Err(e)) => failure(e),
        Err(_) => TwinReply::status(503),
    }
}

/// Reported PATCH: a JSON object merged into reported; 204 with the new `$version`, 400 for a
/// body that is not a JSON object or breaks the twin rules.
pub async fn report(actor: Addr<DeviceActor>, body: Result<Value, serde_json::Error>) -> TwinReply {
    let patch = match body {
        Ok(Value::Object(map)) => map,
        _ => return TwinReply::status(400),
    };
    match actor.send(ReportProperties(patch)).await {
        Ok(Ok(version)) => TwinReply { status: 204, body: Vec::new(), version: Some(version as i64) },
        Ok(Err(e)) => failure(e),
        Err(_) => TwinReply::status(503),
    }
}
