//! The registry of streams: opening the engine and starting a writer per
//! stored stream, finding and creating streams (creation serialized by its
//! own lock, within `--max-streams` per tenant), listing, deleting, and
//! closing. The registry's map lock is held only to look up or insert: no
//! I/O, no await and no disk sync ever runs under it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::cache::{CacheBudget, SharedReads, TailCache};
use super::command::WriterCommand;
use super::commit::Committer;
use super::housekeeping::{
    expire_idempotency_keys, follow_remote_changes, follow_remote_heads, housekeeping,
};
use super::read_ahead::{ReadAheadBudget, READ_AHEAD_BUDGET_BYTES};
use super::stream::{Stream, StreamShared};
use super::validate::validate_stored_name;
use super::writer::Writer;
use super::{Head, Log, LogConfig, StreamInfo, SHARED_READS_BYTES, WRITER_QUEUE};
use crate::config::Durability;
use crate::engine::{Engine, Retention, StoredStream, StreamMeta};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::storage::{BackgroundFlush, Store, StoreOptions};

impl Log {
    /// Opens the store and starts a writer per stream.
    pub async fn open(mut config: LogConfig) -> Result<Arc<Log>, Error> {
        let options = StoreOptions {
            path: config.data_dir.clone(),
            cache_bytes: config.cache_bytes,
            // In fsync mode the write-ahead log makes appends durable, and
            // the background flush only keeps sled's writes small and
            // steady (`storage::flusher`). In buffered mode sled's own
            // flush is what makes changes durable, within a few ms.
            background_flush: match config.durability {
                Durability::Fsync => config
                    .storage_flush_bytes
                    .map_or(BackgroundFlush::Off, BackgroundFlush::AfterBytes),
                Durability::Buffered => BackgroundFlush::Every(Duration::from_millis(5)),
            },
            write_ahead_log: config.durability == Durability::Fsync,
            checkpoint_bytes: config.checkpoint_bytes,
            faults: config.faults.clone(),
        };
        let verify = config.verify_on_start;
        let (engine, stored): (Arc<dyn Engine>, _) = match &config.engine {
            crate::config::EngineConfig::JetStream {
                urls,
                replicas,
                namespace,
                tls_ca,
                creds,
            } => {
                let options = crate::jetstream::JetStreamOptions {
                    tls_ca: tls_ca.clone(),
                    creds: creds.clone(),
                    urls: urls.clone(),
                    replicas: *replicas,
                    namespace: namespace.clone(),
                    timeout: std::time::Duration::from_secs(5),
                    label: std::path::PathBuf::from(format!("jetstream:{}", urls.join(","))),
                };
                let (engine, stored) = tokio::task::spawn_blocking(move || {
                    let engine = crate::jetstream::JetStreamEngine::open(options)?;
                    let stored = engine.load_streams()?;
                    Ok::<_, Error>((engine, stored))
                })
                .await
                .map_err(|e| Error::StorageFailed(e.to_string()))??;
                info!(streams = stored.len(), "opened the JetStream engine");
                (Arc::new(engine), stored)
            }
            crate::config::EngineConfig::Sled => Self::open_sled(options, verify).await?,
        };
        if let Some(room) = engine.max_group_bytes() {
            // One write of the engine must hold any valid batch: half the
            // room leaves the framing of the smallest events (the writer
            // still refuses, by name, a batch that does not fit).
            let most = room / 2;
            if config.max_batch_bytes > most || config.max_event_bytes > most {
                info!(
                    max_batch_bytes = most,
                    "lowered --max-batch-bytes and --max-event-bytes to what one write of the storage engine holds"
                );
            }
            config.max_batch_bytes = config.max_batch_bytes.min(most);
            config.max_event_bytes = config.max_event_bytes.min(most);
        }
        Self::start(config, engine, stored).await
    }

