//! Watch streams: history replay from redb, then live events, never a gap.
//!
//! A watch subscribes to the writer's broadcast *before* it reads anything,
//! so every revision committed after its first read reaches it live; the ones
//! committed before are in the `history` table. It tracks the next revision
//! it owes its reader and drops live events below it (duplicates of what it
//! replayed). Whenever the live channel cannot vouch for continuity — the
//! watcher lagged and the channel overwrote events, or a revision arrives
//! ahead of the expected one — it goes back to reading history from redb.
//! If that history was compacted meanwhile, it says so and ends.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use futures::StreamExt;
use redb::{Database, ReadableDatabase};
use tokio::sync::broadcast::{self, error::RecvError};

use super::codec;
use super::writer::{Committed, HISTORY, META, META_COMPACT, Status};
use crate::{Result, Revision, StoreError, WatchBatch, WatchEvent, WatchStream};

/// Revisions read from history per redb read transaction, which bounds the
/// memory a replay holds at once.
const REPLAY_CHUNK: usize = 512;

pub(super) struct Watch {
    /// Weak: an open watch must not keep the file open after the store is
    /// dropped.
    db: Weak<Database>,
    live: broadcast::Receiver<Committed>,
    status: Arc<Status>,
    prefix: String,
    /// The next revision this watch owes its reader.
    next: Revision,
    pending: VecDeque<WatchBatch>,
    replaying: bool,
    done: bool,
}

impl Watch {
    pub(super) fn new(
        db: Weak<Database>,
        live: broadcast::Receiver<Committed>,
        status: Arc<Status>,
        prefix: String,
        next: Revision,
    ) -> Self {
        Self {
            db,
            live,
            status,
            prefix,
            next,
            pending: VecDeque::new(),
            replaying: true,
            done: false,
        }
    }

    pub(super) fn into_stream(self) -> WatchStream {
        futures::stream::unfold(self, |mut watch| async move {
            let item = watch.next_item().await?;
            Some((item, watch))
        })
        .boxed()
    }

    async fn next_item(&mut self) -> Option<Result<WatchBatch>> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Some(Ok(batch));
            }
            if self.done {
                return None;
            }
            if self.replaying {
                match self.replay_chunk() {
                    Ok(caught_up) => self.replaying = !caught_up,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            }
            match self.live.recv().await {
                Ok(committed) => self.accept_live(&committed),
                Err(RecvError::Lagged(skipped)) => {
                    tracing::debug!(
                        skipped,
                        next = self.next,
                        "watch lagged; re-reading history"
                    );
                    self.replaying = true;
                }
                Err(RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(self.status.error()));
                }
            }
        }
    }

    fn accept_live(&mut self, committed: &Committed) {
        for rev in committed.iter() {
            if rev.revision < self.next {
                continue;
            }
            if rev.revision > self.next {
                // Cannot happen by construction (revisions are consecutive
                // and published in order); if it ever does, history is the
                // authority, not silence.
                tracing::warn!(
                    expected = self.next,
                    got = rev.revision,
                    "watch saw a gap; re-reading history"
                );
                self.replaying = true;
                return;
            }
            self.push(&rev.events);
            self.next = rev.revision + 1;
        }
    }

    fn push(&mut self, events: &[WatchEvent]) {
        let matching: WatchBatch = events
            .iter()
            .filter(|e| e.key().starts_with(self.prefix.as_str()))
            .cloned()
            .collect();
        if !matching.is_empty() {
            self.pending.push_back(matching);
        }
    }

    /// Read the next chunk of history; true once it reached the end.
    fn replay_chunk(&mut self) -> Result<bool> {
        let db = self.db.upgrade().ok_or_else(|| self.status.error())?;
        let read = db.begin_read().map_err(backend)?;
        let meta = read.open_table(META).map_err(backend)?;
        let compact_revision = meta
            .get(META_COMPACT)
            .map_err(backend)?
            .map_or(1, |g| g.value());
        if self.next < compact_revision {
            return Err(StoreError::Compacted {
                requested: self.next,
                compact_revision,
            });
        }
        let history = read.open_table(HISTORY).map_err(backend)?;
        let mut count = 0;
        for entry in history.range::<i64>(self.next..).map_err(backend)? {
            let (revision, bytes) = entry.map_err(backend)?;
            let revision = revision.value();
            let events = codec::decode_events(revision, bytes.value())
                .map_err(|e| StoreError::Backend(format!("corrupt store: {}", e.0)))?;
            self.push(&events);
            self.next = revision + 1;
            count += 1;
            if count == REPLAY_CHUNK {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

pub(super) fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}
