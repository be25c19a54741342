//! An in-memory transport for protocol tests: no sockets, no TLS, time as tokio's clock
//! says (run tests with `start_paused = true` and it is virtual), and seeded faults.
//!
//! A [`SimNet`] holds listeners by address. Its [`SimConnector`] and [`SimListener`] plug
//! into the real client and server drivers ([`crate::Client::connect_with`],
//! [`crate::Server::with_listeners`]), so a test drives the real engine end to end. Each
//! side presents its real SVID chain, which the other side's driver verifies against its
//! bundle as for QUIC and TLS/TCP; only the TLS proof of key possession is missing, which is
//! no part of what these tests are about.
//!
//! Faults, set at any time and drawn from the net's seed, so a failing run repeats:
//! * [`SimNet::reset_data_frames`]: each server-to-client `Data` frame resets its stream
//!   instead, with the given probability (a reset in the middle of a chunk);
//! * [`SimNet::cut`]: every open connection is lost at once;
//! * [`SimNet::refuse_connections`]: new connections fail as if unreachable;
//! * [`SimNet::stall_client_reads`]: clients stop reading their streams, so the server's
//!   sends back up into bounded queues ([`SimNet::queued_high_water`] measures them);
//! * [`SimNet::skew_keying_material`]: the two ends of new connections export different
//!   keying material, so every sealed RDMA chunk fails to open, as one damaged in flight.
//!
//! RDMA sessions run over a sim connection too: each connection has a keying-material
//! exporter of its own (derived from the net's seed and the connection's number, the same
//! at both ends), and a loopback local address, so the software RDMA device binds on
//! 127.0.0.1. Its chunks then move over a real loopback socket; everything else stays in
//! memory.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{ConnectError, LostReason};
use crate::identity::{CredentialsEnd, IdentityHandle};
use crate::proto::connection::{HelloAnswer, ServerHello, handle_answer, hello_frame};
use crate::proto::{Frame, FrameKind, Hello};
use crate::transport::{
    BoxFuture, Close, Connection, Connector, Established, FrameSink, FrameSource, Handshaken,
    Incoming, IncomingStream, Listener, LostConnection, LostKind, NoKeyingMaterial, Path,
    PeerProof, RecvFrames, Refusal, RequestStream, SendFrames, StreamError,
};

/// A network of in-memory hosts with seeded faults.
#[derive(Debug, Clone)]
pub struct SimNet {
    shared: Arc<NetShared>,
}

#[derive(Debug)]
struct NetShared {
    seed: u64,
    rng: Mutex<u64>,
    listeners: Mutex<HashMap<SocketAddr, mpsc::Sender<SimIncoming>>>,
    /// Per million: how often a server's `Data` frame resets its stream instead.
    reset_per_million: AtomicU64,
    refuse: AtomicBool,
    /// New connections' two ends export different keying material.
    skew_keys: AtomicBool,
    /// Connections paired so far: each one's exporter secret is drawn from it.
    paired: AtomicU64,
    stall_reads: watch::Sender<bool>,
    /// Bumped by [`SimNet::cut`]: connections of older generations are lost.
    generation: watch::Sender<u64>,
    resets: AtomicU64,
    connections: AtomicU64,
    queued: AtomicUsize,
    queued_high: AtomicUsize,
}

