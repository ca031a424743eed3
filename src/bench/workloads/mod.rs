//! The benchmark workloads, one file per kind. Each returns an
//! [`Outcome`](super::Outcome) with its figures and any correctness failure it detected;
//! this file holds what they share (fresh stream names, event payloads
//! carrying their send time, stream creation and description).

mod append;
mod catchup;
mod floor;
mod group;
mod http;
mod soak;
mod tail;

pub(crate) use append::{append, Until};
pub(crate) use catchup::{catchup, committing_catchup, filtered_catchup};
pub(crate) use floor::floor;
pub(crate) use group::group;
pub(crate) use http::http;
pub(crate) use soak::{soak, SoakSettings};
pub(crate) use tail::{fanout, tail};

use super::BenchContext;
use crate::proto as pb;

/// A stream name no earlier run used.
fn fresh_stream(workload: &str) -> String {
    format!("bench-{workload}-{}", crate::clock::system_now_unix_nanos())
}

/// An event of `bytes` payload bytes; the first 8 carry `stamp`.
fn event(bytes: usize, seq: u64, stamp: u64) -> pb::NewEvent {
    let mut data = vec![b'x'; bytes];
    data[..8].copy_from_slice(&stamp.to_le_bytes());
    pb::NewEvent {
        r#type: "bench.event".into(),
        key: format!("k{}", seq % 1024).into(),
        data: data.into(),
        content_type: "application/octet-stream".into(),
        metadata: Default::default(),
        versions: Default::default(),
    }
}

fn stamp_of(data: &[u8]) -> u64 {
    let mut stamp = [0u8; 8];
    stamp.copy_from_slice(&data[..8]);
    u64::from_le_bytes(stamp)
}

async fn create_stream(ctx: &BenchContext, stream: &str) -> anyhow::Result<()> {
    ctx.client()
        .await?
        .create_stream(pb::CreateStreamRequest {
            stream: stream.to_string(),
            retention: None,
        })
        .await?;
    Ok(())
}

async fn head_of(ctx: &BenchContext, stream: &str) -> anyhow::Result<u64> {
    Ok(stream_info(&mut ctx.client().await?, stream)
        .await?
        .next_offset)
}

/// A stream's description (GetStream).
async fn stream_info(
    client: &mut crate::client::Client,
    stream: &str,
) -> anyhow::Result<pb::StreamInfo> {
    Ok(client
        .get_stream(pb::GetStreamRequest {
            stream: stream.to_string(),
        })
        .await?
        .into_inner()
        .stream
        .unwrap_or_default())
}
