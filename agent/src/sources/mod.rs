//! Sources: the ways records reach the agent besides the generic NDJSON endpoint.

pub mod file_tail;
pub mod session_buddy_push;
pub mod session_buddy_snapshot;
