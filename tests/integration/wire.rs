//! The hand-written wire side agrees with the proto (issue 15): the server
//! sends `ReadResponse` and `SubscribeResponse` through hand-written
//! encoders (`src/proto/wire.rs`) with events it encodes itself, so nothing
//! in the compiler ties them to `pullstream.proto`. These tests read the
//! raw bytes the server sends and check them against the proto's own
//! descriptor: every field has a number the message declares and the wire
//! type its declared type needs, and every declared field is sent (so a
//! field added to the proto but never encoded fails here).

use std::collections::BTreeSet;
use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use pullstream::proto::{self as pb, subscribe_request::Start};
use tonic::codec::{Codec, DecodeBuf, Decoder};

use crate::common::*;

/// Encodes requests with prost; hands responses over as raw bytes.
struct RawCodec<T>(PhantomData<T>);

impl<T> Default for RawCodec<T> {
    fn default() -> Self {
        RawCodec(PhantomData)
    }
}

struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

impl<T: Message + Send + 'static> Codec for RawCodec<T> {
    type Encode = T;
    type Decode = Vec<u8>;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

/// The proto's messages by full name (`.pullstream.v1.Event`).
fn messages() -> Vec<(String, DescriptorProto)> {
    let set = FileDescriptorSet::decode(pullstream::proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    fn walk(prefix: &str, message: &DescriptorProto, out: &mut Vec<(String, DescriptorProto)>) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            walk(&name, nested, out);
        }
        out.push((name, message.clone()));
    }
    for file in &set.file {
        for message in &file.message_type {
            walk(&format!(".{}", file.package()), message, &mut out);
        }
    }
    out
}

/// The wire types a field of this declaration may be sent with.
fn wire_types(field: &FieldDescriptorProto) -> &'static [u32] {
    let packable = field.label() == Label::Repeated;
    match field.r#type() {
        Type::String | Type::Bytes | Type::Message => &[2],
        Type::Fixed64 | Type::Sfixed64 | Type::Double if packable => &[1, 2],
        Type::Fixed64 | Type::Sfixed64 | Type::Double => &[1],
        Type::Fixed32 | Type::Sfixed32 | Type::Float if packable => &[5, 2],
        Type::Fixed32 | Type::Sfixed32 | Type::Float => &[5],
        Type::Group => &[3],
        _ if packable => &[0, 2],
        _ => &[0],
    }
}

/// Checks `bytes` as an encoding of `message`, recursing into fields of
/// our own message types; records every (message, field) seen.
fn check(
    all: &[(String, DescriptorProto)],
    message: &str,
    mut bytes: &[u8],
    seen: &mut BTreeSet<(String, i32)>,
) {
    let (_, descriptor) = all
        .iter()
        .find(|(name, _)| name == message)
        .unwrap_or_else(|| panic!("{message} is not in the proto"));
    while !bytes.is_empty() {
        let (number, wire_type) = prost::encoding::decode_key(&mut bytes).expect("a field key");
        let field = descriptor
            .field
            .iter()
            .find(|f| f.number() == number as i32)
            .unwrap_or_else(|| panic!("{message} has no field {number}, yet it was sent"));
        let wire_type = wire_type as u32;
        assert!(
            wire_types(field).contains(&wire_type),
            "{message}.{} is sent with wire type {wire_type}, its type {:?} needs {:?}",
            field.name(),
            field.r#type(),
            wire_types(field)
        );
        seen.insert((message.to_string(), field.number()));
        match wire_type {
            0 => {
                prost::encoding::decode_varint(&mut bytes).unwrap();
            }
            1 => bytes.advance(8),
            5 => bytes.advance(4),
            2 => {
                let len = prost::encoding::decode_varint(&mut bytes).unwrap() as usize;
                let (inner, rest) = bytes.split_at(len);
                if field.r#type() == Type::Message && field.type_name().starts_with(".pullstream.")
                {
                    check(all, field.type_name(), inner, seen);
                }
                bytes = rest;
            }
            other => panic!("unexpected wire type {other}"),
        }
    }
}

/// Every field `message` declares was seen.
fn assert_all_sent(
    all: &[(String, DescriptorProto)],
    message: &str,
    seen: &BTreeSet<(String, i32)>,
) {
    let (_, descriptor) = all.iter().find(|(name, _)| name == message).unwrap();
    let missing: Vec<&str> = descriptor
        .field
        .iter()
        .filter(|f| !seen.contains(&(message.to_string(), f.number())))
        .map(|f| f.name())
        .collect();
    assert!(
        missing.is_empty(),
        "{message} fields never sent: {missing:?}"
    );
}

/// An event with every field set, in a version as well.
fn full_event() -> pb::NewEvent {
    pb::NewEvent {
        r#type: "order.created".into(),
        key: "order-7".into(),
        data: br#"{"total":42}"#.to_vec().into(),
        content_type: "application/json".into(),
        metadata: [("trace".to_string(), "abc".to_string())].into(),
        versions: [(
            "v2".to_string(),
            pb::PayloadVersion {
                data: br#"{"amount":42}"#.to_vec().into(),
                content_type: "application/json".into(),
            },
        )]
        .into(),
    }
}

#[tokio::test]
async fn read_and_subscribe_responses_match_the_proto() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    append(&mut client, "s", vec![full_event(), full_event()]).await;
    let all = messages();
    let mut seen = BTreeSet::new();

    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let read = grpc
        .unary(
            tonic::Request::new(pb::ReadRequest {
                stream: "s".into(),
                offset: 1,
                version: "v2".into(),
                ..Default::default()
            }),
            http::uri::PathAndQuery::from_static("/pullstream.v1.EventLog/Read"),
            RawCodec::<pb::ReadRequest>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    check(&all, ".pullstream.v1.ReadResponse", &read, &mut seen);
    assert_all_sent(&all, ".pullstream.v1.ReadResponse", &seen);
    assert_all_sent(&all, ".pullstream.v1.Event", &seen);

    // A group member's responses carry its assignment as well.
    grpc.ready().await.unwrap();
    let mut responses = grpc
        .server_streaming(
            tonic::Request::new(pb::SubscribeRequest {
                stream: "s".into(),
                start: Some(Start::Offset(1)),
                version: "v2".into(),
                group: "g".into(),
                member: "m".into(),
                ..Default::default()
            }),
            http::uri::PathAndQuery::from_static("/pullstream.v1.EventLog/Subscribe"),
            RawCodec::<pb::SubscribeRequest>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let message = ".pullstream.v1.SubscribeResponse";
    within(async {
        loop {
            let response = responses.message().await.unwrap().expect("a response");
            check(&all, message, &response, &mut seen);
            let (_, descriptor) = all.iter().find(|(n, _)| n == message).unwrap();
            if descriptor
                .field
                .iter()
                .all(|f| seen.contains(&(message.to_string(), f.number())))
            {
                break;
            }
        }
    })
    .await;
    assert_all_sent(&all, message, &seen);
}
