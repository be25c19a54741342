//! What the sidecar does for a caller on the network, as that caller: connections to
//! storage nodes per (workload identity, storage node), the storage nodes' decisions,
//! and the objects they gave (in memory for hand-off, and sealed in the cache).
//!
//! An object is served to a caller only after the storage node said yes to that caller's
//! identity for that object: a `stat` with the caller's SVID, whose answer (the manifest)
//! is reused for [`SidecarConfig::decision_ttl`], and never past a policy change the
//! storage node reports: each storage node's policy epoch is watched (`PolicyWatch`, one
//! outstanding per node), every change of epoch drops that node's decisions, and while the
//! watch is down no decision is reused at all. A `not_found` drops every decision held for
//! that identity there, and a push drops every decision on the object pushed. The manifest's root then names the
//! object in memory and in the cache, so a hit is the very content that node authorized.
//!
//! Objects several callers want at once are fetched once: the first fetches (holding the
//! root's lock), the others wait and find it in memory.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use certs::{SpiffeId, Svid, TrustBundle};
use libtransport::cache::{SealedCache, sealed_memfd};
use libtransport::clock::Clock;
use libtransport::error::{ConnectError, FetchError, PushError, RequestError};
use libtransport::metrics::SidecarCounters;
use libtransport::proto::{DatasetName, Digest, Manifest, ObjectPath};
use libtransport::sidecar::{LocalAnswer, LocalRequest, MAX_INLINE};
use libtransport::{
    Client, ClientConfig, Credentials, FetchOptions, IdentityHandle, Path, PushOptions,
};
use tokio::sync::{OnceCell, Semaphore};
use tracing::{debug, info, warn};

use crate::config::SidecarConfig;

/// Prefetches running at once; hints past them wait.
const PREFETCH_AT_ONCE: usize = 4;

/// Prefetches waiting or running at most, for all callers; hints past it are dropped (a
/// hint is a hint), and the answer's count says how many were taken.
const PREFETCH_QUEUE: usize = 1024;

/// Decisions held at most; past it, expired ones go, then all.
const MAX_DECISIONS: usize = 100_000;

/// A request served: the answer, its inline body, and the descriptor that goes with it.
#[derive(Debug)]
pub(super) struct Served {
    pub(super) answer: LocalAnswer,
    pub(super) body: Vec<u8>,
    pub(super) fd: Option<Arc<OwnedFd>>,
    /// Object bytes handed over (or pushed).
    pub(super) bytes: u64,
    /// `memory`, `cache`, `network` or `none`.
    pub(super) source: &'static str,
    /// The storage node asked.
    pub(super) node: Option<String>,
}

/// A request that failed, with the code the caller gets.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) node: Option<String>,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            node: None,
        }
    }

    fn at(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }
}

/// The storage side of the sidecar; cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Upstreams(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    storage: Vec<String>,
    storage_id: Option<SpiffeId>,
    paths: Vec<Path>,
    ttl: Duration,
    /// Largest object fetched whole.
    whole_limit: u64,
    node_identity: IdentityHandle,
    clock: Arc<dyn Clock>,
    counters: Arc<SidecarCounters>,
    cache: SealedCache,
    identities: Mutex<HashMap<SpiffeId, IdentityHandle>>,
    clients: Mutex<HashMap<(SpiffeId, String), Pooled>>,
    decisions: Mutex<HashMap<DecisionKey, Decision>>,
    /// Per storage node, what its policy watch says.
    watches: Mutex<HashMap<String, NodeWatch>>,
    memory: Mutex<MemoryTier>,
    inflight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// MiB of objects being fetched into memory at once.
    fetching: Arc<Semaphore>,
    /// Its size.
    fetch_mib: u32,
    prefetching: Arc<Semaphore>,
    /// Prefetches waiting or running.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// A connection for one (workload, storage node), made on first use.
type Pooled = Arc<OnceCell<Arc<Client>>>;

/// Whose yes, from which node, for which object.
type DecisionKey = (SpiffeId, String, DatasetName, ObjectPath);

/// A storage node's yes: the manifest it gave, when, and under which watch generation.
#[derive(Debug, Clone)]
struct Decision {
    manifest: Arc<Manifest>,
    at: Instant,
    generation: u64,
}

