//! Integration tests: the real server on an ephemeral port with a temp data
//! dir, driven by the generated gRPC client. One test binary, so the crate
//! is linked once.

mod common;

mod admission;
mod append;
pub mod auth;
mod bad_input;
mod browser;
pub mod cluster;
mod consumers;
pub mod durability;
mod groups;
mod http;
mod invariants;
mod limits;
mod listen;
pub mod operability;
mod pipeline;
pub mod process;
mod retention;
mod selection;
mod streams;
mod subscribe;
mod tls;
mod wire;
