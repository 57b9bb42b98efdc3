//! What the device's actor asks a session to send (its [`SessionCommand`]s): direct-method
//! requests and desired-property patches at QoS 0 (SDKs take any granted QoS up to 1, and a
//! lost request surfaces as the caller's timeout: device-protocol §2.3, §2.7), cloud-to-device
//! messages at the subscription's QoS (§2.8), and the order to close.

use std::num::NonZeroU16;

use iothubd_actors::messages::{
    C2dDelivery, C2dOutcome, CloseReason, DisconnectReason, MethodRequest, SessionCommand, SettleC2d,
};
use iothubd_actors::model::c2d::FeedbackMode;
use ntex::util::Bytes;

use super::bag::{PropertyBag, SystemProperties};
use super::session::{Ended, Session};
use super::topic;

impl Session {
    pub(super) fn command(&mut self, command: SessionCommand) -> Result<(), Ended> {
        match command {
            SessionCommand::Close(reason) => {
                self.reason = match reason {
                    CloseReason::NewerSession => DisconnectReason::TakenOver,
                    CloseReason::IdentityRevoked => DisconnectReason::IdentityRevoked,
                };
                return Err(Ended);
            }
            SessionCommand::MethodRequest(request) => {
                let MethodRequest { name, rid, payload } = *request;
                self.out.publish(topic::method_request(&name, &rid), None, false, Bytes::from(payload));
            }
            SessionCommand::DesiredPatch(patch) => {
                let topic = topic::desired_patch(patch.version as i64);
                self.out.publish(topic, None, false, Bytes::from(patch.body));
            }
            SessionCommand::C2d(delivery) => self.deliver_c2d(*delivery),
        }
        Ok(())
    }

    /// Publishes a cloud-to-device message on `devices/{d}/messages/devicebound/{bag}`: at QoS 1
    /// its PUBACK completes it; at QoS 0 (the device subscribed so) it completes when sent.
    /// Without a PUBACK (the connection dropped) the actor makes it Enqueued again when the
    /// session detaches, and redelivers it with DUP set.
    fn deliver_c2d(&mut self, delivery: C2dDelivery) {
        let C2dDelivery { key, message, lock_token, redelivery, at_most_once } = delivery;
        let to = match &key.module_id {
            Some(module) => format!("/devices/{}/modules/{module}/messages/deviceBound", key.device_id),
            None => format!("/devices/{}/messages/deviceBound", key.device_id),
        };
        let ack = message.ack;
        let bag = PropertyBag {
            system: SystemProperties {
                message_id: message.message_id.as_deref().map(Into::into),
                correlation_id: message.correlation_id.as_deref().map(Into::into),
                user_id: message.user_id.as_deref().map(Into::into),
                to: Some(to.into()),
                content_type: message.content_type.as_deref().map(Into::into),
                content_encoding: message.content_encoding.as_deref().map(Into::into),
                ack: (ack != FeedbackMode::None).then(|| ack.as_str().into()),
                ..Default::default()
            },
            application: message.properties.iter().map(|(k, v)| (k.as_str().into(), Some(v.as_str().into()))).collect(),
        };
        let topic = topic::c2d(&key.device_id, &bag);
        let body = Bytes::from(message.body);
        if at_most_once {
            self.out.publish(topic, None, redelivery, body);
            self.actor.do_send(SettleC2d { lock_token, outcome: C2dOutcome::Complete });
            return;
        }
        let packet_id = self.next_packet_id();
        self.out.publish(topic, Some(packet_id), redelivery, body);
        self.unacked_c2d.push((packet_id, lock_token));
    }

    /// A packet id not used by a delivery awaiting its PUBACK.
    fn next_packet_id(&mut self) -> NonZeroU16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if let Some(id) = NonZeroU16::new(self.next_packet_id)
                && !self.unacked_c2d.iter().any(|(used, _)| *used == id)
            {
                return id;
            }
        }
    }

    /// The device's PUBACK of a delivery: the message is complete. An unknown id (a duplicate
    /// PUBACK) is ignored.
    pub(super) fn c2d_acknowledged(&mut self, packet_id: NonZeroU16) {
        if let Some(at) = self.unacked_c2d.iter().position(|(id, _)| *id == packet_id) {
            let (_, lock_token) = self.unacked_c2d.swap_remove(at);
            self.actor.do_send(SettleC2d { lock_token, outcome: C2dOutcome::Complete });
        }
    }
}