/// What the sidecar knows of a storage node's policy. Decisions are reused only while the
/// watch is live and its generation is the one they were made under; the generation moves
/// whenever the node reports another policy epoch and whenever the watch is lost or
/// regained.
#[derive(Debug, Default)]
struct NodeWatch {
    started: bool,
    live: bool,
    epoch: u64,
    generation: u64,
}

/// How long a lost policy watch waits before asking again, at most.
const WATCH_RETRY_MAX: Duration = Duration::from_secs(30);

impl Upstreams {
    /// Opens the cache (emptying what an earlier run left: its key is gone).
    pub(super) async fn open(
        cfg: &SidecarConfig,
        node_identity: IdentityHandle,
        clock: Arc<dyn Clock>,
        counters: Arc<SidecarCounters>,
    ) -> anyhow::Result<Self> {
        let (dir, budget) = (cfg.cache_dir.clone(), cfg.cache_bytes);
        let cache = tokio::task::spawn_blocking(move || SealedCache::open(&dir, budget)).await??;
        let whole_limit = cfg.max_object;
        let mib = u32::try_from(cfg.memory_bytes.div_ceil(1 << 20))
            .unwrap_or(u32::MAX)
            .clamp(1, Semaphore::MAX_PERMITS as u32);
        info!(
            cache_bytes = cfg.cache_bytes,
            memory_bytes = cfg.memory_bytes,
            "sidecar cache opened (sealed, empty)"
        );
        Ok(Self(Arc::new(Inner {
            storage: cfg.storage.clone(),
            storage_id: cfg.storage_id.clone(),
            paths: cfg.paths.clone(),
            ttl: cfg.decision_ttl,
            whole_limit,
            node_identity,
            clock,
            counters,
            cache,
            identities: Mutex::default(),
            clients: Mutex::default(),
            decisions: Mutex::default(),
            watches: Mutex::default(),
            memory: Mutex::new(MemoryTier::new(cfg.memory_bytes)),
            inflight: Mutex::default(),
            fetching: Arc::new(Semaphore::new(mib as usize)),
            fetch_mib: mib,
            prefetching: Arc::new(Semaphore::new(PREFETCH_AT_ONCE)),
            queued: Arc::default(),
        })))
    }

    /// Serves `req` for the workload holding `svid`; `fd` is what came with it.
    pub(super) async fn serve(
        &self,
        svid: &Svid,
        bundle: &TrustBundle,
        req: LocalRequest,
        fd: Option<OwnedFd>,
    ) -> Result<Served, Failure> {
        let node = self.pick(node_of(&req))?;
        let client = self
            .client(svid, bundle, &node)
            .await
            .map_err(|f| f.at(&node))?;
        let id = svid.id().clone();
        let served = self
            .0
            .serve_with(&self.clone(), &id, &node, &client, req, fd)
            .await;
        match served {
            Ok(mut s) => {
                s.node = Some(node);
                Ok(s)
            }
            Err(f) => {
                if f.code == "not_found" {
                    self.0.forget(&id, &node);
                }
                Err(f.at(&node))
            }
        }
    }

    /// The storage node a request names, which must be one of ours; the first by default.
    fn pick(&self, asked: Option<&str>) -> Result<String, Failure> {
        match asked {
            None => Ok(self.0.storage[0].clone()),
            Some(n) if self.0.storage.iter().any(|s| s == n) => Ok(n.to_owned()),
            Some(_) => Err(Failure::new(
                "invalid",
                "that storage node is not one this sidecar serves (see its [sidecar] storage)",
            )),
        }
    }

