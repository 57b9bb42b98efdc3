//! The service side against a hub: its REST API (service-api §6, and the C2D send in the
//! README), through one `reqwest::Client` — a keep-alive pool to the hub's HTTPS endpoint, the
//! hub's host name resolved to it — with a policy token signed from the connection string
//! (the policy needs ServiceConnect: iothubowner or service).
//!
//! - A method call is `POST /twins/{id}/methods` with `connectTimeoutInSeconds` 0 (the device
//!   is online: the load addresses ready devices only); a success is a 200 whose `status` is
//!   the device's 200. Its latency is the request's round trip.
//! - A C2D send is `POST /devices/{id}/messages/deviceBound` with the [`Stamp`] as body and
//!   `iothub-messageid` `{run}-{seq}`; accepted with 204 once durable in the device's queue.
//!   A batch (`--c2d-batch`) is one `POST /messages/deviceBound` of such messages, accepted
//!   when the hub's 200 says every one is durable.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::StatusCode;
use reqwest::header::AUTHORIZATION;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{METHOD_TIMEOUT, Operation, Stamp};
use crate::auth::ServiceConnectionString;
use crate::simulate::fleet::Fleet;
use crate::simulate::https::{failure, unexpected};
use crate::simulate::stats::ErrorKind;

const API_VERSION: &str = "2021-04-12";
/// The method name the service invokes (the simulated devices answer any).
const METHOD: &str = "simulate";

/// The hub's REST API as the service load uses it.
pub struct Rest {
    client: reqwest::Client,
    /// `https://{host}:{port}`.
    base: String,
    token: String,
}

impl Rest {
    /// A client trusting `ca`, with `login.host_name` resolved to `https`, and a token valid for
    /// `lifetime`.
    pub fn new(
        ca: &Path,
        https: SocketAddr,
        login: &ServiceConnectionString,
        lifetime: Duration,
    ) -> anyhow::Result<Self> {
        let client = crate::client::builder_trusting(ca)?
            .resolve(&login.host_name, https)
            .timeout(METHOD_TIMEOUT + Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .context("the service's HTTPS client")?;
        Ok(Self {
            client,
            base: format!("https://{}:{}", login.host_name, https.port()),
            token: login.token(lifetime.as_secs())?,
        })
    }

    fn request(&self, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}?api-version={API_VERSION}", self.base);
        self.client.post(url).header(AUTHORIZATION, &self.token)
    }

    pub(super) fn call_method<'a>(&'a self, fleet: &'a Fleet, index: u32) -> Operation<'a, Duration> {
        Box::pin(async move {
            let body = json!({
                "methodName": METHOD,
                "payload": {},
                "responseTimeoutInSeconds": METHOD_TIMEOUT.as_secs(),
                "connectTimeoutInSeconds": 0,
            });
            let request = self.request(&format!("/twins/{}/methods", fleet.device_id(index))).json(&body);
            let sent = Instant::now();
            let response = request.send().await.map_err(failure)?;
            match response.status() {
                StatusCode::OK => {}
                StatusCode::GATEWAY_TIMEOUT => {
                    return Err((
                        ErrorKind::MethodTimeout,
                        format!("{} did not answer in time", fleet.device_id(index)),
                    ));
                }
                _ => return Err(unexpected("POST /twins/{id}/methods", response).await),
            }
            let answer: Value = response.json().await.map_err(failure)?;
            let latency = sent.elapsed();
            match answer["status"].as_u64() {
                Some(200) => Ok(latency),
                status => Err((ErrorKind::MethodFailed, format!("the device answered status {status:?}"))),
            }
        })
    }

    pub(super) fn send_c2d<'a>(&'a self, fleet: &'a Fleet, index: u32, stamp: Stamp) -> Operation<'a, ()> {
        Box::pin(async move {
            let path = format!("/devices/{}/messages/deviceBound", fleet.device_id(index));
            let request = self
                .request(&path)
                .header("iothub-messageid", format!("{}-{}", stamp.run, stamp.seq))
                .header("iothub-contenttype", "application/json")
                .body(stamp.body().to_vec());
            let response = request.send().await.map_err(failure)?;
            if response.status() != StatusCode::NO_CONTENT {
                return Err(unexpected("POST /devices/{id}/messages/deviceBound", response).await);
            }
            Ok(())
        })
    }

    pub(super) fn send_c2d_batch<'a>(&'a self, fleet: &'a Fleet, messages: Vec<(u32, Stamp)>) -> Operation<'a, ()> {
        Box::pin(async move {
            let body: Vec<Value> = messages
                .iter()
                .map(|(index, stamp)| {
                    json!({
                        "deviceId": fleet.device_id(*index),
                        "messageId": format!("{}-{}", stamp.run, stamp.seq),
                        "contentType": "application/json",
                        "body": String::from_utf8_lossy(&stamp.body()),
                    })
                })
                .collect();
            let response = self.request("/messages/deviceBound").json(&body).send().await.map_err(failure)?;
            if response.status() != StatusCode::OK {
                return Err(unexpected("POST /messages/deviceBound", response).await);
            }
            let answer: Value = response.json().await.map_err(failure)?;
            if answer["isSuccessful"] != true {
                let refused = answer["results"].as_array().into_iter().flatten().find(|r| r.get("errorCode").is_some());
                return Err((ErrorKind::HttpStatus, format!("the batch send refused a message: {refused:?}")));
            }
            Ok(())
        })
    }
}
