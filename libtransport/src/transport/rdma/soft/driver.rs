//! The software device's I/O: the handshake, the reader task (lands the peer's writes and
//! sends and answers them) and the writer task (sends our requests and answers, header and
//! payload in one vectored write, straight from the region's memory).
//!
//! Both tasks hold the [`Shared`] state; the `Verbs` calls change it too. A task that holds
//! a lease (the writer while writing, the reader while data lands) brings it back through a
//! guard, also when the task is cancelled, so a completion is never lost.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use super::queue::{Consumed, Outgoing, QueuePair};
use super::region::{Lease, RegionTable};
use super::wire::{
    self, AckStatus, HEADER_LEN, HELLO_CONFIRM, HELLO_LEN, HELLO_REPLY, Header, Info, Op,
};
use crate::transport::rdma::verbs::{
    BrokenReason, CompletionError, CompletionKind, InfoError, PeerMisbehaved, VerbsError,
};

/// State shared by the device handle and its two tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    /// This device's identity, which its regions carry.
    pub(crate) device: u64,
    pub(crate) regions: Arc<RegionTable>,
    /// The largest payload one request may carry.
    pub(crate) max_message: u32,
    qp: Mutex<QueuePair>,
    /// Wakes `poll` callers (all of them; each checks the queue).
    cq_ready: Notify,
    /// Wakes the writer (one task; a stored permit covers a wake-up before it waits).
    writer_wake: Notify,
    /// Set once: stop all I/O now.
    close: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(
        device: u64,
        regions: Arc<RegionTable>,
        max_message: u32,
        qp: QueuePair,
    ) -> Self {
        Self {
            device,
            regions,
            max_message,
            qp: Mutex::new(qp),
            cq_ready: Notify::new(),
            writer_wake: Notify::new(),
            close: watch::Sender::new(false),
        }
    }

    /// Runs `f` on the queue pair, then wakes the pollers and the writer.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut QueuePair) -> R) -> R {
        let result = f(&mut self.qp());
        self.cq_ready.notify_waiters();
        self.writer_wake.notify_one();
        result
    }

    /// The next completion, waiting for one.
    pub(crate) async fn poll(
        &self,
    ) -> Result<crate::transport::rdma::verbs::Completion, VerbsError> {
        loop {
            let notified = self.cq_ready.notified();
            tokio::pin!(notified);
            // Register before looking, so a completion queued in between still wakes us.
            notified.as_mut().enable();
            if let Some(result) = self.qp().poll() {
                return result;
            }
            notified.await;
        }
    }

    /// Moves to the error state and stops all I/O.
    pub(crate) fn disconnect(&self) {
        self.update(|qp| qp.break_with(BrokenReason::Disconnected));
        self.close.send_replace(true);
    }

    fn qp(&self) -> MutexGuard<'_, QueuePair> {
        // Every update leaves the queue pair consistent, so a panic elsewhere does not
        // poison it for us.
        self.qp.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Connects to the peer: the side with the smaller token dials, the other accepts on its
/// listener; the dialer presents both tokens.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    listener: &tokio::sync::Mutex<Option<TcpListener>>,
    own: Info,
    peer: Info,
    timeout: Duration,
) -> Result<(), VerbsError> {
    if own.token == peer.token {
        return Err(InfoError::Invalid("these are this device's own parameters").into());
    }
    shared.update(QueuePair::start_connect)?;
    let mut guard = ConnectGuard {
        shared,
        armed: true,
    };
    let stream = tokio::time::timeout(timeout, handshake(listener, own, peer))
        .await
        .map_err(|_| VerbsError::ConnectTimeout(timeout))??;
    stream.set_nodelay(true).map_err(VerbsError::Connect)?;
    shared.update(QueuePair::finish_connect)?;
    guard.armed = false;
    debug!(peer.addr = %peer.addr, "soft rdma queue pair connected");
    let (read, write) = stream.into_split();
    tokio::spawn(run_reader(Arc::clone(shared), read));
    tokio::spawn(run_writer(Arc::clone(shared), write));
    Ok(())
}

/// Puts the queue pair back to idle if `connect` fails or is cancelled.
struct ConnectGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for ConnectGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.update(QueuePair::abort_connect);
        }
    }
}