    /// The connection for (workload, node), made on first use with the workload's SVID,
    /// whose newest version it presents on reconnection.
    async fn client(
        &self,
        svid: &Svid,
        bundle: &TrustBundle,
        node: &str,
    ) -> Result<Arc<Client>, Failure> {
        let identity = self.identity(svid, bundle)?;
        let cell = lock(&self.0.clients)
            .entry((svid.id().clone(), node.to_owned()))
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let addr = tokio::net::lookup_host(node)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    Failure::new("unreachable", "the storage node's name does not resolve")
                })?;
            let mut config = ClientConfig::builder()
                .identity(identity)
                .clock(self.0.clock.clone());
            if let Some(id) = &self.0.storage_id {
                config = config.server_id(id.clone());
            }
            let client = Client::connect_any(config.build(), addr, &self.0.paths)
                .await
                .map_err(connect_failure)?;
            debug!(peer.id = %svid.id(), node, "sidecar connected to a storage node as a workload");
            let client = Arc::new(client);
            self.watch(node, &client);
            Ok(client)
        })
        .await
        .cloned()
    }

    /// Starts the policy watch on `node` (once per node) over `client`'s connection: it
    /// keeps a `PolicyWatch` outstanding and drops the node's decisions whenever the epoch
    /// moves or the watch is lost.
    fn watch(&self, node: &str, client: &Arc<Client>) {
        {
            let mut w = lock(&self.0.watches);
            let w = w.entry(node.to_owned()).or_default();
            if w.started {
                return;
            }
            w.started = true;
        }
        let (me, node, client) = (Arc::downgrade(&self.0), node.to_owned(), client.clone());
        tokio::spawn(async move {
            let mut known = 0;
            let mut backoff = Duration::from_millis(250);
            loop {
                let got = client.policy_watch(known).await;
                let Some(inner) = me.upgrade() else { return };
                match got {
                    Ok(epoch) => {
                        if inner.watched(&node, Some(epoch)) {
                            info!(node, "storage node's policy changed: its decisions dropped");
                        }
                        known = epoch;
                        backoff = Duration::from_millis(250);
                    }
                    Err(e) => {
                        inner.watched(&node, None);
                        debug!(node, error = %e, "policy watch lost; decisions not reused until it is back");
                        drop(inner);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(WATCH_RETRY_MAX);
                        known = 0;
                    }
                }
            }
        });
    }

    /// The identity handle of a workload, brought up to date with its newest SVID and the
    /// node's revocations.
    fn identity(&self, svid: &Svid, bundle: &TrustBundle) -> Result<IdentityHandle, Failure> {
        let revoked = self.0.node_identity.current().revoked().clone();
        let fresh = || {
            Credentials::new(svid.clone(), bundle.clone())
                .map(|c| c.with_revoked(revoked.clone()))
                .map_err(|e| {
                    warn!(error = %e, "a workload SVID the agent holds is unusable");
                    Failure::new("unavailable", "this workload's identity cannot be used now")
                })
        };
        let mut ids = lock(&self.0.identities);
        if let Some(h) = ids.get(svid.id()) {
            let cur = h.current();
            if cur.svid().serial() != svid.serial() || cur.revoked().len() != revoked.len() {
                h.update(fresh()?);
            }
            return Ok(h.clone());
        }
        let h = IdentityHandle::new(fresh()?);
        ids.insert(svid.id().clone(), h.clone());
        Ok(h)
    }
}

