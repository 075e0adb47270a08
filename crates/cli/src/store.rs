//! The durable record's flags ([`DatabaseArgs`]) as a [`PgConfig`], connecting and migrating, and
//! `ferry migrate`.

use std::time::Duration;

use ferry_store::{PgConfig, PgStore, StoreError};

use crate::CliError;
use crate::args::DatabaseArgs;

/// Validated database settings: the store's configuration and whether to migrate at start.
#[derive(Debug, Clone)]
pub struct ResolvedDatabase {
    pub pg: PgConfig,
    pub migrate: bool,
}

/// `None` when no `--database-url` is given. Connects to nothing.
pub fn resolve(a: DatabaseArgs) -> Result<Option<ResolvedDatabase>, CliError> {
    let Some(url) = a.database_url.map(|u| u.trim().to_owned()) else {
        if a.migrate {
            return Err(CliError::usage("--migrate", "needs --database-url"));
        }
        if a.database_read_url.is_some() {
            return Err(CliError::usage(
                "--database-read-url",
                "needs --database-url (the primary, where the record is written)",
            ));
        }
        return Ok(None);
    };
    check_url("--database-url", &url)?;
    let read_url = a.database_read_url.map(|u| u.trim().to_owned());
    if let Some(r) = &read_url {
        check_url("--database-read-url", r)?;
    }
    if a.database_pool_size == 0 {
        return Err(CliError::usage(
            "--database-pool-size",
            "must be at least 1",
        ));
    }
    for (flag, v) in [
        ("--database-timeout-ms", a.database_timeout_ms),
        (
            "--database-statement-timeout-ms",
            a.database_statement_timeout_ms,
        ),
    ] {
        if v == 0 {
            return Err(CliError::usage(flag, "must be greater than zero"));
        }
    }
    ferry_store::tls::sslmode_of(&url).map_err(|e| CliError::usage("--database-url", e))?;
    if let Some(r) = &read_url {
        ferry_store::tls::sslmode_of(r).map_err(|e| CliError::usage("--database-read-url", e))?;
    }
    if let Some(ca) = &a.database_ca_file {
        std::fs::metadata(ca).map_err(|e| {
            CliError::usage(
                "--database-ca-file",
                format!("cannot read {}: {e}", ca.display()),
            )
        })?;
    }
    let mut pg = PgConfig::new(url);
    pg.ca_file = a.database_ca_file;
    pg.pool_size = a.database_pool_size;
    pg.connect_timeout = Duration::from_millis(a.database_timeout_ms);
    pg.wait_timeout = Duration::from_millis(a.database_timeout_ms);
    pg.statement_timeout = Duration::from_millis(a.database_statement_timeout_ms);
    pg.statement_cache = !a.database_no_statement_cache;
    pg.read_url = read_url;
    Ok(Some(ResolvedDatabase {
        pg,
        migrate: a.migrate,
    }))
}

/// A `postgres://` (or `postgresql://`) URL with something after the scheme.
fn check_url(flag: &'static str, url: &str) -> Result<(), CliError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(CliError::usage(
            flag,
            "expected postgres://user@host:port/db",
        ));
    };
    if !matches!(scheme, "postgres" | "postgresql") || rest.is_empty() {
        return Err(CliError::usage(
            flag,
            format!("expected a postgres:// URL, got a {scheme}:// one"),
        ));
    }
    Ok(())
}

fn store_err(e: StoreError) -> CliError {
    match e {
        StoreError::Unavailable(m) => {
            CliError::Unavailable(format!("cannot reach PostgreSQL: {m}"))
        }
        StoreError::Internal(m) => CliError::Internal(format!("PostgreSQL: {m}")),
    }
}

/// Build the pool, check the database answers, and migrate when asked.
pub async fn connect(db: &ResolvedDatabase) -> Result<PgStore, CliError> {
    use ferry_store::Store;
    let store = PgStore::connect(db.pg.clone()).map_err(store_err)?;
    store.ping().await.map_err(store_err)?;
    if db.migrate {
        migrate(&store).await?;
    }
    Ok(store)
}

async fn migrate(store: &PgStore) -> Result<(), CliError> {
    let applied = store.migrate().await.map_err(store_err)?;
    if applied.is_empty() {
        tracing::info!("database schema is up to date");
    } else {
        tracing::info!(migrations = ?applied, "database schema migrated");
    }
    Ok(())
}

/// `ferry migrate`.
pub async fn run_migrate(db: ResolvedDatabase) -> Result<(), CliError> {
    let store = PgStore::connect(db.pg.clone()).map_err(store_err)?;
    let applied = store.migrate().await.map_err(store_err)?;
    if applied.is_empty() {
        println!("ferry migrate: schema already up to date");
    } else {
        println!("ferry migrate: applied {}", applied.join(", "));
    }
    Ok(())
}

/// `ferry migrate`'s flags: the URL is required there.
pub fn resolve_migrate(a: DatabaseArgs) -> Result<ResolvedDatabase, CliError> {
    resolve(a)?.ok_or_else(|| CliError::usage("--database-url", "is required"))
}