async fn handshake(
    listener: &tokio::sync::Mutex<Option<TcpListener>>,
    own: Info,
    peer: Info,
) -> Result<TcpStream, VerbsError> {
    if own.token < peer.token {
        let mut stream = TcpStream::connect(peer.addr)
            .await
            .map_err(VerbsError::Connect)?;
        stream
            .write_all(&wire::encode_hello(&own.token, &peer.token))
            .await
            .map_err(VerbsError::Connect)?;
        let mut reply = [0u8; HELLO_REPLY.len()];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(VerbsError::Connect)?;
        if reply != HELLO_REPLY {
            return Err(VerbsError::Connect(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer answered with something other than the soft device's handshake",
            )));
        }
        stream
            .write_all(&HELLO_CONFIRM)
            .await
            .map_err(VerbsError::Connect)?;
        return Ok(stream);
    }
    let mut slot = listener.lock().await;
    let Some(accepting) = slot.as_ref() else {
        return Err(VerbsError::AlreadyConnected);
    };
    loop {
        let (mut stream, from) = accepting.accept().await.map_err(VerbsError::Connect)?;
        match tokio::time::timeout(HELLO_TIMEOUT, accept_hello(&mut stream, own, peer)).await {
            Ok(Ok(true)) => {
                // Nobody else may connect any more.
                *slot = None;
                return Ok(stream);
            }
            Ok(Ok(false)) => {
                warn!(peer.addr = %from, "soft rdma device refused a connection without the expected tokens");
            }
            // A dialer that gave up (its attempt was still in the backlog), or a slow one.
            Ok(Err(_)) | Err(_) => {
                debug!(peer.addr = %from, "soft rdma handshake abandoned by the dialer");
            }
        }
    }
}

/// Checks a dialer's hello, answers it and waits for the confirmation: `Ok(false)` for a
/// stranger.
async fn accept_hello(stream: &mut TcpStream, own: Info, peer: Info) -> io::Result<bool> {
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).await?;
    if !wire::hello_matches(&hello, &peer.token, &own.token) {
        return Ok(false);
    }
    stream.write_all(&HELLO_REPLY).await?;
    let mut confirm = [0u8; HELLO_CONFIRM.len()];
    stream.read_exact(&mut confirm).await?;
    Ok(confirm == HELLO_CONFIRM)
}

/// Lands the peer's requests and acknowledgements until the connection ends or the device
/// closes.
async fn run_reader(shared: Arc<Shared>, read: OwnedReadHalf) {
    let mut close = shared.close.subscribe();
    let reason = tokio::select! {
        reason = read_loop(&shared, read) => reason,
        _ = close.wait_for(|closed| *closed) => BrokenReason::Disconnected,
    };
    if let BrokenReason::PeerMisbehaved(why) = &reason {
        warn!(error = %why, "soft rdma peer broke the protocol; connection closed");
    }
    shared.update(|qp| qp.break_with(reason));
}

async fn read_loop(shared: &Shared, read: OwnedReadHalf) -> BrokenReason {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let mut scratch = Vec::new();
    loop {
        let mut bytes = [0u8; HEADER_LEN];
        if let Err(e) = reader.read_exact(&mut bytes).await {
            return io_reason(&e);
        }
        let header = match Header::decode(&bytes, shared.max_message) {
            Ok(h) => h,
            Err(why) => return BrokenReason::PeerMisbehaved(why),
        };
        let broken = shared.qp().is_broken();
        let step = match header.op {
            // After the error state the peer's remaining traffic is read and dropped until
            // it closes too.
            _ if broken => discard(&mut reader, header.len, &mut scratch).await,
            Op::Ack => shared
                .update(|qp| qp.handle_ack(header.seq, header.status))
                .map_err(Stop::Misbehaved),
            Op::WriteImm => land_write(shared, &mut reader, header, &mut scratch).await,
            Op::Send => land_send(shared, &mut reader, header, &mut scratch).await,
        };
        match step {
            Ok(()) => {}
            Err(Stop::Io(e)) => return io_reason(&e),
            Err(Stop::Misbehaved(why)) => return BrokenReason::PeerMisbehaved(why),
        }
    }
}