impl Inner {
    async fn serve_with(
        &self,
        me: &Upstreams,
        id: &SpiffeId,
        node: &str,
        client: &Arc<Client>,
        req: LocalRequest,
        fd: Option<OwnedFd>,
    ) -> Result<Served, Failure> {
        match req {
            LocalRequest::Datasets { .. } => {
                let names = client.list_datasets().await.map_err(request_failure)?;
                Ok(answer(LocalAnswer::Datasets {
                    names: names.iter().map(|n| n.as_str().to_owned()).collect(),
                }))
            }
            LocalRequest::List {
                dataset, prefix, ..
            } => {
                let ds = dataset_name(&dataset)?;
                let entries = client
                    .list_objects(&ds, &prefix)
                    .await
                    .map_err(request_failure)?;
                Ok(answer(LocalAnswer::Listing {
                    objects: entries
                        .into_iter()
                        .map(|e| (e.path.as_str().to_owned(), e.size))
                        .collect(),
                }))
            }
            LocalRequest::Stat {
                dataset, object, ..
            } => {
                let (ds, obj) = (dataset_name(&dataset)?, object_path(&object)?);
                let m = self.decide(id, node, client, &ds, &obj).await?;
                Ok(answer(LocalAnswer::Stat {
                    size: m.size(),
                    root: m.root().to_hex(),
                    chunk_bytes: u64::from(m.chunk_bytes()),
                    chunks: u64::from(m.chunk_count()),
                }))
            }
            LocalRequest::Read {
                dataset,
                object,
                start,
                end,
                ..
            } => {
                let (ds, obj) = (dataset_name(&dataset)?, object_path(&object)?);
                if end < start {
                    return Err(Failure::new("range", "the range ends before it starts"));
                }
                if end - start > MAX_INLINE {
                    return Err(Failure::new(
                        "too_large",
                        format!(
                            "a read comes inline, at most {MAX_INLINE} bytes: split it, or fetch the object"
                        ),
                    ));
                }
                let m = self.decide(id, node, client, &ds, &obj).await?;
                if end > m.size() {
                    return Err(Failure::new(
                        "range",
                        format!("the range ends past the object's {} bytes", m.size()),
                    ));
                }
                let held = lock(&self.memory).get(&m.root());
                let (body, source) = match held {
                    Some(fd) => (read_at(&fd, start, end)?, "memory"),
                    None => (
                        client
                            .read_range(&ds, &obj, start..end)
                            .await
                            .map_err(fetch_failure)?
                            .to_vec(),
                        "network",
                    ),
                };
                let n = body.len() as u64;
                Ok(Served {
                    answer: LocalAnswer::Inline { body: n },
                    body,
                    fd: None,
                    bytes: n,
                    source,
                    node: None,
                })
            }
            LocalRequest::Fetch {
                dataset, object, ..
            } => {
                let (ds, obj) = (dataset_name(&dataset)?, object_path(&object)?);
                let m = self.decide(id, node, client, &ds, &obj).await?;
                let (fd, source) = match self.object(client, &ds, &obj, &m).await {
                    Err(f) if f.code == "changed" => {
                        // The object changed since the decision: ask again, once.
                        self.forget_object(&ds, &obj);
                        let m = self.decide(id, node, client, &ds, &obj).await?;
                        let got = self.object(client, &ds, &obj, &m).await?;
                        return Ok(mapped(&m, got));
                    }
                    other => other?,
                };
                Ok(mapped(&m, (fd, source)))
            }
            LocalRequest::Push {
                dataset, object, ..
            } => {
                let (ds, obj) = (dataset_name(&dataset)?, object_path(&object)?);
                let Some(fd) = fd else {
                    return Err(Failure::new(
                        "invalid",
                        "a push comes with the file to push, as a descriptor",
                    ));
                };
                let file = File::from(fd);
                let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
                if !regular {
                    return Err(Failure::new(
                        "invalid",
                        "a push's descriptor must be a regular file or a memory file",
                    ));
                }
                let report = client
                    .push_open_file(&ds, &obj, file, &PushOptions::default())
                    .await
                    .map_err(push_failure)?;
                self.forget_object(&ds, &obj);
                Ok(Served {
                    answer: LocalAnswer::Pushed {
                        size: report.size,
                        root: report.root.to_hex(),
                    },
                    body: Vec::new(),
                    fd: None,
                    bytes: report.size,
                    source: "none",
                    node: None,
                })
            }
            LocalRequest::Prefetch { objects, .. } => {
                let mut count = 0;
                for (dataset, object) in objects.into_iter().take(super::MAX_PREFETCH) {
                    let (Ok(ds), Ok(obj)) = (dataset_name(&dataset), object_path(&object)) else {
                        continue;
                    };
                    if self.queued.fetch_add(1, Relaxed) >= PREFETCH_QUEUE {
                        self.queued.fetch_sub(1, Relaxed);
                        break;
                    }
                    count += 1;
                    let (me, id, node, client) =
                        (me.clone(), id.clone(), node.to_owned(), client.clone());
                    tokio::spawn(async move {
                        let _queued = Dequeue(me.0.queued.clone());
                        let Ok(_turn) = me.0.prefetching.clone().acquire_owned().await else {
                            return;
                        };
                        let got = match me.0.decide(&id, &node, &client, &ds, &obj).await {
                            Ok(m) => me.0.object(&client, &ds, &obj, &m).await.map(|_| ()),
                            Err(f) => Err(f),
                        };
                        if let Err(f) = got {
                            debug!(code = f.code, "sidecar prefetch did not complete");
                        }
                    });
                }
                Ok(answer(LocalAnswer::Prefetching { count }))
            }
        }
    }