impl SimNet {
    /// A quiet network whose faults, once asked for, are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            shared: Arc::new(NetShared {
                seed,
                rng: Mutex::new(seed | 1),
                listeners: Mutex::new(HashMap::new()),
                reset_per_million: AtomicU64::new(0),
                refuse: AtomicBool::new(false),
                skew_keys: AtomicBool::new(false),
                paired: AtomicU64::new(0),
                stall_reads: watch::Sender::new(false),
                generation: watch::Sender::new(0),
                resets: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                queued: AtomicUsize::new(0),
                queued_high: AtomicUsize::new(0),
            }),
        }
    }

    /// The seed, for a failing test to print.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// A listener at `addr` presenting the newest SVID of `identity` to each client.
    pub fn listen(&self, addr: SocketAddr, identity: IdentityHandle) -> SimListener {
        let (tx, rx) = mpsc::channel(MAX_PENDING_CONNECTIONS);
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr, tx);
        SimListener {
            addr,
            identity,
            incoming: rx,
        }
    }

    /// A connector presenting the newest SVID of `identity`.
    pub fn connector(&self, identity: IdentityHandle) -> SimConnector {
        SimConnector {
            net: self.clone(),
            identity,
            versions: None,
        }
    }

    /// From now on, each server `Data` frame resets its stream instead with probability
    /// `p` (0 to 1).
    pub fn reset_data_frames(&self, p: f64) {
        let per_million = (p.clamp(0.0, 1.0) * 1e6) as u64;
        self.shared
            .reset_per_million
            .store(per_million, Ordering::Relaxed);
    }

    /// Loses every connection open now.
    pub fn cut(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Makes new connections fail as unreachable (`true`), or succeed again.
    pub fn refuse_connections(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::Relaxed);
    }

    /// Makes the two ends of connections made from now on export different keying material
    /// (`true`), or the same again. Every sealed RDMA chunk of such a connection then fails
    /// to open at its receiver, as a chunk damaged in flight would.
    pub fn skew_keying_material(&self, skew: bool) {
        self.shared.skew_keys.store(skew, Ordering::Relaxed);
    }

    /// Makes clients stop reading their streams (`true`), or read again.
    pub fn stall_client_reads(&self, stall: bool) {
        self.shared.stall_reads.send_replace(stall);
    }

    /// Streams reset by [`Self::reset_data_frames`] so far.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }

    /// Connections made so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The most payload bytes ever queued in the network's streams at once.
    pub fn queued_high_water(&self) -> usize {
        self.shared.queued_high.load(Ordering::Relaxed)
    }

    /// A seeded draw: true with probability `per_million` / 1e6.
    fn draw(&self, per_million: u64) -> bool {
        if per_million == 0 {
            return false;
        }
        let mut x = self
            .shared
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // xorshift64*: small, deterministic, good enough to spread faults.
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        r % 1_000_000 < per_million
    }

    fn queue(&self, bytes: usize) {
        let now = self.shared.queued.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.shared.queued_high.fetch_max(now, Ordering::Relaxed);
    }

    fn dequeue(&self, bytes: usize) {
        self.shared.queued.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Connects over a [`SimNet`].
#[derive(Debug)]
pub struct SimConnector {
    net: SimNet,
    identity: IdentityHandle,
    /// The protocol versions its hello offers, if not this build's.
    versions: Option<(u16, u16)>,
}

impl SimConnector {
    /// Offers protocol versions `min` to `max` in its hello (a client of another build).
    pub fn speaking(mut self, min: u16, max: u16) -> Self {
        self.versions = Some((min, max));
        self
    }
}

impl Connector for SimConnector {
    fn path(&self) -> Path {
        Path::Quic
    }

    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, Result<Established, ConnectError>> {
        Box::pin(async move {
            let unreachable = || ConnectError::Unreachable {
                addr,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            };
            if self.net.shared.refuse.load(Ordering::Relaxed) {
                return Err(unreachable());
            }
            let listener = self
                .net
                .shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&addr)
                .cloned()
                .ok_or_else(unreachable)?;
            let (client, server) = SimConn::pair(&self.net);
            let (hello_tx, hello_rx) = oneshot::channel();
            let (answer_tx, answer_rx) = oneshot::channel();
            let (chain_tx, chain_rx) = oneshot::channel();
            let incoming = SimIncoming {
                conn: server,
                client_chain: self.identity.current().svid().chain().to_vec(),
                hello: hello_rx,
                answer: answer_tx,
                server_chain: chain_tx,
            };
            listener.send(incoming).await.map_err(|_| unreachable())?;
            let hello = match self.versions {
                Some((min_version, max_version)) => Frame::new(
                    FrameKind::Hello,
                    0,
                    Hello {
                        min_version,
                        max_version,
                    }
                    .encode(),
                ),
                None => hello_frame(),
            };
            let _ = hello_tx.send(hello);
            let lost = || ConnectError::Lost(LostReason::ServerClosed);
            let server_chain = chain_rx.await.map_err(|_| lost())?;
            let answer = answer_rx.await.map_err(|_| lost())?;
            let ack = handle_answer(&answer)?;
            self.net.shared.connections.fetch_add(1, Ordering::Relaxed);
            Ok(Established {
                connection: Arc::new(client),
                proof: PeerProof::chain(server_chain),
                ack,
            })
        })
    }
}

