//! Read-only SQLite connections, used on tokio's blocking threads.
//!
//! SQLite calls block, so they never run on an async executor thread. In WAL mode readers see
//! the last committed state and neither wait for the writer nor make it wait; a few connections
//! let reads proceed in parallel with each other.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use iothubd_actors::store::StoreError;
use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::schema::open_reader;
use super::writer::closed;

pub(super) struct Readers {
    idle: Mutex<Vec<Connection>>,
    /// One permit per idle connection: holding one guarantees `idle` is not empty.
    permits: Arc<Semaphore>,
}

impl Readers {
    pub(super) fn open(path: &Path, count: usize) -> anyhow::Result<Arc<Self>> {
        let idle = (0..count).map(|_| open_reader(path)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Arc::new(Self { idle: Mutex::new(idle), permits: Arc::new(Semaphore::new(count)) }))
    }

    /// Runs `query` on an idle connection, waiting for one when all are busy.
    pub(super) async fn read<T, F>(self: &Arc<Self>, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| closed())?;
        let readers = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            // The permit travels with the connection, so a caller that stops waiting cannot
            // hand the connection's slot to someone else while it is still in use.
            let _permit = permit;
            let conn = readers.take().ok_or_else(closed)?;
            let result = query(&conn);
            let mut idle = readers.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if !readers.permits.is_closed() {
                idle.push(conn);
            }
            result
        });
        task.await.map_err(|e| StoreError::Unavailable(format!("read failed: {e}")))?
    }

    /// Refuses further reads and closes the idle connections.
    pub(super) fn close(&self) {
        self.permits.close();
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn take(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }
}
