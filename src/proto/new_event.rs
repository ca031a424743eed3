//! `pullstream.v1.NewEvent`, hand-written so that an appended event's
//! text fields are decoded without an allocation.
//!
//! prost decodes every `string` field into a `String` of its own (it has
//! no zero-copy string type: tokio-rs/prost#752). A batch of 100 events
//! therefore cost 300 allocations for `type`, `key` and `content_type`,
//! and as many frees once the events were stored: about a tenth of the
//! server's CPU under pipelined appends, in a `perf` profile. Here those
//! fields are [`Text`]: UTF-8 checked when decoded, held as slices of the
//! request's buffer (as `data` already was), and handed to the log as they
//! are. On the wire nothing changes; `build.rs` maps the proto type here
//! with `extern_path`, and `pb::NewEvent` is this type.

use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;

use ::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{bytes, hash_map, message, skip_field, string, DecodeContext, WireType};
use prost::DecodeError;

use super::PayloadVersion;

/// A protobuf `string` held as shared bytes: always valid UTF-8, cheap to
/// clone, and a slice of the message it was decoded from. Reads as a
/// `&str`; made from `&str` and `String` with `into()`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Text(Bytes);

impl Text {
    /// The text, as a string slice.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("Text holds UTF-8 (checked when made)")
    }

    /// The UTF-8 bytes, without a copy.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Takes `bytes` as text if they are UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Text, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Text {
        Text(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text(Bytes::from(text.into_bytes()))
    }
}

impl From<&String> for Text {
    fn from(text: &String) -> Text {
        Text::from(text.as_str())
    }
}

