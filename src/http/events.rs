//! The hub's events log read over HTTPS: the built-in Event Hubs-compatible endpoint
//! (service-api §9) for clients without AMQP, and for `iothubd monitor-events`.
//!
//! - `GET /events/partitions`: what the Event Hubs management `READ` reports, camelCase.
//! - `GET /events/partitions/{p}?consumerGroup=&from=&max=&wait=`: one batch, as JSON lines.
//! - `GET /events/stream?consumerGroup=&from=&partitions=0,1`: every chosen partition merged into
//!   one JSON-lines response that stays open and carries new events as they are appended.
//! - `PUT`/`GET /events/checkpoints/{consumerGroup}/{p}`: `{"sequenceNumber":n}`, the last event
//!   the group processed; a read without `from` starts after it.
//!
//! Every call needs ServiceConnect, as the built-in endpoint does (service-api §1).
//!
//! `from` is `start`, `end` (only events appended later), `sequence:<n>`, `offset:<offset>`
//! (`-1` = start, `@latest` = end), or `time:<RFC 3339 | ms since the epoch>` (alias
//! `enqueuedTime:`); each names the first event returned (inclusive), like the `>=` forms of the
//! AMQP selector filters.
//!
//! Checkpoint writes go to the hub's actor (`SetCheckpoint`), like every write; reads go to the
//! store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use futures::Stream;
use iothubd_actors::directory::HubHandle;
use iothubd_actors::messages::SetCheckpoint;
use iothubd_actors::model::event::{AnnotationValue, EventPosition, StoredEvent};
use iothubd_actors::model::hub::AccessRights;
use iothubd_actors::model::iso_time;
use iothubd_actors::store::{Store, StoreError};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::AppState;
use super::error::{ApiError, ErrorCode, error_body};
use super::service::{ServiceCall, path_segment, query_param};

/// Most events read from the store at once, and most events in one batch answer: bounds the
/// memory a request holds whatever it asks for.
const PAGE: usize = 256;
/// Longest `wait` a batch read may ask for, in seconds.
const MAX_WAIT_SECS: u64 = 60;
/// How long an idle stream stays silent before it writes a blank line. Writing is how a server
/// notices that the client went away (a half-open TCP connection says nothing otherwise), and
/// each tick also checks whether the hub is stopping: graceful shutdown waits for open responses.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const NDJSON: &str = "application/x-ndjson";
const DEFAULT_CONSUMER_GROUP: &str = "$Default";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/events/partitions", web::get().to(list_partitions))
        .route("/events/partitions/{p}", web::get().to(read_partition))
        .route("/events/stream", web::get().to(stream))
        .route("/events/checkpoints/{cg}/{p}", web::get().to(get_checkpoint))
        .route("/events/checkpoints/{cg}/{p}", web::put().to(put_checkpoint));
}

/// Why an events call failed: any service-call error, or a partition or checkpoint that does not
/// exist — a 404 for which service-api §2 has no name, so it carries `ArgumentInvalid`.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    NotFound(String),
}

impl From<StoreError> for EventsError {
    fn from(e: StoreError) -> Self {
        Self::Api(e.into())
    }
}

impl ResponseError for EventsError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Api(e) => e.status_code(),
            Self::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Api(e) => e.error_response(),
            Self::NotFound(text) => {
                let code = ErrorCode::ArgumentInvalid;
                HttpResponse::NotFound().insert_header(("iothub-errorcode", code.name())).json(error_body(code, text))
            }
        }
    }
}

/// Where a read starts, as `from` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartAt {
    /// No `from`: after the consumer group's checkpoint, else the start.
    Checkpoint,
    Start,
    End,
    Sequence(i64),
    Time(DateTime<Utc>),
}

