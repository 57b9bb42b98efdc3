//! The backend under test: a temporary data directory, and for PostgreSQL a schema of its own.

use std::sync::Arc;

use figment::Figment;
use figment::providers::{Format, Toml};
use iothubd::config::{Config, DEFAULT_TOML, StoreBackend, StoreConfig};
use iothubd::store::embedded::DATABASE_FILE;
use iothubd_actors::store::Store;
use tempfile::TempDir;
use tokio_postgres::NoTls;

pub(crate) const POSTGRES_URL_VAR: &str = "IOTHUBD_TEST_POSTGRES_URL";

/// A backend under test, in a corner of its own: a temporary data directory, and for
/// PostgreSQL a fresh schema that `finish` drops.
pub(crate) struct Backend {
    config: Config,
    _data_dir: TempDir,
    /// The server URL (without the test's `search_path`) and the test's schema.
    postgres: Option<(String, String)>,
}

impl Backend {
    pub(crate) async fn embedded() -> Option<Self> {
        Some(Self::embedded_with(|_| {}))
    }

    pub(crate) fn embedded_with(tune: impl FnOnce(&mut StoreConfig)) -> Self {
        let (mut config, data_dir) = base_config();
        config.store.backend = StoreBackend::Embedded;
        tune(&mut config.store);
        Self { config, _data_dir: data_dir, postgres: None }
    }

    /// `None` when `IOTHUBD_TEST_POSTGRES_URL` is unset; panics when it is set but unusable.
    pub(crate) async fn postgres() -> Option<Self> {
        let Ok(url) = std::env::var(POSTGRES_URL_VAR) else {
            println!("{POSTGRES_URL_VAR} is not set: the PostgreSQL store was not tested");
            return None;
        };
        let schema = format!("iothubd_test_{}", uuid::Uuid::new_v4().simple());
        connect(&url)
            .await
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR}: cannot create schema {schema}: {e:?}"));
        let (mut config, data_dir) = base_config();
        config.store.backend = StoreBackend::Postgres;
        let separator = if url.contains('?') { '&' } else { '?' };
        config.store.postgres_url = format!("{url}{separator}options=-c%20search_path%3D{schema}");
        config.store.pool_size = 8;
        Some(Self { config, _data_dir: data_dir, postgres: Some((url, schema)) })
    }

    /// Opens the store through `iothubd::store::open`, as the server does.
    pub(crate) async fn open(&self) -> Arc<dyn Store> {
        let store = iothubd::store::open(&self.config)
            .await
            .unwrap_or_else(|e| panic!("opening the {:?} store: {e:#}", self.config.store.backend));
        let expected = match self.config.store.backend {
            StoreBackend::Embedded => "embedded",
            StoreBackend::Postgres => "postgres",
        };
        assert_eq!(store.backend(), expected);
        store
    }

    /// Where the embedded store keeps its files.
    pub(crate) fn data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// Overwrites a device's stored document with something that is not an `Identity`.
    pub(crate) async fn corrupt_identity(&self, hub: &str, device_id: &str) {
        let set = "UPDATE identities SET doc = '{\"key\": 1}'";
        match self.config.store.backend {
            StoreBackend::Embedded => {
                let db = rusqlite::Connection::open(self.config.data_dir.join(DATABASE_FILE)).expect("open the file");
                db.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
                let sql = format!("{set} WHERE hub = ?1 AND device_id = ?2 AND module_id = ''");
                assert_eq!(db.execute(&sql, [hub, device_id]).expect("corrupt the row"), 1);
            }
            StoreBackend::Postgres => {
                let db = connect(&self.config.store.postgres_url).await;
                let sql = format!("{set} WHERE hub = $1 AND device_id = $2 AND module_id = ''");
                assert_eq!(db.execute(&sql, &[&hub, &device_id]).await.expect("corrupt the row"), 1);
            }
        }
    }

    pub(crate) async fn finish(self) {
        if let Some((url, schema)) = &self.postgres {
            connect(url)
                .await
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap_or_else(|e| panic!("dropping schema {schema}: {e:?}"));
        }
    }
}

/// The compiled-in defaults with a fresh temporary data directory (no `IOTHUBD_*` overrides:
/// the test's own variables must not reach the configuration).
pub(crate) fn base_config() -> (Config, TempDir) {
    let data_dir = tempfile::tempdir().expect("a temporary directory");
    let mut config: Config = Figment::from(Toml::string(DEFAULT_TOML)).extract().expect("the default configuration");
    config.data_dir = data_dir.path().to_owned();
    (config, data_dir)
}

pub(crate) async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR} is set, but PostgreSQL cannot be reached with it: {e:?}"));
    tokio::spawn(connection);
    client
}
