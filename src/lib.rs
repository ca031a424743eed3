//! Pullstream: ordered, durable event streams that consumers pull over gRPC.
//!
//! # Code map
//! - [`proto`]: the generated gRPC contract (`proto/pullstream/v1`).
//! - [`config`]: flags, environment and TOML file → validated [`config::ServerConfig`].
//! - [`durability`]: the write-ahead log (format, the scan that tells a
//!   torn tail from damage, the checkpoint marker), the free-space floor,
//!   and the fault-injection seam tests use.
//! - [`engine`]: the seam between the stream layer and storage: the
//!   [`engine::Engine`] trait, the opaque prepared change, and what crosses
//!   it (the engine-neutral records and their codec, `StorageError`).
//! - [`storage`]: the sled engine: key layout, the one commit path (log,
//!   then apply), recovery on open, checkpoints, `verify` and `repair`.
//! - [`log`]: streams on top of an engine: the registry, one writer per
//!   stream (the stream's actor), group commit, committed-head watch, tail
//!   cache, the one read path, subscriptions, durable consumers (cursors and
//!   takeover leases), key-shared consumer groups, event filters, and
//!   retention (trimmed by each stream's writer).
//! - [`auth`]: API keys, tenants, scopes: who may call what, on which
//!   streams.
//! - [`api`]: the gRPC services (`EventLog`, `ApiKeys`): handlers,
//!   conversions, the subscription loop, the append pipeline loop; maps
//!   [`error::Error`] to status codes in one place.
//! - [`http`]: the HTTP JSON API (`/v1`: pages, long-polls, Server-Sent
//!   Events, streams, consumers, status), a shell over `api`'s calls,
//!   served on the gRPC listener.
//! - [`metrics`]: Prometheus metrics, per server, with bounded labels that
//!   name no tenant's streams unless asked.
//! - [`clock`]: the wall clock every comparison with stored times reads
//!   (real time; tests move it forward instead of sleeping).
//! - [`names`]: the one naming rule (streams, consumers, groups, members,
//!   tenants) and how a tenant's stream is named in storage.
//! - [`server`]: opens the log, serves gRPC (with health and reflection)
//!   and the metrics endpoint, shuts down gracefully.
//! - [`client`]: how a program reaches a server (endpoint, TLS, API-key
//!   header, typed clients); used by the CLI and the benchmark.
//! - [`cli`]: the `pullstream` command line (server and client commands).
//! - [`bench`]: `pullstream bench`, the load generator behind the README's figures.
//!
//! # Architecture invariants
//! - Only `storage` knows sled, and the stream layer, the API and auth
//!   reach it only through `engine` (only `Log::open` and the offline
//!   tools name `storage`); only `proto` (the generated code and its
//!   codec), `api`, `server`, `client`, `cli` and `bench` know tonic;
//!   a gRPC status is built only by the one `From<Error> for Status` in
//!   `api`. (All four are checked on the source by
//!   `tests/integration/invariants.rs`.) Modules import one another
//!   without cycles.
//! - A call is authenticated from its headers before its body is read
//!   (`server::admission`), so a client without a key cannot make the
//!   server buffer its messages.
//! - Only a stream's writer assigns offsets, so offsets are dense and ordered;
//!   it also writes the stream's consumer cursors, so they are ordered with
//!   the stream's deletion.
//! - Readers never read past the committed head: an event is visible only
//!   once it is durable under the durability mode, so an offset a consumer
//!   saw is never reused, even after a crash.
//! - Writers never wait for readers: subscribers follow the head through a
//!   `watch` channel and read at their own pace.
//! - Every change that must survive goes through `Engine::commit` (the
//!   sled store's one commit path): in
//!   `fsync` mode it is appended to the write-ahead log and synced first,
//!   and applied to sled only then, so nothing is acknowledged before its
//!   record is synced and a change whose write failed never reaches sled.
//!   The only sled writes outside it are a checkpoint's own marker key and
//!   sled's own flushes, and log files are deleted only once a durable
//!   checkpoint covers them.
//! - After a failed write (other than a full disk's, which is rolled
//!   back) or a failed sync, the store refuses every write until the
//!   process restarts; reads go on. After a full disk's rolled-back write,
//!   no change decided before it is written (the committer's epoch), and
//!   each writer reloads its state from the engine before its next change,
//!   so offsets stay dense. Damage in the log other than a torn tail stops
//!   the server from starting: loss is reported, never skipped.

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod durability;
pub mod engine;
pub mod error;
pub mod http;
pub mod jetstream;
pub mod log;
pub mod metrics;
pub mod names;
pub mod proto;
pub mod server;
pub mod storage;