/// Why the reader stops.
enum Stop {
    Io(io::Error),
    Misbehaved(PeerMisbehaved),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<PeerMisbehaved> for Stop {
    fn from(why: PeerMisbehaved) -> Self {
        Self::Misbehaved(why)
    }
}

/// The peer's WRITE_WITH_IMM: check the key and bounds, claim the range and a receive, land
/// the data, then complete the receive and acknowledge.
async fn land_write(
    shared: &Shared,
    reader: &mut BufReader<OwnedReadHalf>,
    h: Header,
    scratch: &mut Vec<u8>,
) -> Result<(), Stop> {
    let plan = {
        let mut qp = shared.qp();
        qp.begin_request(h.seq)?;
        plan_write(&mut qp, &shared.regions, &h)
    };
    let (mut target, recv) = match plan {
        Ok(planned) => planned,
        Err(status) => return refuse(shared, reader, h, status, None, scratch).await,
    };
    let held = HeldRecv::new(shared, recv);
    reader.read_exact(&mut target).await?;
    // The data is in place: free the range before the completion says so.
    drop(target);
    held.finish(
        CompletionKind::WriteWithImm {
            imm: h.imm,
            len: h.len,
        },
        Ok(()),
        |qp| qp.respond(h.seq, AckStatus::Ok),
    );
    Ok(())
}

fn plan_write(
    qp: &mut QueuePair,
    regions: &RegionTable,
    h: &Header,
) -> Result<(Lease, Consumed), AckStatus> {
    let region = regions.lookup(h.rkey).ok_or(AckStatus::UnknownKey)?;
    let range = region
        .offset_of(h.addr, u64::from(h.len))
        .ok_or(AckStatus::OutOfBounds)?;
    let target = Lease::take(&region, range).ok_or(AckStatus::RangeBusy)?;
    let recv = qp.consume_recv().ok_or(AckStatus::ReceiverNotReady)?;
    Ok((target, recv))
}

/// The peer's SEND: land it in the next posted receive.
async fn land_send(
    shared: &Shared,
    reader: &mut BufReader<OwnedReadHalf>,
    h: Header,
    scratch: &mut Vec<u8>,
) -> Result<(), Stop> {
    let recv = {
        let mut qp = shared.qp();
        qp.begin_request(h.seq)?;
        qp.consume_recv()
    };
    let Some(recv) = recv else {
        return refuse(
            shared,
            reader,
            h,
            AckStatus::ReceiverNotReady,
            None,
            scratch,
        )
        .await;
    };
    let len = h.len as usize;
    if len > recv.lease.len() {
        let failed = (recv, CompletionError::LocalLength);
        return refuse(shared, reader, h, AckStatus::TooLong, Some(failed), scratch).await;
    }
    let mut held = HeldRecv::new(shared, recv);
    reader.read_exact(&mut held.lease()[..len]).await?;
    held.finish(CompletionKind::Recv { len: h.len }, Ok(()), |qp| {
        qp.respond(h.seq, AckStatus::Ok);
    });
    Ok(())
}

/// Refuses the peer's request: its payload is read and dropped (memory stays untouched),
/// a consumed receive fails, the peer gets a NAK, and the queue pair goes to the error
/// state, as a reliable connection does.
async fn refuse(
    shared: &Shared,
    reader: &mut BufReader<OwnedReadHalf>,
    h: Header,
    status: AckStatus,
    failed_recv: Option<(Consumed, CompletionError)>,
    scratch: &mut Vec<u8>,
) -> Result<(), Stop> {
    debug!(
        ?status,
        bytes = h.len,
        "soft rdma refused a request from the peer"
    );
    shared.update(|qp| {
        if let Some((recv, error)) = failed_recv {
            qp.finish_recv(recv, CompletionKind::Recv { len: 0 }, Err(error));
        }
        qp.respond(h.seq, status);
        let error = status
            .into_result()
            .err()
            .unwrap_or(CompletionError::Flushed);
        qp.break_with(BrokenReason::RefusedPeerRequest(error));
    });
    discard(reader, h.len, scratch).await
}

async fn discard(
    reader: &mut BufReader<OwnedReadHalf>,
    len: u32,
    scratch: &mut Vec<u8>,
) -> Result<(), Stop> {
    let mut left = len as usize;
    if left > 0 && scratch.is_empty() {
        scratch.resize(DISCARD_CHUNK_BYTES, 0);
    }
    while left > 0 {
        let n = left.min(scratch.len());
        reader.read_exact(&mut scratch[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// A receive the reader consumed; gives it back (flushed) if the reader stops early.
struct HeldRecv<'a> {
    shared: &'a Shared,
    recv: Option<Consumed>,
}

impl<'a> HeldRecv<'a> {
    fn new(shared: &'a Shared, recv: Consumed) -> Self {
        Self {
            shared,
            recv: Some(recv),
        }
    }

    fn lease(&mut self) -> &mut [u8] {
        match &mut self.recv {
            Some(recv) => &mut recv.lease,
            None => &mut [],
        }
    }

    /// Completes the receive and runs `then` in the same update.
    fn finish(
        mut self,
        kind: CompletionKind,
        status: Result<(), CompletionError>,
        then: impl FnOnce(&mut QueuePair),
    ) {
        if let Some(recv) = self.recv.take() {
            self.shared.update(|qp| {
                qp.finish_recv(recv, kind, status);
                then(qp);
            });
        }
    }
}

impl Drop for HeldRecv<'_> {
    fn drop(&mut self) {
        if let Some(recv) = self.recv.take() {
            self.shared.update(|qp| {
                qp.finish_recv(
                    recv,
                    CompletionKind::Recv { len: 0 },
                    Err(CompletionError::Flushed),
                );
            });
        }
    }
}

/// Sends our requests and responses until the queue pair breaks (after the last NAK) or the
/// device closes.
async fn run_writer(shared: Arc<Shared>, write: OwnedWriteHalf) {
    let mut close = shared.close.subscribe();
    let result = tokio::select! {
        result = write_loop(&shared, write) => result,
        _ = close.wait_for(|closed| *closed) => Ok(()),
    };
    if let Err(e) = result {
        shared.update(|qp| qp.break_with(io_reason(&e)));
    }
}

async fn write_loop(shared: &Shared, mut write: OwnedWriteHalf) -> io::Result<()> {
    let mut acks = Vec::new();
    let mut headers = Vec::new();
    loop {
        let mut batch = Batch {
            shared,
            requests: Vec::new(),
        };
        let broken = {
            let mut qp = shared.qp();
            qp.take_outgoing(
                &mut acks,
                &mut batch.requests,
                MAX_BATCH_REQUESTS,
                MAX_BATCH_BYTES,
            );
            qp.is_broken()
        };
        if acks.is_empty() && batch.requests.is_empty() {
            if broken {
                // Everything owed is out: end our direction; the peer sees the close.
                return write.shutdown().await;
            }
            drop(batch);
            shared.writer_wake.notified().await;
            continue;
        }
        headers.clear();
        headers.extend(acks.drain(..).map(|h: Header| h.encode()));
        headers.extend(batch.requests.iter().map(|r| r.header.encode()));
        let acks_len = headers.len() - batch.requests.len();
        let mut slices = Vec::with_capacity(acks_len + 2 * batch.requests.len());
        slices.extend(headers[..acks_len].iter().map(|h| IoSlice::new(h)));
        for (header, request) in headers[acks_len..].iter().zip(&batch.requests) {
            slices.push(IoSlice::new(header));
            slices.push(IoSlice::new(&request.lease));
        }
        write_all_vectored(&mut write, &mut slices).await?;
    }
}

/// Requests the writer took; brings their leases back when dropped.
struct Batch<'a> {
    shared: &'a Shared,
    requests: Vec<Outgoing>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.requests.is_empty() {
            let requests = std::mem::take(&mut self.requests);
            self.shared.update(|qp| qp.return_outgoing(requests));
        }
    }
}

async fn write_all_vectored(
    write: &mut OwnedWriteHalf,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = write.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

fn io_reason(e: &io::Error) -> BrokenReason {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => BrokenReason::PeerClosed,
        kind => BrokenReason::Io(kind),
    }
}

/// How long an accepted connection has to present its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// The reader's buffer: headers and small payloads come through it; large payloads bypass it
/// and land directly in the region.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Refused payloads are read and dropped in pieces of this size.
const DISCARD_CHUNK_BYTES: usize = 64 << 10;

/// Requests per vectored write (two slices each, well below `IOV_MAX`).
const MAX_BATCH_REQUESTS: usize = 64;

/// Payload bytes per vectored write, so early requests' leases come back soon.
const MAX_BATCH_BYTES: usize = 8 << 20;
