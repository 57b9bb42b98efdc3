//! The HTTPS listener (src/http/listener.rs) through real connections: the C2D receive's header
//! names byte for byte on the wire (device-protocol §3: the C SDK matches `ContentType`,
//! `ContentEncoding` and `iothub-app-{name}` case-sensitively), the same on the plain HTTP
//! listener, and a graceful stop finishing a request in flight. Raw TLS and TCP clients read
//! the responses as sent, where HTTP client libraries would normalize them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestHub, start, unix_now};
use iothubd::auth::sas;
use iothubd::server;
use iothubd_actors::model::identity::{IdentityKey, generate_key};
use reqwest::Method;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

async fn device_key(hub: &TestHub, id: &str) -> String {
    let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({})).send().await.unwrap();
    r.json::<Value>().await.unwrap()["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned()
}

/// A TLS connection to the hub's HTTPS port, trusting its dev CA.
async fn connect(hub: &TestHub) -> TlsStream<TcpStream> {
    let ca = hub.dir.path().join("tls").join("ca.pem");
    let config = iothubd::client::tls_config_trusting(&ca).unwrap();
    let tcp = TcpStream::connect(hub.server.info.https).await.unwrap();
    let name = ServerName::try_from(hub.host.clone()).unwrap();
    TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap()
}

/// One response as raw bytes: the head up to its empty line, then `content-length` bytes.
async fn response<S: AsyncRead + Unpin>(io: &mut S) -> (String, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside a head: {}", String::from_utf8_lossy(&bytes));
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(bytes[..head_end].to_vec()).unwrap();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length: ")).map_or(0, |n| n.trim().parse().unwrap());
    while bytes.len() < head_end + length {
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside a body");
        bytes.extend_from_slice(&chunk[..n]);
    }
    (head, bytes[head_end..].to_vec())
}

/// A REST send with a content type, a content encoding and the property `Color`.
fn send_request(hub: &TestHub, id: &str, body: &str) -> String {
    format!(
        "POST /devices/{id}/messages/deviceBound?{} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n\
         iothub-contenttype: application/json\r\niothub-contentencoding: utf-8\r\niothub-app-Color: red\r\n\
         Content-Length: {}\r\n\r\n{body}",
        common::API,
        hub.host,
        hub.owner_token(),
        body.len()
    )
}

fn receive_request(hub: &TestHub, id: &str, key: &str) -> String {
    let token = sas::sign(&format!("{}/devices/{id}", hub.host), key, unix_now() + 600, None).unwrap();
    format!(
        "GET /devices/{id}/messages/deviceBound?api-version=2020-09-30 HTTP/1.1\r\nHost: {}\r\n\
         Authorization: {token}\r\n\r\n",
        hub.host
    )
}

fn header_lines(head: &str) -> Vec<&str> {
    head.lines().skip(1).filter(|l| !l.is_empty()).collect()
}