/// Accepts connections at one address of a [`SimNet`].
#[derive(Debug)]
pub struct SimListener {
    addr: SocketAddr,
    identity: IdentityHandle,
    incoming: mpsc::Receiver<SimIncoming>,
}

impl Listener for SimListener {
    fn path(&self) -> Path {
        Path::Quic
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        Some(self.addr)
    }

    fn accept(&mut self) -> BoxFuture<'_, Option<Box<dyn Incoming>>> {
        Box::pin(async {
            let mut incoming = self.incoming.recv().await?;
            // The server's chain as of this handshake: a rotation shows in the next one.
            incoming.conn.presented = self.identity.current().svid().chain().to_vec();
            Some(Box::new(incoming) as Box<dyn Incoming>)
        })
    }
}

struct SimIncoming {
    conn: SimConn,
    client_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    hello: oneshot::Receiver<Frame>,
    answer: oneshot::Sender<Frame>,
    server_chain: oneshot::Sender<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

impl Incoming for SimIncoming {
    fn remote_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40000)
    }

    fn refuse_busy(self: Box<Self>) -> BoxFuture<'static, ()> {
        let _ = self.server_chain.send(self.conn.presented.clone());
        let _ = self.answer.send(ServerHello::busy());
        Box::pin(async {})
    }

    fn handshake(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Handshaken>, Refusal>> {
        Box::pin(async move {
            let chain = self.conn.presented.clone();
            self.server_chain
                .send(chain)
                .map_err(|_| Refusal::new("peer went away during the handshake"))?;
            Ok(Box::new(SimHandshaken {
                conn: self.conn,
                client_chain: self.client_chain,
                hello: self.hello,
                answer: self.answer,
            }) as Box<dyn Handshaken>)
        })
    }
}

struct SimHandshaken {
    conn: SimConn,
    client_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    hello: oneshot::Receiver<Frame>,
    answer: oneshot::Sender<Frame>,
}

impl Handshaken for SimHandshaken {
    fn proof(&self) -> PeerProof {
        PeerProof::chain(self.client_chain.clone())
    }

    fn refuse(self: Box<Self>) {
        self.conn.close(Close::Shutdown);
    }

    fn busy(self: Box<Self>, _timeout: Duration) -> BoxFuture<'static, ()> {
        let _ = self.answer.send(ServerHello::busy());
        self.conn.close(Close::Shutdown);
        Box::pin(async {})
    }

    fn hello(
        self: Box<Self>,
        hello: ServerHello,
        timeout: Duration,
    ) -> BoxFuture<'static, Option<Arc<dyn Connection>>> {
        Box::pin(async move {
            let first = tokio::time::timeout(timeout, self.hello).await.ok()?.ok()?;
            let answer = hello.answer(&first);
            if let Some(frame) = answer.frame() {
                let _ = self.answer.send(frame.clone());
            }
            match answer {
                HelloAnswer::Accepted { .. } => Some(Arc::new(self.conn) as Arc<dyn Connection>),
                _ => {
                    self.conn.close(Close::Shutdown);
                    None
                }
            }
        })
    }
}

/// One side of an in-memory connection.
#[derive(Debug)]
struct SimConn {
    net: SimNet,
    is_client: bool,
    /// Streams we open reach the peer here.
    opens: mpsc::Sender<IncomingStream>,
    accepts: tokio::sync::Mutex<mpsc::Receiver<IncomingStream>>,
    state: Arc<ConnState>,
    /// The chain this side presents (the server's, filled in at accept).
    presented: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// This side's keying-material exporter secret (the same at both ends, unless skewed).
    exporter: ExporterSecret,
}

/// A connection's exporter secret; never printed.
#[derive(Clone, Copy)]
struct ExporterSecret([u8; 32]);

impl std::fmt::Debug for ExporterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExporterSecret(..)")
    }
}

/// What both sides of a connection share.
#[derive(Debug)]
struct ConnState {
    /// Why it closed, once it has.
    closed: watch::Sender<Option<Close>>,
    generation: u64,
}

