//! The PostgreSQL store (being written).

/// Placeholder until the PostgreSQL store lands.
#[derive(Debug, Default)]
pub struct PgStore;

/// Placeholder until the PostgreSQL store lands.
#[derive(Debug, Default)]
pub struct PgConfig;