    /// The storage node's answer to "may this identity read this object, and what is
    /// it", reused for the TTL.
    async fn decide(
        &self,
        id: &SpiffeId,
        node: &str,
        client: &Client,
        ds: &DatasetName,
        obj: &ObjectPath,
    ) -> Result<Arc<Manifest>, Failure> {
        let key = (id.clone(), node.to_owned(), ds.clone(), obj.clone());
        let now = self.clock.instant();
        // The generation before asking: a change reported while the stat is out makes
        // this answer stale at once.
        let (live, generation) = {
            let w = lock(&self.watches);
            w.get(node).map_or((false, 0), |w| (w.live, w.generation))
        };
        if live
            && let Some(d) = lock(&self.decisions).get(&key)
            && d.generation == generation
            && now.saturating_duration_since(d.at) < self.ttl
        {
            return Ok(d.manifest.clone());
        }
        let m = Arc::new(client.stat(ds, obj).await.map_err(request_failure)?);
        let mut d = lock(&self.decisions);
        if d.len() >= MAX_DECISIONS {
            let ttl = self.ttl;
            d.retain(|_, d| now.saturating_duration_since(d.at) < ttl);
            if d.len() >= MAX_DECISIONS {
                d.clear();
            }
        }
        if !self.ttl.is_zero() {
            d.insert(
                key,
                Decision {
                    manifest: m.clone(),
                    at: now,
                    generation,
                },
            );
        }
        Ok(m)
    }

    /// Takes a policy watch's answer (`None`: the watch failed); true when `node`'s
    /// decisions were dropped for a change of epoch.
    fn watched(&self, node: &str, epoch: Option<u64>) -> bool {
        let changed = {
            let mut w = lock(&self.watches);
            let w = w.entry(node.to_owned()).or_default();
            let moved = epoch.is_some_and(|e| w.live && w.epoch != e);
            let changed = match epoch {
                Some(e) => !w.live || w.epoch != e,
                None => w.live,
            };
            if changed {
                w.generation += 1;
            }
            w.live = epoch.is_some();
            w.epoch = epoch.unwrap_or(0);
            (changed, moved)
        };
        if changed.0 {
            lock(&self.decisions).retain(|(_, n, _, _), _| n != node);
        }
        changed.1
    }

    /// Drops the decisions held for `id` at `node`.
    fn forget(&self, id: &SpiffeId, node: &str) {
        lock(&self.decisions).retain(|(i, n, _, _), _| !(i == id && n == node));
    }

    /// Drops every decision on an object (it was pushed, or changed).
    fn forget_object(&self, ds: &DatasetName, obj: &ObjectPath) {
        lock(&self.decisions).retain(|(_, _, d, o), _| !(d == ds && o == obj));
    }

    /// The object `m` names, as a sealed memory file: from memory, from the sealed cache,
    /// or fetched (once, however many callers want it at the same time).
    async fn object(
        &self,
        client: &Client,
        ds: &DatasetName,
        obj: &ObjectPath,
        m: &Arc<Manifest>,
    ) -> Result<(Arc<OwnedFd>, &'static str), Failure> {
        let root = m.root();
        if let Some(fd) = lock(&self.memory).get(&root) {
            self.counters.hits.fetch_add(1, Relaxed);
            return Ok((fd, "memory"));
        }
        let turn = lock(&self.inflight).entry(root).or_default().clone();
        let _turn = turn.lock().await;
        let got = self.object_locked(client, ds, obj, m).await;
        let mut inflight = lock(&self.inflight);
        if inflight
            .get(&root)
            .is_some_and(|t| Arc::strong_count(t) <= 2)
        {
            inflight.remove(&root);
        }
        got
    }