impl From<Text> for String {
    fn from(text: Text) -> String {
        text.as_str().to_owned()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `pullstream.v1.NewEvent`: an event as a producer submits it. See the
/// proto for each field's meaning and limits.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct NewEvent {
    /// What happened, e.g. `invoice.paid` (required).
    pub r#type: Text,
    /// The entity the event is about, e.g. `in_123`.
    pub key: Text,
    /// The payload, opaque to the server.
    pub data: Bytes,
    /// The media type of `data`, e.g. `application/json`.
    pub content_type: Text,
    /// Free-form string attributes.
    pub metadata: HashMap<String, String>,
    /// Extra renderings of the payload, by version label.
    pub versions: HashMap<String, PayloadVersion>,
}

fn encode_text(tag: u32, text: &Text, buf: &mut impl BufMut) {
    if !text.0.is_empty() {
        bytes::encode(tag, &text.0, buf);
    }
}

fn text_len(tag: u32, text: &Text) -> usize {
    if text.0.is_empty() {
        0
    } else {
        bytes::encoded_len(tag, &text.0)
    }
}

/// Decodes a `string` field as a slice of `buf` (no copy where `buf` is
/// a `Bytes`-backed buffer, as tonic's is), rejecting bad UTF-8 as prost
/// does.
fn merge_text(
    wire_type: WireType,
    text: &mut Text,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let mut raw = Bytes::new();
    bytes::merge(wire_type, &mut raw, buf, ctx)?;
    *text = Text::from_utf8(raw).map_err(|_| {
        #[allow(deprecated)]
        DecodeError::new("invalid string value: data is not UTF-8 encoded")
    })?;
    Ok(())
}

impl prost::Message for NewEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_text(1, &self.r#type, buf);
        encode_text(2, &self.key, buf);
        if !self.data.is_empty() {
            bytes::encode(3, &self.data, buf);
        }
        encode_text(4, &self.content_type, buf);
        hash_map::encode(
            string::encode,
            string::encoded_len,
            string::encode,
            string::encoded_len,
            5,
            &self.metadata,
            buf,
        );
        hash_map::encode(
            string::encode,
            string::encoded_len,
            message::encode,
            message::encoded_len,
            6,
            &self.versions,
            buf,
        );
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let (result, field) = match tag {
            1 => (merge_text(wire_type, &mut self.r#type, buf, ctx), "type"),
            2 => (merge_text(wire_type, &mut self.key, buf, ctx), "key"),
            3 => (bytes::merge(wire_type, &mut self.data, buf, ctx), "data"),
            4 => (
                merge_text(wire_type, &mut self.content_type, buf, ctx),
                "content_type",
            ),
            5 => (
                hash_map::merge(string::merge, string::merge, &mut self.metadata, buf, ctx),
                "metadata",
            ),
            6 => (
                hash_map::merge(string::merge, message::merge, &mut self.versions, buf, ctx),
                "versions",
            ),
            _ => return skip_field(wire_type, tag, buf, ctx),
        };
        result.map_err(|mut e| {
            e.push("NewEvent", field);
            e
        })
    }

    fn encoded_len(&self) -> usize {
        text_len(1, &self.r#type)
            + text_len(2, &self.key)
            + if self.data.is_empty() {
                0
            } else {
                bytes::encoded_len(3, &self.data)
            }
            + text_len(4, &self.content_type)
            + hash_map::encoded_len(string::encoded_len, string::encoded_len, 5, &self.metadata)
            + hash_map::encoded_len(string::encoded_len, message::encoded_len, 6, &self.versions)
    }

    fn clear(&mut self) {
        *self = NewEvent::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The generated type this one replaces, field for field, to check
    /// that both read and write the same bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(string, tag = "1")]
        r#type: String,
        #[prost(string, tag = "2")]
        key: String,
        #[prost(bytes = "vec", tag = "3")]
        data: Vec<u8>,
        #[prost(string, tag = "4")]
        content_type: String,
        #[prost(map = "string, string", tag = "5")]
        metadata: HashMap<String, String>,
        #[prost(map = "string, message", tag = "6")]
        versions: HashMap<String, PayloadVersion>,
    }

    fn full() -> Generated {
        Generated {
            r#type: "invoice.paid".into(),
            key: "in_1".into(),
            data: b"{\"amount\":10}".to_vec(),
            content_type: "application/json".into(),
            metadata: [("trace".to_string(), "abc".to_string())].into(),
            versions: [(
                "2024-06-01".to_string(),
                PayloadVersion {
                    data: Bytes::from_static(b"v1"),
                    content_type: "text/plain".into(),
                },
            )]
            .into(),
        }
    }

    #[test]
    fn reads_and_writes_what_the_generated_type_does() {
        let generated = full();
        let wire = generated.encode_to_vec();
        let ours = NewEvent::decode(Bytes::from(wire.clone())).unwrap();
        assert_eq!(ours.r#type, "invoice.paid");
        assert_eq!(ours.key, "in_1");
        assert_eq!(&ours.data[..], b"{\"amount\":10}");
        assert_eq!(ours.content_type, "application/json");
        assert_eq!(ours.metadata, generated.metadata);
        assert_eq!(ours.versions, generated.versions);
        assert_eq!(ours.encoded_len(), wire.len());
        assert_eq!(
            Generated::decode(&ours.encode_to_vec()[..]).unwrap(),
            generated
        );
        // Empty fields are left out, as the generated type does.
        assert_eq!(NewEvent::default().encoded_len(), 0);
        assert!(NewEvent::default().encode_to_vec().is_empty());
    }

    #[test]
    fn text_fields_are_slices_of_the_request_buffer() {
        let wire = Bytes::from(full().encode_to_vec());
        let ours = NewEvent::decode(wire.clone()).unwrap();
        let within = |b: &Bytes| wire.as_ptr_range().contains(&b.as_ptr());
        assert!(within(&ours.r#type.clone().into_bytes()));
        assert!(within(&ours.key.clone().into_bytes()));
        assert!(within(&ours.content_type.clone().into_bytes()));
        assert!(within(&ours.data));
    }

    #[test]
    fn bad_utf8_in_a_text_field_is_a_decode_error() {
        for tag in [1u8, 2, 4] {
            // Field `tag`, length-delimited, 2 bytes that are not UTF-8.
            let wire = [tag << 3 | 2, 2, 0xff, 0xfe];
            let error = NewEvent::decode(&wire[..]).unwrap_err();
            assert!(
                error.to_string().contains("not UTF-8"),
                "tag {tag}: {error}"
            );
        }
        assert!(Text::from_utf8(Bytes::from_static(&[0xc3])).is_err());
        assert_eq!(
            Text::from_utf8(Bytes::from_static("é".as_bytes())).unwrap(),
            "é"
        );
    }
}
