//! WebSockets on the HTTPS port: `/$iothub/websocket` with subprotocol `mqtt` carries an MQTT
//! session (device-protocol §2.1); the AMQP issue adds `AMQPWSB10` on the same path, so the
//! handler dispatches on the subprotocol.
//!
//! The MQTT bytes are bridged to the hub's internal loopback MQTT listener, so a WebSocket
//! session runs the very same session code as a TLS connection on 8883 — one protocol
//! implementation, several transports (DESIGN.md §1). TLS ends here, at the HTTPS listener.

use std::net::SocketAddr;

use actix_web::http::header::{HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::Message;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::AppState;
use super::error::{ApiError, ErrorCode};

/// Largest WebSocket frame accepted: an MQTT packet of the largest message, and some.
const MAX_FRAME: usize = 512 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/$iothub/websocket", web::get().to(upgrade));
}

/// The subprotocol a client asked for that this hub speaks (C sends `MQTT`: case-insensitive).
fn chosen_protocol(req: &HttpRequest) -> Option<&'static str> {
    let offered = req.headers().get_all(SEC_WEBSOCKET_PROTOCOL).filter_map(|v| v.to_str().ok());
    let mut names = offered.flat_map(|v| v.split(',')).map(str::trim);
    names.find(|n| n.eq_ignore_ascii_case("mqtt")).map(|_| "mqtt")
}

async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let Some(protocol) = chosen_protocol(&req) else {
        return Err(ApiError::new(
            ErrorCode::ArgumentInvalid,
            "this path needs Sec-WebSocket-Protocol: mqtt (AMQPWSB10 arrives with the AMQP endpoint)",
        )
        .into());
    };
    let bridge = state.mqtt_bridge;
    let (mut response, session, stream) = actix_ws::handle(&req, body)?;
    response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
    actix_rt::spawn(bridge_mqtt(bridge, session, stream.max_frame_size(MAX_FRAME)));
    Ok(response)
}

/// Copies WebSocket binary frames to the MQTT listener and its bytes back as binary frames,
/// until either side closes.
async fn bridge_mqtt(to: SocketAddr, mut session: actix_ws::Session, mut frames: actix_ws::MessageStream) {
    let Ok(socket) = tokio::net::TcpStream::connect(to).await else {
        let _ = session.close(None).await;
        return;
    };
    let _ = socket.set_nodelay(true);
    let (mut from_mqtt, mut to_mqtt) = socket.into_split();
    let mut outbound = session.clone();
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_mqtt.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if outbound.binary(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = outbound.close(None).await;
    };
    let upstream = async move {
        while let Some(Ok(frame)) = frames.next().await {
            match frame {
                Message::Binary(bytes) => {
                    if to_mqtt.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Message::Ping(p) => {
                    if session.pong(&p).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                // MQTT travels in binary frames only (device-protocol §2.1).
                Message::Text(_) | Message::Continuation(_) | Message::Pong(_) | Message::Nop => {}
            }
        }
        let _ = to_mqtt.shutdown().await;
    };
    futures::future::join(downstream, upstream).await;
}