    async fn object_locked(
        &self,
        client: &Client,
        ds: &DatasetName,
        obj: &ObjectPath,
        m: &Arc<Manifest>,
    ) -> Result<(Arc<OwnedFd>, &'static str), Failure> {
        let root = m.root();
        let size = m.size();
        if let Some(fd) = lock(&self.memory).get(&root) {
            self.counters.hits.fetch_add(1, Relaxed);
            return Ok((fd, "memory"));
        }
        if size > self.whole_limit {
            return Err(Failure::new(
                "too_large",
                format!(
                    "the object is {size} bytes, more than this sidecar hands over whole ({}); read it in ranges",
                    self.whole_limit
                ),
            ));
        }
        let cache = self.cache.clone();
        let opened = tokio::task::spawn_blocking(move || cache.get(&root).map(|e| e.to_memfd()))
            .await
            .map_err(|e| Failure::new("internal", e.to_string()))?;
        match opened {
            Some(Ok(fd)) => {
                self.counters.hits.fetch_add(1, Relaxed);
                let fd = Arc::new(fd);
                lock(&self.memory).insert(root, fd.clone(), size);
                return Ok((fd, "cache"));
            }
            Some(Err(e)) => warn!(error = %e, "sidecar cache entry unusable; fetching again"),
            None => {}
        }
        self.counters.misses.fetch_add(1, Relaxed);
        // Objects being fetched hold at most the memory budget at once; one larger than
        // the whole budget waits until it has the budget to itself.
        let mib = u32::try_from(size.div_ceil(1 << 20))
            .unwrap_or(u32::MAX)
            .clamp(1, self.fetch_mib);
        let _room = self
            .fetching
            .acquire_many(mib)
            .await
            .map_err(|_| Failure::new("unavailable", "the sidecar is stopping"))?;
        let data: Bytes = client
            .fetch(ds, obj, size, &FetchOptions::default())
            .await
            .map_err(fetch_failure)?;
        let (cache, manifest) = (self.cache.clone(), m.clone());
        let sealed = tokio::task::spawn_blocking(move || {
            // Verified against the manifest the storage node authorized: another content
            // (the object changed since) is not this decision's object.
            match cache.insert(&manifest, &data) {
                Ok(_) => {}
                Err(libtransport::cache::CacheError::Corrupt { .. }) => return Ok(None),
                Err(e) => warn!(error = %e, "sidecar cache cannot keep an object"),
            }
            sealed_memfd(&data).map(Some)
        })
        .await
        .map_err(|e| Failure::new("internal", e.to_string()))?
        .map_err(|e| Failure::new("internal", format!("memory file: {e}")))?;
        let stats = self.cache.stats();
        self.counters.evictions.store(stats.evictions, Relaxed);
        self.counters.cache_bytes.store(stats.bytes, Relaxed);
        let Some(fd) = sealed else {
            return Err(Failure::new(
                "changed",
                "the object changed while it was fetched; fetch it again",
            ));
        };
        let fd = Arc::new(fd);
        lock(&self.memory).insert(root, fd.clone(), size);
        Ok((fd, "network"))
    }
}

/// Takes a prefetch off the queue's count when it ends, however it ends.
struct Dequeue(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Dequeue {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Objects held open in memory for hand-off, least recently used going first past the
/// budget. A caller's descriptor keeps its object alive after it leaves here.
#[derive(Debug)]
pub(super) struct MemoryTier {
    budget: u64,
    used: u64,
    tick: u64,
    entries: HashMap<Digest, (Arc<OwnedFd>, u64, u64)>,
}

impl MemoryTier {
    fn new(budget: u64) -> Self {
        Self {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, root: &Digest) -> Option<Arc<OwnedFd>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(root).map(|(fd, _, last)| {
            *last = tick;
            fd.clone()
        })
    }

    fn insert(&mut self, root: Digest, fd: Arc<OwnedFd>, size: u64) {
        if size > self.budget || self.entries.contains_key(&root) {
            return;
        }
        while self.used + size > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, _, last))| *last)
                .map(|(r, _)| *r)
            else {
                break;
            };
            if let Some((_, s, _)) = self.entries.remove(&oldest) {
                self.used -= s;
            }
        }
        self.tick += 1;
        self.used += size;
        self.entries.insert(root, (fd, size, self.tick));
    }
}

fn answer(a: LocalAnswer) -> Served {
    Served {
        answer: a,
        body: Vec::new(),
        fd: None,
        bytes: 0,
        source: "none",
        node: None,
    }
}

