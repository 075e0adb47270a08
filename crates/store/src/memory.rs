//! The in-memory store (being written).

/// Placeholder until the memory store lands.
#[derive(Debug, Default)]
pub struct MemoryStore;
