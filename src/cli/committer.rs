//! Committing a reader's progress (a durable consumer's cursor, or a group
//! member's), shared by `tail --commit` and `listen`: on a connection of
//! its own, reconnecting with backoff while the server is away, because a
//! commit is the cursor a restart resumes at and must not be skipped.
//! Statuses no retry can fix end the command.

use std::time::Duration;

use super::status_error;
use crate::client::{worth_retrying, Client, ConnectOptions};
use crate::proto as pb;

/// Whose progress is committed.
pub(super) enum CommitTo {
    /// A durable consumer's cursor.
    Consumer(String),
    /// A key-shared group member's progress.
    Group {
        /// The group.
        group: String,
        /// The member id.
        member: String,
    },
}

/// Commits on its own connection; see the module docs.
pub(super) struct Committer {
    options: ConnectOptions,
    client: Option<Client>,
    stream: String,
    to: CommitTo,
}

enum Attempt {
    Unreachable(String),
    Refused(tonic::Status),
}

impl Committer {
    /// A committer for `to` on `stream` (it connects on first use).
    pub(super) fn new(options: ConnectOptions, stream: String, to: CommitTo) -> Committer {
        Committer {
            options,
            client: None,
            stream,
            to,
        }
    }

    /// Commits `cursor`, retrying until the server takes it or refuses it
    /// for good.
    pub(super) async fn commit(&mut self, cursor: u64) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let reason = match self.try_commit(cursor).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Unreachable(reason)) => reason,
                Err(Attempt::Refused(status)) if worth_retrying(&status) => {
                    status_error(status).to_string()
                }
                Err(Attempt::Refused(status)) => return Err(status_error(status)),
            };
            self.client = None;
            eprintln!("committing offset {cursor} failed ({reason}); retrying in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn try_commit(&mut self, cursor: u64) -> Result<(), Attempt> {
        if self.client.is_none() {
            let client = self
                .options
                .event_log()
                .await
                .map_err(|e| Attempt::Unreachable(e.to_string()))?;
            self.client = Some(client);
        }
        let client = self.client.as_mut().expect("connected above");
        match &self.to {
            CommitTo::Group { group, member } => client
                .commit_group(pb::CommitGroupRequest {
                    stream: self.stream.clone(),
                    group: group.clone(),
                    member: member.clone(),
                    next_offset: cursor,
                })
                .await
                .map(|_| ())
                .map_err(Attempt::Refused),
            CommitTo::Consumer(consumer) => client
                .commit_cursor(pb::CommitCursorRequest {
                    stream: self.stream.clone(),
                    consumer: consumer.clone(),
                    next_offset: cursor,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(Attempt::Refused),
        }
    }
}
