//! Sources: the ways records reach the agent besides the generic NDJSON endpoint.

pub mod file_tail;
/// Session-Buddy's HTTP push mapping lives with the other Session-Buddy readers (the aggregator's MCP tools use it
/// too).
pub use akosha_session_buddy::push as session_buddy_push;
pub mod session_buddy_snapshot;