impl SimConn {
    fn pair(net: &SimNet) -> (Self, Self) {
        let (to_server, from_client) = mpsc::channel(MAX_STREAMS_PENDING);
        let (to_client, from_server) = mpsc::channel(MAX_STREAMS_PENDING);
        let state = Arc::new(ConnState {
            closed: watch::Sender::new(None),
            generation: *net.shared.generation.borrow(),
        });
        let cut = state.clone();
        let mut generation = net.shared.generation.subscribe();
        tokio::spawn(async move {
            let mine = cut.generation;
            let lost = generation.wait_for(|g| *g != mine);
            let closed = async {
                let mut rx = cut.closed.subscribe();
                let _ = rx.wait_for(Option::is_some).await;
            };
            tokio::select! {
                _ = lost => { cut.closed.send_if_modified(|c| c.replace(Close::Done).is_none()); }
                () = closed => {}
            }
        });
        // Deterministic per connection, apart from the fault draws (which keep their
        // sequence): the seed and the connection's number.
        let n = net.shared.paired.fetch_add(1, Ordering::Relaxed);
        let mut seed = [0u8; 16];
        seed[..8].copy_from_slice(&net.shared.seed.to_le_bytes());
        seed[8..].copy_from_slice(&n.to_le_bytes());
        let exporter = blake3::derive_key("transportd sim connection exporter v1", &seed);
        let mut server_exporter = exporter;
        if net.shared.skew_keys.load(Ordering::Relaxed) {
            server_exporter[0] ^= 1;
        }
        let (exporter, server_exporter) =
            (ExporterSecret(exporter), ExporterSecret(server_exporter));
        let side = |is_client, opens, accepts, exporter| Self {
            net: net.clone(),
            is_client,
            opens,
            accepts: tokio::sync::Mutex::new(accepts),
            state: state.clone(),
            presented: Vec::new(),
            exporter,
        };
        (
            side(true, to_server, from_server, exporter),
            side(false, to_client, from_client, server_exporter),
        )
    }

    /// A stream pair: our halves, and the peer's.
    fn streams(&self) -> (RequestStream, RequestStream) {
        let (a_tx, a_rx) = mpsc::channel(STREAM_QUEUE_FRAMES);
        let (b_tx, b_rx) = mpsc::channel(STREAM_QUEUE_FRAMES);
        let half = |tx, rx, server_side: bool| RequestStream {
            sink: FrameSink::new(
                Box::new(SimSend {
                    tx: Some(tx),
                    net: self.net.clone(),
                    state: self.state.clone(),
                    faulty: server_side,
                }),
                IO_TIMEOUT,
            ),
            source: FrameSource::new(
                Box::new(SimRecv {
                    rx,
                    net: self.net.clone(),
                    state: self.state.clone(),
                    stalls: !server_side,
                }),
                IO_TIMEOUT,
            ),
        };
        (
            half(a_tx, b_rx, !self.is_client),
            half(b_tx, a_rx, self.is_client),
        )
    }

    fn lost(&self) -> StreamError {
        closed()
    }
}

impl Connection for SimConn {
    fn open(&self, request: Bytes) -> BoxFuture<'_, Result<RequestStream, StreamError>> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(self.lost());
            }
            let (mut ours, theirs) = self.streams();
            self.opens
                .send(IncomingStream {
                    first: None,
                    stream: theirs,
                })
                .await
                .map_err(|_| self.lost())?;
            ours.sink.send(FrameKind::Request, request).await?;
            Ok(ours)
        })
    }

    fn accept(&self) -> BoxFuture<'_, Option<IncomingStream>> {
        Box::pin(async move {
            let mut closed = self.state.closed.subscribe();
            let mut accepts = self.accepts.lock().await;
            tokio::select! {
                s = accepts.recv() => s,
                _ = closed.wait_for(Option::is_some) => None,
            }
        })
    }

    fn close(&self, reason: Close) {
        self.state
            .closed
            .send_if_modified(|c| c.replace(reason).is_none());
    }

    fn is_closed(&self) -> bool {
        self.state.closed.borrow().is_some()
    }

    fn closed_for_credentials(&self) -> Option<CredentialsEnd> {
        match *self.state.closed.borrow() {
            Some(Close::Credentials(end)) => Some(end),
            _ => None,
        }
    }

    fn is_going_away(&self) -> bool {
        matches!(*self.state.closed.borrow(), Some(Close::MaxAge))
    }

    fn export_keying_material(
        &self,
        out: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), NoKeyingMaterial> {
        // Not TLS's exporter, but like it a function of the connection's secret, the label
        // and the context, the same at both ends.
        let mut h = blake3::Hasher::new_keyed(&self.exporter.0);
        h.update(&(label.len() as u64).to_le_bytes());
        h.update(label);
        h.update(context);
        h.finalize_xof().fill(out);
        Ok(())
    }

    fn local_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }
}