    /// Opens the embedded sled store (and verifies it, when asked).
    async fn open_sled(
        options: StoreOptions,
        verify: bool,
    ) -> Result<(Arc<dyn Engine>, Vec<StoredStream>), Error> {
        let (store, stored) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&options)?;
            let stored = store.load_streams()?;
            if verify {
                let started = Instant::now();
                let checks = store.verify(|_| {})?;
                let damage: Vec<String> = checks
                    .iter()
                    .flat_map(|c| {
                        c.damage.iter().map(move |d| {
                            format!(
                                "stream {:?} offsets {}..{}: {}",
                                c.name,
                                d.first,
                                d.end.map_or("?".into(), |e| e.to_string()),
                                d.reason
                            )
                        })
                    })
                    .collect();
                if !damage.is_empty() {
                    return Err(Error::VerifyFailed(damage.join("; ")));
                }
                info!(
                    streams = checks.len(),
                    chunks = checks.iter().map(|c| c.chunks).sum::<u64>(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "verified every stored event"
                );
            }
            Ok::<_, Error>((store, stored))
        })
        .await
        .map_err(|e| Error::StorageFailed(e.to_string()))??;
        Ok((Arc::new(store), stored))
    }

    /// Starts the log on an opened engine and what it loaded.
    async fn start(
        config: LogConfig,
        engine: Arc<dyn Engine>,
        stored: Vec<StoredStream>,
    ) -> Result<Arc<Log>, Error> {
        let tasks = TaskTracker::new();
        let closing = CancellationToken::new();
        let metrics = Arc::new(Metrics::new(config.metrics_stream_labels));
        let cache_budget = CacheBudget::new(config.stream_cache_budget_bytes);
        let opened = (Instant::now(), config.clock.now_unix_nanos());
        let committer = Committer::start(
            engine.clone(),
            config.durability,
            config.commit_queue_bytes,
            metrics.clone(),
        );
        // An engine several servers share keeps nothing under the data
        // dir: its free space is not the engine's.
        let min_free_bytes = if engine.shared() {
            0
        } else {
            config
                .min_free_bytes
                .unwrap_or_else(|| crate::durability::space::default_floor(&config.data_dir))
        };
        let log = Arc::new(Log {
            engine,
            config,
            committer: Mutex::new(Some(committer)),
            streams: RwLock::new(BTreeMap::new()),
            creating: Mutex::new(()),
            cache_budget,
            read_ahead: ReadAheadBudget::new(READ_AHEAD_BUDGET_BYTES),
            min_free_bytes,
            tasks,
            closing,
            opened,
            metrics,
            assign_queue: Default::default(),
        });
        {
            let mut streams = log.streams.write().expect("registry lock");
            for s in stored {
                let stream = log.start_stream(s)?;
                streams.insert(stream.name.clone(), stream);
            }
        }
        log.tasks.spawn(expire_idempotency_keys(log.clone()));
        log.tasks.spawn(housekeeping(log.clone()));
        if let Some(heads) = log.engine.remote_heads() {
            log.tasks.spawn(follow_remote_heads(log.clone(), heads));
        }
        if let Some(changes) = log.engine.remote_changes() {
            log.tasks.spawn(follow_remote_changes(log.clone(), changes));
        }
        if log.engine.shared() {
            log.tasks
                .spawn(super::group::coordinate_groups(log.clone()));
        }
        if let Some(calls) = log.engine.forwarded() {
            log.tasks
                .spawn(super::group::serve_forwarded(log.clone(), calls));
        }
        info!(path = %log.engine.path().display(), streams = log.streams.read().expect("registry lock").len(), "storage open");
        Ok(log)
    }

    pub(super) fn start_stream(&self, stored: StoredStream) -> Result<Arc<Stream>, Error> {
        let committer = self
            .committer
            .lock()
            .expect("committer lock")
            .clone()
            .ok_or(Error::ShuttingDown)?;
        let (head_tx, _) = watch::channel(Head {
            first_offset: stored.first_offset,
            next_offset: stored.next_offset,
            deleted: false,
        });
        let shared = Arc::new(StreamShared::new(
            head_tx,
            &stored,
            TailCache::new(self.config.tail_cache_bytes, self.cache_budget.clone()),
            SharedReads::new(SHARED_READS_BYTES, self.cache_budget.clone()),
            &self.metrics,
        ));
        if self.engine.shared() {
            let _ = shared.coordination.set(super::group::Coordination {
                engine: self.engine.clone(),
                stream: stored.name.clone(),
                stream_id: stored.meta.id,
                queue: self.assign_queue.clone(),
            });
            // Groups loaded with the stream follow the stored assignment.
            for name in shared.groups.lock().expect("groups lock").keys() {
                self.assign_queue.again(&stored.name, name);
            }
        }
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE);
        let writer = Writer {
            engine: self.engine.clone(),
            epoch: committer.epoch(),
            epochs: committer.watch_epoch(),
            committer,
            shared: shared.clone(),
            name: stored.name.clone(),
            meta: stored.meta,
            next_offset: stored.next_offset,
            last_time_unix_nanos: stored.last_time_unix_nanos.unwrap_or(i64::MIN),
            idempotency_window: self.config.idempotency_window,
            limits: self.config.limits,
            clock: self.config.clock.clone(),
            unpublished_keys: Vec::new(),
            fence: stored.fence.clone(),
            closing: self.closing.clone(),
        };
        self.tasks.spawn(writer.run(writer_rx));
        Ok(Arc::new(Stream {
            name: stored.name,
            meta: stored.meta,
            writer_tx,
            shared,
        }))
    }

    pub(super) fn get(&self, name: &str) -> Result<Arc<Stream>, Error> {
        validate_stored_name(name)?;
        let known = self
            .streams
            .read()
            .expect("registry lock")
            .get(name)
            .cloned();
        match known {
            Some(stream) => Ok(stream),
            None => self
                .adopt(name)?
                .ok_or_else(|| Error::StreamNotFound(name.to_string())),
        }
    }

    /// Starts a stream another server sharing the engine created since
    /// this one opened, if there is one by that name.
    fn adopt(&self, name: &str) -> Result<Option<Arc<Stream>>, Error> {
        let Some(stored) = self.engine.find_stream(name)? else {
            return Ok(None);
        };
        let _creating = self.creating.lock().expect("creation lock");
        if let Some(stream) = self.streams.read().expect("registry lock").get(name) {
            return Ok(Some(stream.clone()));
        }
        let stream = self.start_stream(stored)?;
        self.streams
            .write()
            .expect("registry lock")
            .insert(name.to_string(), stream.clone());
        Ok(Some(stream))
    }

    /// Returns the stream, creating it when `create` is set and it is missing.
    /// The second value says whether it was created.
    pub(super) fn get_or_create(
        &self,
        name: &str,
        create: bool,
        retention: Retention,
    ) -> Result<(Arc<Stream>, bool), Error> {
        validate_stored_name(name)?;
        if let Ok(stream) = self.get(name) {
            return Ok((stream, false));
        }
        if !create {
            return Err(Error::StreamNotFound(name.to_string()));
        }
        let _creating = self.creating.lock().expect("creation lock");
        if let Some(stream) = self.streams.read().expect("registry lock").get(name) {
            return Ok((stream.clone(), false));
        }
        self.check_free_space()?;
        self.check_stream_count(name)?;
        let meta = StreamMeta {
            id: self.engine.new_stream_id()?,
            created_unix_nanos: self.now(),
            offset_floor: 0,
            next_offset: 0,
            bytes: 0,
            retention,
        };
        match self.engine.put_stream(name, &meta) {
            Ok(()) => {}
            Err(crate::engine::StorageError::AlreadyCreated { .. }) => {
                drop(_creating);
                return match self.adopt(name)? {
                    Some(stream) => Ok((stream, false)),
                    None => Err(Error::StreamNotFound(name.to_string())),
                };
            }
            Err(e) => return Err(e.into()),
        }
        let stream = self.start_stream(StoredStream {
            fence: String::new(),
            name: name.to_string(),
            meta,
            first_offset: 0,
            next_offset: 0,
            last_time_unix_nanos: None,
            consumers: Vec::new(),
            groups: Vec::new(),
        })?;
        self.streams
            .write()
            .expect("registry lock")
            .insert(name.to_string(), stream.clone());
        Ok((stream, true))
    }

    /// Refuses a new stream when its tenant has `--max-streams` already.
    /// Called under the creation lock, so two creations cannot both pass.
    pub(super) fn check_stream_count(&self, name: &str) -> Result<(), Error> {
        let tenant = crate::names::tenant_of(name);
        let max = self.config.limits.max_streams;
        let count = self
            .streams
            .read()
            .expect("registry lock")
            .keys()
            .filter(|n| crate::names::tenant_of(n) == tenant)
            .count();
        if count >= max {
            return Err(Error::ResourceExhausted(format!(
                "the tenant already has {count} streams, the most allowed (--max-streams {max}): delete streams it no longer needs"
            )));
        }
        Ok(())
    }

    /// Lists up to `limit` streams whose names sort after `after` and
    /// pass `visible`.
    pub fn list_streams(
        &self,
        after: &str,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> Vec<StreamInfo> {
        if self.engine.shared() {
            // Other servers may have made streams this one has not served
            // (and deleted some it did): the stored names are the truth.
            match self.engine.stored_stream_names() {
                Ok(names) => {
                    return names
                        .iter()
                        .filter(|name| name.as_str() > after && visible(name))
                        .filter_map(|name| self.get(name).ok())
                        .take(limit)
                        .map(|s| s.info())
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the cluster's streams; listing the ones this server serves");
                }
            }
        }
        let streams = self.streams.read().expect("registry lock");
        let lower = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after)
        };
        streams
            .range::<str, _>((lower, Bound::Unbounded))
            .filter(|(name, _)| visible(name))
            .take(limit)
            .map(|(_, s)| s.info())
            .collect()
    }

    /// Every stream, as the registry holds them now (the lock is not held
    /// afterwards).
    pub(super) fn all_streams(&self) -> Vec<Arc<Stream>> {
        self.streams
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Deletes a stream with all its events; its subscriptions end.
    ///
    /// The stream stays in the registry until its writer has deleted it, so
    /// a stream of the same name cannot be created in between (its
    /// metadata would share the name's key with the deletion).
    pub async fn delete_stream(&self, name: &str) -> Result<(), Error> {
        let stream = self.get(name)?;
        let (reply, reply_rx) = oneshot::channel();
        let gone = || Error::StreamNotFound(name.to_string());
        stream
            .writer_tx
            .send(WriterCommand::Delete(reply))
            .await
            .map_err(|_| gone())?;
        // No answer means another DeleteStream got there first.
        reply_rx.await.map_err(|_| gone())??;
        let mut streams = self.streams.write().expect("registry lock");
        if streams.get(name).is_some_and(|s| Arc::ptr_eq(s, &stream)) {
            streams.remove(name);
            self.metrics.remove_stream(name);
        }
        Ok(())
    }

    /// Ends a stream another server deleted (shared engines): its writer
    /// stops without writing, its subscriptions end, and it leaves the
    /// registry (unless a stream of the name was started since).
    pub(super) async fn forget_stream(&self, stream: &Arc<Stream>) {
        let (reply, reply_rx) = oneshot::channel();
        if stream
            .writer_tx
            .send(WriterCommand::DeletedElsewhere(reply))
            .await
            .is_err()
            || reply_rx.await.is_err()
        {
            // Its writer had stopped: deleted here too, or shutting down.
            return;
        }
        let mut streams = self.streams.write().expect("registry lock");
        if streams
            .get(&stream.name)
            .is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            streams.remove(&stream.name);
            self.metrics.remove_stream(&stream.name);
        }
        tracing::info!(stream = %stream.name, "the stream was deleted through another server");
    }

    /// Stops the writers and housekeeping, waits for them, and makes
    /// everything durable. Call once no Append is in flight.
    pub async fn close(&self) -> Result<(), Error> {
        self.closing.cancel();
        // Writers stop between groups; each syncs what it wrote.
        let committer = self.committer.lock().expect("committer lock").take();
        self.streams.write().expect("registry lock").clear();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            warn!("log tasks did not stop within 10s");
        }
        if let Some(committer) = committer {
            let _ = tokio::task::spawn_blocking(move || committer.finish()).await;
        }
        let store = self.engine.clone();
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| Error::StorageFailed(e.to_string()))??;
        Ok(())
    }
}
