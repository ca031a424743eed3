//! The generated gRPC contract (`proto/pullstream/v1/pullstream.proto`).
//!
//! Only the API layer (`api`), the server, the client and the CLI use these types; storage and
//! the log keep their own representation so the wire contract can evolve
//! without touching the on-disk format. Beside the generated code: the
//! hand-written responses that carry events (`wire`) and the appended
//! event (`new_event`), the encoder that
//! fills them from stored records (`encode`), and the codec (`codec`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("pullstream.v1");

pub mod codec;
pub mod encode;
pub mod json;
pub mod new_event;
pub mod wire;
pub use new_event::{NewEvent, Text};
pub use wire::{ReadResponse, SubscribeResponse};

/// The encoded `FileDescriptorSet` of the proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pullstream_descriptor.bin"));

/// A status code's name as gRPC and the proto's comments spell it
/// (`NOT_FOUND`), for messages, JSON errors and scripts.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
