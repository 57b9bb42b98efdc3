//! Device twin over MQTT (device-protocol §2.6): GET and reported PATCH, answered on
//! `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]` with the `$rid` echoed verbatim.
//! Desired-property notifications are sent by the session's command task (`connect`).

use iothubd_actors::messages::{GetDeviceTwin, ReportProperties, TwinFailure};
use ntex_mqtt::v3::MqttSink;
use serde_json::Value;

use super::session::MqttSession;
use super::topic;

/// A twin response: status, body, and the reported `$version` after a PATCH.
pub struct TwinReply {
    status: u16,
    body: Vec<u8>,
    version: Option<i64>,
}

fn failure(e: TwinFailure) -> TwinReply {
    let status = match e {
        TwinFailure::NotFound(_) => 404,
        TwinFailure::PreconditionFailed => 412,
        TwinFailure::Invalid(_) => 400,
        TwinFailure::Store(_) => 503,
    };
    TwinReply { status, body: Vec::new(), version: None }
}

/// GET: `{"desired":{…,"$version"},"reported":{…,"$version"}}`, status 200.
pub async fn get(state: &MqttSession) -> TwinReply {
    match state.actor.send(GetDeviceTwin).await {
        Ok(Ok(view)) => TwinReply { status: 200, body: view.to_string().into_bytes(), version: None },
        Ok(Err(e)) => failure(e),
        Err(_) => TwinReply { status: 503, body: Vec::new(), version: None },
    }
}

/// Reported PATCH: a JSON object merged into reported; 204 with the new `$version`, 400 for a
/// body that is not a JSON object or breaks the twin rules.
pub async fn report(state: &MqttSession, body: &[u8]) -> TwinReply {
    let patch = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        _ => return TwinReply { status: 400, body: Vec::new(), version: None },
    };
    match state.actor.send(ReportProperties(patch)).await {
        Ok(Ok(version)) => TwinReply { status: 204, body: Vec::new(), version: Some(version as i64) },
        Ok(Err(e)) => failure(e),
        Err(_) => TwinReply { status: 503, body: Vec::new(), version: None },
    }
}

/// Publishes the response at QoS 0 (the Node SDK uses QoS 0 for twin; others take either).
pub fn respond(sink: &MqttSink, rid: &str, reply: TwinReply) {
    let topic = topic::twin_response(reply.status, rid, reply.version);
    let _ = sink.publish(topic).send_at_most_once(reply.body.into());
}
