//! Cluster mode on NATS JetStream (issue 19): the pieces built so far.
//!
//! The design is in ARCHITECTURE.md ("Cluster mode on JetStream"): a
//! second engine behind the seam in `engine/`, with events in one
//! JetStream stream per Pullstream stream and every other record in one
//! replicated record stream. Built so far: the record store ([`state`])
//! and the engine for one gateway per cluster ([`engine`], chosen by
//! `serve --engine jetstream`); several gateways on one cluster are the
//! next slices (ARCHITECTURE.md lists them and today's gaps).

pub mod engine;
pub mod state;

pub use engine::{JetStreamEngine, JetStreamOptions};
pub use state::{Expect, Record, StateError, StateStore};