fn parse_from(text: Option<&str>) -> Result<StartAt, ApiError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(StartAt::Checkpoint);
    };
    let bad = || {
        ApiError::invalid(format!(
            "from '{text}' is not start, end, sequence:<n>, offset:<offset> or time:<RFC 3339 or ms since the epoch>"
        ))
    };
    let (kind, value) = text.split_once(':').unwrap_or((text, ""));
    let number = || value.trim().parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(bad);
    match kind.to_ascii_lowercase().as_str() {
        "start" if value.is_empty() => Ok(StartAt::Start),
        "end" if value.is_empty() => Ok(StartAt::End),
        "sequence" => number().map(StartAt::Sequence),
        "offset" => match value.trim() {
            "-1" => Ok(StartAt::Start),
            "@latest" => Ok(StartAt::End),
            // An offset is its event's sequence number in decimal (`EventPosition::offset`).
            _ => number().map(StartAt::Sequence),
        },
        "time" | "enqueuedtime" => match DateTime::parse_from_rfc3339(value.trim()) {
            Ok(t) => Ok(StartAt::Time(t.with_timezone(&Utc))),
            Err(_) => number().and_then(|ms| DateTime::from_timestamp_millis(ms).ok_or_else(bad)).map(StartAt::Time),
        },
        _ => Err(bad()),
    }
}

