//! The hub's feedback queue as the service reads it (service-api §8; device-protocol §5.1).
//!
//! Device actors append feedback records in the same durable write that removes the message
//! they are about (`Store::c2d_remove`). The service takes them in batches of at most 64,
//! each batch under a lock token for the hub's `feedback.lockDurationAsIso8601`: completing
//! the batch deletes its records, abandoning it (or letting the lock lapse) makes them
//! receivable again. Locks live in memory — after a restart every record is receivable again,
//! which is at-least-once, as on Azure. Records older than `feedback.ttlAsIso8601` are dropped
//! when met, and a record abandoned `feedback.maxDeliveryCount` times is dropped too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::Utc;

use crate::directory::HubShared;
use crate::model::c2d::FeedbackRecord;
use crate::store::StoreError;

/// Most records in one batch (Azure batches at 64 records).
pub const BATCH_MAX: usize = 64;

/// A batch the service received: complete or abandon it with `lock_token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackBatch {
    pub lock_token: String,
    pub records: Vec<FeedbackRecord>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FeedbackError {
    /// The lock token is unknown or its lock expired.
    #[error("the feedback lock token is unknown or its lock expired")]
    LockLost,
    #[error("{0}")]
    Store(#[from] StoreError),
}

struct Lock {
    token: String,
    ids: Vec<u64>,
    until: Instant,
}

/// The locks held on a hub's feedback records, and how often each record was abandoned.
#[derive(Default)]
pub struct FeedbackLocks {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    locks: Vec<Lock>,
    abandoned: HashMap<u64, u32>,
}

impl State {
    fn drop_lapsed(&mut self, now: Instant) {
        self.locks.retain(|l| l.until > now);
    }

    fn locked(&self) -> impl Iterator<Item = u64> + '_ {
        self.locks.iter().flat_map(|l| l.ids.iter().copied())
    }
}

impl FeedbackLocks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The hub's oldest unlocked feedback records (at most [`BATCH_MAX`]), locked under a new
/// token; `None` when there are none.
pub async fn receive(hub: &HubShared) -> Result<Option<FeedbackBatch>, StoreError> {
    let settings = hub.description().properties.cloud_to_device.feedback.clone();
    let locks = hub.feedback();
    let held = {
        let mut state = locks.state();
        state.drop_lapsed(Instant::now());
        state.locked().count()
    };
    let candidates = hub.store().feedback_batch(hub.name(), BATCH_MAX + held).await?;
    let oldest_kept = Utc::now() - chrono::Duration::from_std(settings.ttl()).unwrap_or(chrono::Duration::hours(1));
    let (expired, live): (Vec<_>, Vec<_>) =
        candidates.into_iter().partition(|(_, record)| record.enqueued_time_utc < oldest_kept);
    if !expired.is_empty() {
        let ids: Vec<u64> = expired.iter().map(|(id, _)| *id).collect();
        hub.store().feedback_remove(hub.name(), &ids).await?;
    }
    let mut state = locks.state();
    state.drop_lapsed(Instant::now());
    let locked: std::collections::HashSet<u64> = state.locked().collect();
    let (ids, records): (Vec<u64>, Vec<FeedbackRecord>) =
        live.into_iter().filter(|(id, _)| !locked.contains(id)).take(BATCH_MAX).unzip();
    if ids.is_empty() {
        return Ok(None);
    }
    let lock_token = uuid::Uuid::new_v4().to_string();
    state.locks.push(Lock { token: lock_token.clone(), ids, until: Instant::now() + settings.lock_duration() });
    Ok(Some(FeedbackBatch { lock_token, records }))
}

/// Completes a batch: its records are deleted.
pub async fn complete(hub: &HubShared, lock_token: &str) -> Result<(), FeedbackError> {
    let ids = take_lock(hub, lock_token)?;
    hub.store().feedback_remove(hub.name(), &ids).await?;
    let mut state = hub.feedback().state();
    for id in &ids {
        state.abandoned.remove(id);
    }
    Ok(())
}

/// Abandons a batch: its records become receivable again, except those abandoned
/// `maxDeliveryCount` times, which are dropped.
pub async fn abandon(hub: &HubShared, lock_token: &str) -> Result<(), FeedbackError> {
    let ids = take_lock(hub, lock_token)?;
    let max = hub.description().properties.cloud_to_device.feedback.max_delivery_count;
    let exhausted: Vec<u64> = {
        let mut state = hub.feedback().state();
        ids.iter()
            .copied()
            .filter(|id| {
                let count = state.abandoned.entry(*id).or_default();
                *count += 1;
                *count >= max
            })
            .collect()
    };
    if !exhausted.is_empty() {
        hub.store().feedback_remove(hub.name(), &exhausted).await?;
        let mut state = hub.feedback().state();
        for id in &exhausted {
            state.abandoned.remove(id);
        }
    }
    Ok(())
}

fn take_lock(hub: &HubShared, lock_token: &str) -> Result<Vec<u64>, FeedbackError> {
    let mut state = hub.feedback().state();
    state.drop_lapsed(Instant::now());
    let index = state.locks.iter().position(|l| l.token == lock_token).ok_or(FeedbackError::LockLost)?;
    Ok(state.locks.swap_remove(index).ids)
}