fn mapped(m: &Manifest, (fd, source): (Arc<OwnedFd>, &'static str)) -> Served {
    Served {
        answer: LocalAnswer::Mapped {
            size: m.size(),
            root: m.root().to_hex(),
            cached: source != "network",
        },
        body: Vec::new(),
        fd: Some(fd),
        bytes: m.size(),
        source,
        node: None,
    }
}

/// Bytes `start..end` of a memory file.
fn read_at(fd: &OwnedFd, start: u64, end: u64) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0u8; (end - start) as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = rustix::io::pread(fd, &mut buf[done..], start + done as u64)
            .map_err(|e| Failure::new("internal", format!("memory file: {e}")))?;
        if n == 0 {
            return Err(Failure::new(
                "internal",
                "memory file shorter than its object",
            ));
        }
        done += n;
    }
    Ok(buf)
}

fn node_of(req: &LocalRequest) -> Option<&str> {
    match req {
        LocalRequest::Datasets { node }
        | LocalRequest::List { node, .. }
        | LocalRequest::Stat { node, .. }
        | LocalRequest::Read { node, .. }
        | LocalRequest::Fetch { node, .. }
        | LocalRequest::Push { node, .. }
        | LocalRequest::Prefetch { node, .. } => node.as_deref(),
    }
}

fn dataset_name(s: &str) -> Result<DatasetName, Failure> {
    DatasetName::new(s).map_err(|e| Failure::new("invalid", format!("dataset name: {e}")))
}

fn object_path(s: &str) -> Result<ObjectPath, Failure> {
    ObjectPath::new(s).map_err(|e| Failure::new("invalid", format!("object path: {e}")))
}

fn request_failure(e: RequestError) -> Failure {
    if let Some(code) = e.code() {
        let message = match code.label() {
            "not_found" => "no such object, or this workload may not read it".to_owned(),
            _ => e.to_string(),
        };
        return Failure::new(code.label(), message);
    }
    if e.is_connection() {
        return Failure::new("unreachable", format!("the storage node: {e}"));
    }
    Failure::new("protocol", e.to_string())
}

fn connect_failure(e: ConnectError) -> Failure {
    match e {
        ConnectError::Rejected(r) => Failure::new(
            "unauthenticated",
            format!("the storage node refused this workload's SVID: {r}"),
        ),
        ConnectError::ServerNotTrusted(why) => Failure::new(
            "server_not_trusted",
            format!("the storage node is not trusted: {why}"),
        ),
        ConnectError::Busy => Failure::new("busy", "the storage node is at its connection limit"),
        other if other.is_network() => Failure::new("unreachable", other.to_string()),
        other => Failure::new("unreachable", other.to_string()),
    }
}

fn fetch_failure(e: FetchError) -> Failure {
    match e {
        FetchError::Request(r) => request_failure(r),
        FetchError::Connect(c) => connect_failure(c),
        FetchError::Corrupt(i) => Failure::new("corrupt", format!("chunk {i} failed verification")),
        FetchError::TooLarge { .. } => Failure::new("too_large", e.to_string()),
        FetchError::Changed { .. } => Failure::new("changed", e.to_string()),
        FetchError::Range { .. } => Failure::new("range", e.to_string()),
        other => Failure::new("internal", other.to_string()),
    }
}

fn push_failure(e: PushError) -> Failure {
    match e {
        PushError::Request(r) => request_failure(r),
        PushError::Connect(c) => connect_failure(c),
        PushError::Corrupt(_) => Failure::new("corrupt", e.to_string()),
        PushError::Manifest(m) => Failure::new("invalid", m.to_string()),
        other => Failure::new("internal", other.to_string()),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd() -> Arc<OwnedFd> {
        Arc::new(sealed_memfd(b"x").unwrap())
    }

    fn root(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn the_memory_tier_keeps_its_budget_dropping_the_least_recently_used() {
        let mut t = MemoryTier::new(100);
        t.insert(root(1), memfd(), 40);
        t.insert(root(2), memfd(), 40);
        // 1 is used again, so 2 is the one to go for 3.
        assert!(t.get(&root(1)).is_some());
        t.insert(root(3), memfd(), 40);
        assert!(t.get(&root(2)).is_none());
        assert!(t.get(&root(1)).is_some() && t.get(&root(3)).is_some());
        assert_eq!(t.used, 80);
        // Larger than the whole budget: not held at all, and nothing evicted for it.
        t.insert(root(4), memfd(), 101);
        assert!(t.get(&root(4)).is_none());
        assert_eq!(t.used, 80);
        // The same root twice is held once.
        t.insert(root(1), memfd(), 40);
        assert_eq!(t.used, 80);
    }
}