#[tokio::test]
async fn the_c_sdk_reads_content_type_encoding_and_properties_in_their_exact_case() {
    let hub = start();
    let key = device_key(&hub, "hc1").await;
    let mut tls = connect(&hub).await;

    // A REST send spelled as a C programmer would, on the same keep-alive connection.
    let body = r#"{"on":true}"#;
    tls.write_all(send_request(&hub, "hc1", body).as_bytes()).await.unwrap();
    let (head, _) = response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");

    tls.write_all(receive_request(&hub, "hc1", &key).as_bytes()).await.unwrap();
    let (head, received) = response(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines = header_lines(&head);
    assert!(lines.contains(&"ContentType: application/json"), "{head}");
    assert!(lines.contains(&"ContentEncoding: utf-8"), "{head}");
    // Request header names reach the hub lower-cased (actix-http), so the REST-sent property
    // is `color`; its response name keeps the lower-case prefix the C SDK looks for.
    assert!(lines.contains(&"iothub-app-color: red"), "{head}");
    assert!(lines.iter().any(|l| l.starts_with("iothub-sequencenumber: ")), "{head}");
    assert!(!head.contains("x-verbatim"), "no marker leaves the process: {head}");
    assert_eq!(received, body.as_bytes());

    // A property whose name has upper case, sent through the batch send (JSON keeps the
    // case), arrives with that name.
    let batch = json!([{
        "deviceId": "hc1",
        "contentType": "text/plain",
        "properties": {"Color": "blue", "size": "L"},
        "body": "x-verbatim-\r\nContentType: body",
    }]);
    let sent = hub.owner(Method::POST, "/messages/deviceBound").json(&batch).send().await.unwrap();
    assert_eq!(sent.status(), 200);
    assert_eq!(sent.json::<Value>().await.unwrap()["isSuccessful"], true);
    // The first message is still locked: this receive gets the second.
    tls.write_all(receive_request(&hub, "hc1", &key).as_bytes()).await.unwrap();
    let (head, received) = response(&mut tls).await;
    let lines = header_lines(&head);
    assert!(lines.contains(&"ContentType: text/plain"), "{head}");
    assert!(lines.contains(&"iothub-app-Color: blue"), "{head}");
    assert!(lines.contains(&"iothub-app-size: L"), "{head}");
    assert_eq!(received, b"x-verbatim-\r\nContentType: body", "bodies pass unchanged");
}

#[tokio::test]
async fn the_plain_http_listener_writes_the_same_names() {
    let dir = tempfile::tempdir().unwrap();
    let name = common::unique_hub_name();
    let (owner_key, read_key) = (generate_key(), generate_key());
    let mut cfg = common::test_config(dir.path(), &name, &owner_key, &read_key, false);
    cfg.ports.http_plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = server::start(cfg).unwrap();
    let host = format!("{name}.azure-devices.net");
    let client = common::client_for(dir.path(), &host, server.info.https);
    let hub = TestHub { server, dir, name, host, owner_key, registry_read_key: read_key, client };
    let key = device_key(&hub, "hc2").await;

    let plain = hub.server.info.http_plain.expect("plain HTTP is on");
    let mut tcp = TcpStream::connect(plain).await.unwrap();
    tcp.write_all(send_request(&hub, "hc2", "hi").as_bytes()).await.unwrap();
    let (head, _) = response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    tcp.write_all(receive_request(&hub, "hc2", &key).as_bytes()).await.unwrap();
    let (head, body) = response(&mut tcp).await;
    let lines = header_lines(&head);
    assert!(lines.contains(&"ContentType: application/json"), "{head}");
    assert!(lines.contains(&"ContentEncoding: utf-8"), "{head}");
    assert_eq!(body, b"hi");
}

#[tokio::test]
async fn a_request_in_flight_finishes_when_the_hub_stops() {
    let hub = start();
    let r = hub.owner(Method::PUT, "/devices/asleep").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // An offline device: the call waits out its connect timeout, then answers 404.
    let call = hub
        .owner(Method::POST, "/twins/asleep/methods")
        .json(&json!({ "methodName": "m", "connectTimeoutInSeconds": 2, "responseTimeoutInSeconds": 5 }))
        .send();
    let call = tokio::spawn(call);
    // In flight once the handler has woken the device's actor.
    let shared = hub.server.deployment().directory().resolve(&hub.host).unwrap().shared;
    let key = IdentityKey::device("asleep");
    assert!(shared.live_device(&key).is_none(), "the actor is not live before the call");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shared.live_device(&key).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the call reaches the hub");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server = hub.server;
    let stopped = tokio::task::spawn_blocking(move || server.shutdown());
    let answer = call.await.unwrap().expect("the in-flight call is answered, not cut");
    assert_eq!(answer.status(), 404);
    assert_eq!(answer.headers()["iothub-errorcode"], "DeviceNotOnline");
    stopped.await.unwrap().unwrap();
}
