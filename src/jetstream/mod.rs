//! Cluster mode on NATS JetStream (issue 19): the pieces built so far.
//!
//! The design is in ARCHITECTURE.md ("Cluster mode on JetStream"): a
//! second engine behind the seam in `engine/`, with events in one
//! JetStream stream per Pullstream stream and every other record in one
//! replicated record stream. What exists today is that record store
//! ([`state`]); the engine, `serve --engine jetstream` and the gateways
//! are not built yet, and nothing in the server uses this module.

pub mod state;

pub use state::{Expect, Record, StateError, StateStore};