/// The sequence number a read of `partition` starts at.
async fn first_sequence(
    store: &dyn Store,
    hub: &str,
    group: &str,
    partition: u32,
    from: StartAt,
) -> Result<i64, StoreError> {
    Ok(match from {
        StartAt::Checkpoint => store.get_checkpoint(hub, group, partition).await?.map_or(0, |c| c.saturating_add(1)),
        // Sequence numbers start at 0 and reads return the first retained one at or after it.
        StartAt::Start => 0,
        StartAt::End => store.partition_info(hub, partition).await?.last_sequence_number.saturating_add(1).max(0),
        StartAt::Sequence(n) => n,
        StartAt::Time(t) => store.sequence_at(hub, partition, t).await?,
    })
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<ServiceCall, ApiError> {
    ServiceCall::authorize(req, state, AccessRights::SERVICE_CONNECT)
}

fn partition_count(hub: &HubHandle) -> u32 {
    hub.description().properties.event_hub_endpoints.events.partition_count
}

/// A partition ID from the path or the query: `0` … `partitionCount - 1`.
fn partition_id(hub: &HubHandle, text: &str) -> Result<u32, EventsError> {
    let count = partition_count(hub);
    text.trim().parse::<u32>().ok().filter(|p| *p < count).ok_or_else(|| {
        EventsError::NotFound(format!(
            "the events endpoint has no partition '{text}'; its partitions are 0-{}",
            count.saturating_sub(1)
        ))
    })
}

/// `$Default`, or a name of 1–50 letters, digits, `.`, `_`, `-`.
fn consumer_group(name: String) -> Result<String, ApiError> {
    let custom = (1..=50).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name == DEFAULT_CONSUMER_GROUP || custom {
        Ok(name)
    } else {
        Err(ApiError::invalid(format!(
            "consumer group '{name}' is neither $Default nor 1-50 letters, digits, '.', '_' or '-'"
        )))
    }
}

fn consumer_group_param(req: &HttpRequest) -> Result<String, ApiError> {
    consumer_group(query_param(req, "consumerGroup").unwrap_or_else(|| DEFAULT_CONSUMER_GROUP.to_owned()))
}

async fn list_partitions(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, EventsError> {
    let call = authorize(&req, &state)?;
    let count = partition_count(&call.hub);
    let mut partitions = Vec::with_capacity(count as usize);
    for p in 0..count {
        let info = state.deployment.store().partition_info(call.hub.name(), p).await?;
        let last = EventPosition {
            partition: p,
            sequence_number: info.last_sequence_number,
            enqueued_time: info.last_enqueued_time,
        };
        let last_offset = if info.last_sequence_number < 0 { "-1".to_owned() } else { last.offset() };
        partitions.push(json!({
            "partitionId": p.to_string(),
            "beginSequenceNumber": info.begin_sequence_number,
            "lastEnqueuedSequenceNumber": info.last_sequence_number,
            "lastEnqueuedOffset": last_offset,
            "lastEnqueuedTimeUtc": iso_time(info.last_enqueued_time),
            "isEmpty": info.is_empty,
        }));
    }
    Ok(HttpResponse::Ok().json(json!({
        "partitionCount": count,
        "partitionIds": (0..count).map(|p| p.to_string()).collect::<Vec<_>>(),
        "partitions": partitions,
    })))
}

/// One batch of up to `max` events (default and most: 256). With `wait` (seconds, ≤ 60) and
/// nothing to return yet, the answer waits that long for an append before it is empty.
async fn read_partition(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, EventsError> {
    let call = authorize(&req, &state)?;
    let partition = partition_id(&call.hub, &path_segment(&req, 2)?)?;
    let group = consumer_group_param(&req)?;
    let from = parse_from(query_param(&req, "from").as_deref())?;
    let max = match query_param(&req, "max") {
        None => PAGE,
        // Fewer events than `max` is an ordinary answer, so a larger `max` is served as the page.
        Some(m) => m
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|m| *m > 0)
            .map(|m| m.min(PAGE))
            .ok_or_else(|| ApiError::invalid(format!("max '{m}' is not a positive number of events")))?,
    };
    let wait = match query_param(&req, "wait") {
        None => 0,
        Some(w) => w.trim().parse::<u64>().ok().filter(|w| *w <= MAX_WAIT_SECS).ok_or_else(|| {
            ApiError::invalid(format!("wait '{w}' is not a number of seconds from 0 to {MAX_WAIT_SECS}"))
        })?,
    };
    // Subscribed before the first read: an append between that read and the wait still wakes it.
    let mut appended = call.hub.shared.watch_events();
    let store = state.deployment.store().as_ref();
    let hub = call.hub.name();
    let next = first_sequence(store, hub, &group, partition, from).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let events = loop {
        let events = store.read_events(hub, partition, next, max).await?;
        if !events.is_empty() || wait == 0 {
            break events;
        }
        match tokio::time::timeout_at(deadline, appended.changed()).await {
            Ok(Ok(())) => continue,
            // The wait is over, or the hub is gone (deleted): answer with nothing.
            Ok(Err(_)) | Err(_) => break events,
        }
    };
    Ok(HttpResponse::Ok().content_type(NDJSON).body(json_lines(&events)))
}

/// All chosen partitions (`partitions=0,2`; default all), merged, until the client leaves.
async fn stream(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, EventsError> {
    let call = authorize(&req, &state)?;
    let group = consumer_group_param(&req)?;
    let from = parse_from(query_param(&req, "from").as_deref())?;
    let mut partitions = match query_param(&req, "partitions").filter(|p| !p.trim().is_empty()) {
        None => (0..partition_count(&call.hub)).collect(),
        Some(list) => list.split(',').map(|p| partition_id(&call.hub, p)).collect::<Result<Vec<_>, _>>()?,
    };
    partitions.sort_unstable();
    partitions.dedup();
    // Subscribed before the start positions are resolved, so no append in between is missed.
    let appended = call.hub.shared.watch_events();
    let store = state.deployment.store().clone();
    let mut cursors = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let next = first_sequence(store.as_ref(), call.hub.name(), &group, partition, from).await?;
        cursors.push(Cursor { partition, next });
    }
    let feed = EventFeed {
        store,
        hub: call.hub.name().to_owned(),
        cursors,
        turn: 0,
        appended,
        accepting: state.ready.clone(),
    };
    Ok(HttpResponse::Ok()
        .content_type(NDJSON)
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(feed.into_stream()))
}

/// Where the stream stands in one partition: the next sequence number to send.
struct Cursor {
    partition: u32,
    next: i64,
}

/// The producer behind `/events/stream`: pages of at most [`PAGE`] events, one at a time, so
/// a slow client holds back the reads instead of filling memory.
struct EventFeed {
    store: Arc<dyn Store>,
    hub: String,
    cursors: Vec<Cursor>,
    /// The cursor to read first next time: partitions take turns, so a busy one cannot starve
    /// the others.
    turn: usize,
    appended: watch::Receiver<u64>,
    /// The server's readiness flag; cleared when the hub begins to shut down.
    accepting: Arc<AtomicBool>,
}

impl EventFeed {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, StoreError>> {
        futures::stream::unfold(Some(self), |feed| async move {
            let mut feed = feed?;
            match feed.next_chunk().await {
                Some(Ok(chunk)) => Some((Ok(chunk), Some(feed))),
                // A failed read aborts the response, so the client sees an error, not an end.
                Some(Err(e)) => {
                    tracing::warn!(hub = %feed.hub, error = %e, "events stream ended by a store error");
                    Some((Err(e), None))
                }
                None => None,
            }
        })
    }

    /// The next page of events, a keep-alive blank line, or `None` when the stream is over.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, StoreError>> {
        loop {
            if !self.accepting.load(Ordering::Acquire) {
                return None;
            }
            for _ in 0..self.cursors.len() {
                let count = self.cursors.len();
                let cursor = &mut self.cursors[self.turn];
                self.turn = (self.turn + 1) % count;
                let events = match self.store.read_events(&self.hub, cursor.partition, cursor.next, PAGE).await {
                    Ok(events) => events,
                    Err(e) => return Some(Err(e)),
                };
                if let Some(last) = events.last() {
                    cursor.next = last.position.sequence_number + 1;
                    return Some(Ok(json_lines(&events)));
                }
            }
            match tokio::time::timeout(KEEP_ALIVE, self.appended.changed()).await {
                Ok(Ok(())) => continue,
                // The hub was deleted: nothing more will come.
                Ok(Err(_)) => return None,
                Err(_) => return Some(Ok(Bytes::from_static(b"\n"))),
            }
        }
    }
}

/// One JSON object per event, each followed by a newline.
fn json_lines(events: &[StoredEvent]) -> Bytes {
    let mut out = Vec::new();
    for event in events {
        // Serializing a `Value` to memory cannot fail.
        if serde_json::to_writer(&mut out, &event_json(event)).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}

/// An event as a JSON line: position, body (text when it is UTF-8, always base64), the AMQP
/// properties that are set, application properties, and annotations (times as ISO 8601).
fn event_json(event: &StoredEvent) -> Value {
    let (position, data) = (&event.position, &event.data);
    let p = &data.properties;
    let mut properties = Map::new();
    for (name, value) in [
        ("messageId", &p.message_id),
        ("correlationId", &p.correlation_id),
        ("userId", &p.user_id),
        ("to", &p.to),
        ("contentType", &p.content_type),
        ("contentEncoding", &p.content_encoding),
    ] {
        if let Some(v) = value {
            properties.insert(name.into(), json!(v));
        }
    }
    if let Some(t) = p.absolute_expiry_time.and_then(DateTime::from_timestamp_millis) {
        properties.insert("absoluteExpiryTime".into(), json!(iso_time(t)));
    }
    let application: Map<String, Value> =
        data.application_properties.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let annotations: Map<String, Value> = data
        .annotations
        .iter()
        .map(|(k, v)| {
            let v = match v {
                AnnotationValue::String(s) => json!(s),
                AnnotationValue::Long(n) => json!(n),
                AnnotationValue::Timestamp(ms) => {
                    DateTime::from_timestamp_millis(*ms).map_or(json!(ms), |t| json!(iso_time(t)))
                }
            };
            (k.to_string(), v)
        })
        .collect();
    let mut line = json!({
        "partition": position.partition.to_string(),
        "sequenceNumber": position.sequence_number,
        "offset": position.offset(),
        "enqueuedTimeUtc": iso_time(position.enqueued_time),
        "bodyBase64": B64.encode(&data.body),
        "properties": properties,
        "applicationProperties": application,
        "annotations": annotations,
    });
    if let Ok(text) = std::str::from_utf8(&data.body) {
        line["body"] = json!(text);
    }
    line
}

/// `/events/checkpoints/{consumerGroup}/{p}` → the group and partition.
fn checkpoint_target(req: &HttpRequest, hub: &HubHandle) -> Result<(String, u32), EventsError> {
    let group = consumer_group(path_segment(req, 2)?)?;
    let partition = partition_id(hub, &path_segment(req, 3)?)?;
    Ok((group, partition))
}

async fn get_checkpoint(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, EventsError> {
    let call = authorize(&req, &state)?;
    let (group, partition) = checkpoint_target(&req, &call.hub)?;
    match state.deployment.store().get_checkpoint(call.hub.name(), &group, partition).await? {
        Some(n) => Ok(HttpResponse::Ok().json(json!({ "sequenceNumber": n }))),
        None => {
            Err(EventsError::NotFound(format!("consumer group '{group}' has no checkpoint in partition {partition}")))
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CheckpointBody {
    sequence_number: i64,
}

/// Stores the last sequence number the group processed; -1 = none (reads start at the start).
async fn put_checkpoint(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, EventsError> {
    let call = authorize(&req, &state)?;
    let (group, partition) = checkpoint_target(&req, &call.hub)?;
    let body: CheckpointBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(ErrorCode::IotHubFormatError, format!("the body is not {{\"sequenceNumber\":<n>}}: {e}"))
    })?;
    if body.sequence_number < -1 {
        return Err(ApiError::invalid("sequenceNumber must be -1 or more").into());
    }
    let set = SetCheckpoint { consumer_group: group, partition, sequence_number: body.sequence_number };
    call.hub
        .addr
        .send(set)
        .await
        .map_err(|_| ApiError::new(ErrorCode::ServiceUnavailable, "the hub is shutting down"))??;
    Ok(HttpResponse::NoContent().finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_names_every_position() {
        assert_eq!(parse_from(None).ok(), Some(StartAt::Checkpoint));
        assert_eq!(parse_from(Some("start")).ok(), Some(StartAt::Start));
        assert_eq!(parse_from(Some("END")).ok(), Some(StartAt::End));
        assert_eq!(parse_from(Some("sequence:42")).ok(), Some(StartAt::Sequence(42)));
        assert_eq!(parse_from(Some("offset:7")).ok(), Some(StartAt::Sequence(7)));
        assert_eq!(parse_from(Some("offset:-1")).ok(), Some(StartAt::Start));
        assert_eq!(parse_from(Some("offset:@latest")).ok(), Some(StartAt::End));
        let t = DateTime::from_timestamp_millis(1_654_109_018_176).map(StartAt::Time);
        assert_eq!(parse_from(Some("time:1654109018176")).ok(), t);
        assert_eq!(parse_from(Some("enqueuedTime:1654109018176")).ok(), t);
        assert_eq!(parse_from(Some("time:2022-06-01T18:43:38.176Z")).ok(), t);
    }

    #[test]
    fn from_refuses_what_it_cannot_read() {
        for bad in ["sequence:-2", "sequence:x", "offset:", "time:yesterday", "start:1", "latest"] {
            assert!(parse_from(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn consumer_group_names() {
        assert!(consumer_group("$Default".into()).is_ok());
        assert!(consumer_group("ops.team_1-a".into()).is_ok());
        assert!(consumer_group("a".repeat(50)).is_ok());
        for bad in ["", "$default2", "a/b", "spaced name"] {
            assert!(consumer_group(bad.into()).is_err(), "{bad}");
        }
        assert!(consumer_group("a".repeat(51)).is_err());
    }
}
