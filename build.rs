//! Compiles `proto/` into Rust with protox (a pure-Rust protobuf compiler),
//! so building needs no system `protoc`. The descriptor set is also written
//! to `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["pullstream/v1/pullstream.proto"], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("pullstream_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL (src/proto/codec.rs).
        .codec_path("crate::proto::codec::StrictCodec")
        // Event payloads are shared between the tail cache and every
        // subscriber's response: `Bytes` makes those clones reference counts.
        .bytes(".pullstream.v1.Event.data")
        // The appended event is hand-written (src/proto/new_event.rs): its
        // payload and its text fields are decoded as slices of the
        // request's buffer and stored as they are, with no copy and no
        // allocation per event.
        .extern_path(
            ".pullstream.v1.NewEvent",
            "crate::proto::new_event::NewEvent",
        )
        .bytes(".pullstream.v1.PayloadVersion.data")
        // Hand-written so the server can send pre-encoded events (src/proto/wire.rs).
        .extern_path(
            ".pullstream.v1.SubscribeResponse",
            "crate::proto::wire::SubscribeResponse",
        )
        .extern_path(
            ".pullstream.v1.ReadResponse",
            "crate::proto::wire::ReadResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}