enum Msg {
    Frame(Frame),
    Reset,
    Fin,
}

#[derive(Debug)]
struct SimSend {
    tx: Option<mpsc::Sender<Msg>>,
    net: SimNet,
    state: Arc<ConnState>,
    /// Whether faults apply (server-to-client streams).
    faulty: bool,
}

impl SendFrames for SimSend {
    fn send(&mut self, kind: FrameKind, payload: Bytes) -> BoxFuture<'_, Result<(), StreamError>> {
        Box::pin(async move {
            let lost = closed;
            if self.state.closed.borrow().is_some() {
                return Err(lost());
            }
            let tx = self.tx.as_ref().ok_or(StreamError::Reset(0))?;
            let reset = self.faulty
                && kind == FrameKind::Data
                && self
                    .net
                    .draw(self.net.shared.reset_per_million.load(Ordering::Relaxed));
            if reset {
                self.net.shared.resets.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Msg::Reset).await;
                self.tx = None;
                return Err(StreamError::Reset(0));
            }
            let len = payload.len();
            let mut closed = self.state.closed.subscribe();
            // A full queue is a peer that does not read: wait, as a socket would.
            let permit = tokio::select! {
                p = tx.reserve() => p.map_err(|_| StreamError::Reset(0))?,
                _ = closed.wait_for(Option::is_some) => return Err(lost()),
            };
            self.net.queue(len);
            permit.send(Msg::Frame(Frame::new(kind, 0, payload)));
            Ok(())
        })
    }

    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Msg::Fin);
        }
    }

    fn finish_delivered(&mut self) -> BoxFuture<'_, ()> {
        let tx = self.tx.take();
        Box::pin(async move {
            if let Some(tx) = tx {
                let _ = tx.send(Msg::Fin).await;
            }
        })
    }
}

#[derive(Debug)]
struct SimRecv {
    rx: mpsc::Receiver<Msg>,
    net: SimNet,
    state: Arc<ConnState>,
    /// Whether [`SimNet::stall_client_reads`] applies (client side).
    stalls: bool,
}

impl RecvFrames for SimRecv {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>, StreamError>> {
        Box::pin(async move {
            let lost = closed;
            let mut closed = self.state.closed.subscribe();
            if self.stalls {
                let mut stall = self.net.shared.stall_reads.subscribe();
                tokio::select! {
                    _ = stall.wait_for(|s| !*s) => {}
                    _ = closed.wait_for(Option::is_some) => return Err(lost()),
                }
            }
            let msg = tokio::select! {
                m = self.rx.recv() => m,
                _ = closed.wait_for(Option::is_some) => return Err(lost()),
            };
            match msg {
                Some(Msg::Frame(f)) => {
                    self.net.dequeue(f.payload.len());
                    Ok(Some(f))
                }
                Some(Msg::Reset) => Err(StreamError::Reset(0)),
                Some(Msg::Fin) => Ok(None),
                // The sender went away without a clean end.
                None => Err(StreamError::Reset(0)),
            }
        })
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Frame(fr) => write!(f, "Frame({:?}, {} bytes)", fr.kind, fr.payload.len()),
            Self::Reset => f.write_str("Reset"),
            Self::Fin => f.write_str("Fin"),
        }
    }
}

impl std::fmt::Debug for SimIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimIncoming").finish_non_exhaustive()
    }
}

/// Where [`crate::test_util::TestServer::start_sim`] listens.
pub const SERVER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7443);

/// Frames queued per stream direction: a peer that stops reading holds at most this many.
const STREAM_QUEUE_FRAMES: usize = 4;

/// Streams opened but not yet accepted, per connection.
const MAX_STREAMS_PENDING: usize = 64;

/// Connections waiting to be accepted, per listener.
const MAX_PENDING_CONNECTIONS: usize = 16;

/// The streams' I/O timeout: the library's default.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What a stream of a closed simulated connection fails with.
fn closed() -> StreamError {
    StreamError::ConnectionLost(LostConnection::with_detail(
        LostKind::Closed,
        "simulated connection closed",
    ))
}
