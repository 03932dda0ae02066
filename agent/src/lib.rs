//! The akosha edge agent: takes records from local sources, keeps them in a durable buffer and streams them to
//! one or more aggregators over QUIC with mutual TLS, deleting them only once the aggregator has acknowledged
//! that they are durable.

pub mod buffer;
