//! The generated gRPC contract (`proto/pullstream/v1/pullstream.proto`).
//!
//! Only the API layer (`api`), the server, the client and the CLI use these types; storage and
//! the log keep their own representation so the wire contract can evolve
//! without touching the on-disk format. Beside the generated code: the
//! hand-written responses that carry events (`wire`), the encoder that
//! fills them from stored records (`encode`), and the codec (`codec`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("pullstream.v1");

pub mod codec;
pub mod encode;
pub mod json;
pub mod wire;
pub use wire::{ReadResponse, SubscribeResponse};

/// The encoded `FileDescriptorSet` of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pullstream_descriptor.bin"));
