//! `--max-connections`: how many client connections may be open at once.
//!
//! Every connection costs a task, socket buffers and HTTP/2 state before it
//! has made a single call, so the count is capped where connections are
//! accepted. A connection past the cap is closed at once (the client sees a
//! reset and retries with backoff) rather than left in the accept backlog,
//! where it would hang without a word; the refusal is logged, at most once
//! a second, so a flood does not flood the log too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// A connection's place under the cap, held for the connection's life.
pub(crate) type ConnectionSlot = OwnedSemaphorePermit;

/// The cap; see the module docs.
#[derive(Clone)]
pub(crate) struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    /// The second of the last refusal logged.
    logged_second: Arc<AtomicU64>,
}

impl ConnectionLimit {
    pub(crate) fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            logged_second: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The connection with its slot, or `None` (and the connection closed)
    /// when the cap is reached.
    pub(crate) fn admit(&self, tcp: TcpStream) -> Option<(TcpStream, ConnectionSlot)> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some((tcp, slot)),
            Err(_) => {
                let second = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                if self.logged_second.swap(second, Ordering::Relaxed) != second {
                    warn!(
                        max = self.max,
                        peer = ?tcp.peer_addr().ok(),
                        "closing a new connection: --max-connections are open"
                    );
                }
                None
            }
        }
    }
}
