//! The domain model: hubs, identities, twins, events-log messages, and the time format every
//! JSON shape uses.

pub mod c2d;
pub mod event;
pub mod hub;
pub mod identity;
pub mod twin;

use chrono::{DateTime, SecondsFormat, Utc};

/// Azure's "never": `0001-01-01T00:00:00Z` (service-api §0).
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// ISO 8601 UTC with 7 fraction digits, as the .NET-based hub writes times.
pub fn iso_time(t: DateTime<Utc>) -> String {
    let base = t.to_rfc3339_opts(SecondsFormat::Secs, true);
    format!("{}.{:07}Z", &base[..base.len() - 1], t.timestamp_subsec_nanos() / 100)
}
