//! What a device sends once connected (device-protocol §2.3–§2.7): PUBLISH (telemetry, twin
//! requests, method responses), PUBACK of a C2D delivery, SUBSCRIBE, UNSUBSCRIBE, PINGREQ and
//! DISCONNECT. Anything else — a second CONNECT, QoS 2, a topic that is not the device's —
//! closes the connection (§2.3).

use iothubd_actors::messages::{DisconnectReason, MethodResponse, SessionSubscriptions};
use ntex::util::Bytes;
use ntex_mqtt::v3::codec::{Decoded, Packet, Publish, QoS, SubscribeReturnCode};

use super::session::{Ended, MAX_SUBSCRIPTIONS, Session, Will, Work};
use super::telemetry::event_from_publish;
use super::topic::{DeviceTopic, Subscription};
use super::twin;

impl Session {
    pub(super) fn packet(&mut self, decoded: Decoded) -> Result<(), Ended> {
        let packet = match decoded {
            Decoded::Publish(publish, payload, _) => return self.publish(publish, payload),
            // Frames reach the codec whole, so it never streams a payload.
            Decoded::PayloadChunk(..) => return Err(self.refuse("an unexpected payload chunk")),
            Decoded::Packet(packet, _) => packet,
        };
        match packet {
            Packet::PublishAck { packet_id } => self.c2d_acknowledged(packet_id),
            Packet::Subscribe { packet_id, topic_filters } => {
                let status = topic_filters.iter().map(|(filter, qos)| self.subscribe(filter, *qos)).collect();
                self.report_subscriptions();
                self.out.packet(Packet::SubscribeAck { packet_id, status });
            }
            Packet::Unsubscribe { packet_id, topic_filters } => {
                for filter in &topic_filters {
                    if let Ok(s) = Subscription::parse(filter, &self.sender.key) {
                        self.subscriptions.retain(|existing| *existing != s);
                    }
                }
                self.report_subscriptions();
                self.out.packet(Packet::UnsubscribeAck { packet_id });
            }
            Packet::PingRequest => self.out.packet(Packet::PingResponse),
            Packet::Disconnect => {
                self.reason = DisconnectReason::ClientDisconnect;
                return Err(Ended);
            }
            other => return Err(self.refuse(format_args!("unexpected packet type {}", other.packet_type() >> 4))),
        }
        Ok(())
    }

    /// A PUBLISH becomes work at the back of `inflight`; it is answered in arrival order.
    fn publish(&mut self, publish: Publish, payload: Bytes) -> Result<(), Ended> {
        let packet_id = match publish.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => publish.packet_id,
            QoS::ExactlyOnce => return Err(self.refuse("QoS 2 PUBLISH")),
        };
        let topic = match DeviceTopic::parse(&publish.topic, &self.sender.key) {
            Ok(topic) => topic,
            Err(e) => return Err(self.refuse(format_args!("PUBLISH to '{}' refused: {e}", &*publish.topic))),
        };
        let work = match topic {
            DeviceTopic::Telemetry { bag } => {
                let event = event_from_publish(bag, &payload, publish.retain).map_err(|e| self.refuse(e))?;
                Work::Telemetry { packet_id, appended: self.ingest.telemetry(&self.hub, &self.sender, event) }
            }
            DeviceTopic::TwinGet { rid } => {
                Work::Twin { packet_id, rid: rid.to_owned(), reply: Box::pin(twin::get(self.actor.clone())) }
            }
            DeviceTopic::TwinReportedPatch { rid } => {
                let patch = serde_json::from_slice(&payload);
                Work::Twin { packet_id, rid: rid.to_owned(), reply: Box::pin(twin::report(self.actor.clone(), patch)) }
            }
            DeviceTopic::MethodResponse { status, rid } => {
                self.actor.do_send(MethodResponse {
                    connection_id: self.connection_id,
                    rid: rid.into_owned(),
                    status,
                    payload: payload.to_vec(),
                });
                Work::Done { packet_id }
            }
        };
        self.inflight.push_back(work);
        Ok(())
    }

    /// One SUBSCRIBE filter: granted at the QoS asked for, at most 1 (the hub publishes at most
    /// at QoS 1, §2.3); unsupported, foreign or one too many → 0x80.
    fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReturnCode {
        let Ok(subscription) = Subscription::parse(filter, &self.sender.key) else {
            return SubscribeReturnCode::Failure;
        };
        if !self.subscriptions.contains(&subscription) {
            if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
                return SubscribeReturnCode::Failure;
            }
            self.subscriptions.push(subscription);
        }
        let at_most_once = qos == QoS::AtMostOnce;
        if subscription == Subscription::C2d {
            self.c2d_at_most_once = at_most_once;
        }
        SubscribeReturnCode::Success(if at_most_once { QoS::AtMostOnce } else { QoS::AtLeastOnce })
    }

    /// Tells the device actor what this session receives, after a SUBSCRIBE or UNSUBSCRIBE.
    fn report_subscriptions(&self) {
        self.actor.do_send(SessionSubscriptions {
            connection_id: self.connection_id,
            methods: self.subscriptions.contains(&Subscription::MethodRequests),
            desired: self.subscriptions.contains(&Subscription::DesiredPatches),
            c2d: self.subscriptions.contains(&Subscription::C2d),
            c2d_at_most_once: self.c2d_at_most_once,
        });
    }

    /// Appends the Will as the device's telemetry, with app property `iothub-MessageType` =
    /// `Will` (device-protocol §2.3). Best effort: the connection is gone, nobody awaits an ack.
    pub(super) async fn send_will(&self, will: Will) {
        let Ok(DeviceTopic::Telemetry { bag }) = DeviceTopic::parse(&will.topic, &self.sender.key) else {
            return;
        };
        let Ok(mut event) = event_from_publish(bag, &will.payload, will.retain) else {
            return;
        };
        event.application_properties.push(("iothub-MessageType".into(), Some("Will".into())));
        if let Err(e) = self.ingest.telemetry(&self.hub, &self.sender, event).await {
            tracing::warn!(identity = %self.sender.key, error = %e, "the Will message was not stored");
        }
    }
}
