//! Numbered request streams over one byte stream, for TLS/TCP (and plug-in transports over
//! other byte streams, such as the bench's plaintext baseline).
//!
//! Opening: the client writes its hello as stream 0 ([`hello`]), the server answers it
//! ([`serve`]), and only then do both start the multiplexer ([`start_client`]), which needs
//! the stream limit the answer announced.
//!
//! One reader task decodes frames and routes them by stream number into small bounded
//! queues; one writer task drains a bounded queue of outgoing frames into the connection
//! with vectored writes (header and payload together, so TLS never makes a 12-byte record).
//! A slow consumer fills its queue, which stalls the reader, which stalls TCP: backpressure
//! reaches the peer and memory stays bounded.
//!
//! Rules: clients open streams with increasing odd numbers by sending a `Request`, and the
//! numbers reach the wire in increasing order (a client assigns the number and queues the
//! `Request` under one lock), so a server can tell a new stream from a late frame of a
//! finished one by the highest number it has seen. At most `max_streams` are open at once
//! (the server announced it in `HelloAck`); a client that exceeds it breaks the protocol.
//! The server's `Response`, `End` and `Error` frames end a stream, and every stream ends
//! with one of them; the server forgets a stream before queueing its last frame, so the
//! client may reuse the slot once it has read that frame. A client abandons a stream with
//! `Cancel` and keeps its slot until the server's last frame for it arrives. Frames for
//! forgotten streams are dropped. A server retiring the connection (its maximum age) sends
//! `GoAway` on stream 0: the client opens no further streams on it, and those in flight go
//! on until the server closes.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, trace};

use super::{
    BoxFuture, Close, Connection, FrameSink, FrameSource, IncomingStream, LostConnection, LostKind,
    RecvFrames, RequestStream, SendFrames, StreamError,
};
use crate::proto::connection::{HelloAnswer, ServerHello};
use crate::proto::frame::HEADER_LEN;
use crate::proto::{Frame, FrameError, FrameHeader, FrameKind, HelloAck};

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

/// State shared by the reader, the writer and every stream of one connection.
#[derive(Debug)]
pub(crate) struct Shared {
    role: Role,
    table: Mutex<Table>,
    /// Why the connection ended, once it has.
    error: OnceLock<String>,
    out: mpsc::Sender<Frame>,
    timeout: Duration,
    /// Flips to true when the connection ends, waking the reader and the writer.
    closed: watch::Sender<bool>,
    /// Client: set once the server said `GoAway` (it takes no new streams here).
    going_away: AtomicBool,
}

#[derive(Debug, Default)]
struct Table {
    streams: HashMap<u32, mpsc::Sender<Frame>>,
    max_seen: u32,
    /// Client: slots of abandoned streams, held until the server ends them.
    draining: HashMap<u32, OwnedSemaphorePermit>,
}

impl Shared {
    fn forget(&self, id: u32) {
        self.lock().streams.remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, why: String) {
        if self.error.set(why).is_ok() {
            // Dropping every queue wakes every stream with "connection lost".
            let mut table = self.lock();
            table.streams.clear();
            table.draining.clear();
            drop(table);
            self.closed.send_replace(true);
        }
    }

    async fn wait_closed(&self) {
        let mut rx = self.closed.subscribe();
        // An error means the sender is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    fn lost(&self) -> StreamError {
        StreamError::ConnectionLost(match self.error.get() {
            Some(why) => LostConnection::with_detail(LostKind::Closed, why.clone()),
            None => LostConnection::new(LostKind::Closed),
        })
    }

    /// True once the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.error.get().is_some() || self.out.is_closed()
    }

    /// Ends the connection; frames already queued are still written.
    pub(crate) fn close(&self, why: &str) {
        self.fail(why.to_owned());
    }
}

/// The client's handle on a multiplexed connection. The connection closes when the last
/// clone is dropped.
#[derive(Debug, Clone)]
struct MuxClient {
    shared: Arc<Shared>,
    /// The next stream number; held while a `Request` is queued, so numbers leave in order.
    next_id: Arc<tokio::sync::Mutex<u32>>,
    slots: Arc<Semaphore>,
    _close: Arc<CloseOnDrop>,
}

#[derive(Debug)]
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.fail("closed by this side".into());
    }
}

impl MuxClient {
    /// Opens a stream by sending `request`, waiting while `max_streams` are open.
    async fn open(&self, request: Bytes) -> Result<RequestStream, StreamError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.shared.lost())?;
        if self.shared.going_away.load(Ordering::Relaxed) {
            return Err(StreamError::ConnectionLost(LostConnection::new(
                LostKind::GoingAway,
            )));
        }
        let mut next = self.next_id.lock().await;
        // A place in the write queue first, so the number is spent only if the frame goes.
        let queued = self
            .shared
            .out
            .reserve()
            .await
            .map_err(|_| self.shared.lost())?;
        if self.shared.is_closed() {
            return Err(self.shared.lost());
        }
        let id = *next;
        *next = next.checked_add(2).ok_or_else(|| {
            StreamError::ConnectionLost(LostConnection::new(LostKind::StreamsExhausted))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_FRAMES);
        self.shared.lock().streams.insert(id, tx);
        queued.send(Frame::new(FrameKind::Request, id, request));
        drop(next);
        Ok(stream_pair(&self.shared, id, rx, Some(permit)))
    }
}

impl Connection for MuxClient {
    fn open(&self, request: Bytes) -> BoxFuture<'_, Result<RequestStream, StreamError>> {
        Box::pin(Self::open(self, request))
    }

    fn accept(&self) -> BoxFuture<'_, Option<IncomingStream>> {
        // Servers open no streams.
        Box::pin(async {
            self.shared.wait_closed().await;
            None
        })
    }

    fn close(&self, reason: Close) {
        self.shared.close(reason.reason());
    }

    fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    fn is_going_away(&self) -> bool {
        self.shared.going_away.load(Ordering::Relaxed)
    }
}

/// The server's handle on a multiplexed connection: new streams arrive, with their
/// `Request` frame, from the reader task. Dropping it ends the connection.
#[derive(Debug)]
struct MuxServer {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<(Frame, RequestStream)>>,
}

impl Connection for MuxServer {
    fn open(&self, _request: Bytes) -> BoxFuture<'_, Result<RequestStream, StreamError>> {
        Box::pin(async {
            Err(StreamError::ConnectionLost(LostConnection::new(
                LostKind::ServerOpensNoStreams,
            )))
        })
    }

    fn accept(&self) -> BoxFuture<'_, Option<IncomingStream>> {
        Box::pin(async {
            let (frame, stream) = self.incoming.lock().await.recv().await?;
            Some(IncomingStream {
                first: Some(frame),
                stream,
            })
        })
    }

    fn close(&self, reason: Close) {
        self.shared.close(reason.reason());
    }

    fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    fn go_away(&self) {
        // Queued behind the frames already queued, at once where there is room, so a close
        // right after (no requests in flight) still sends it first.
        let frame = Frame::new(FrameKind::GoAway, 0, Bytes::new());
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.shared.out.try_send(frame) {
            let (out, timeout) = (self.shared.out.clone(), self.shared.timeout);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(timeout, out.send(frame)).await;
            });
        }
    }
}

impl Drop for MuxServer {
    fn drop(&mut self) {
        self.shared.fail("closed by this side".into());
    }
}

/// The sending half of a multiplexed stream.
#[derive(Debug)]
struct MuxSink {
    id: u32,
    shared: Arc<Shared>,
}

impl MuxSink {
    async fn send(&mut self, kind: FrameKind, payload: Bytes) -> Result<(), StreamError> {
        if payload.len() > crate::proto::frame::MAX_FRAME_PAYLOAD as usize {
            return Err(FrameError::TooLarge {
                len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                max: crate::proto::frame::MAX_FRAME_PAYLOAD,
            }
            .into());
        }
        if self.shared.role == Role::Server && ends_stream(kind) {
            self.shared.forget(self.id);
        }
        self.shared
            .out
            .send(Frame::new(kind, self.id, payload))
            .await
            .map_err(|_| self.shared.lost())
    }
}

impl SendFrames for MuxSink {
    fn send(&mut self, kind: FrameKind, payload: Bytes) -> BoxFuture<'_, Result<(), StreamError>> {
        Box::pin(Self::send(self, kind, payload))
    }

    // Frames go out in order through one queue, and the writer sends what is queued before
    // it closes the connection: finishing needs nothing, delivery needs no wait.
    fn finish(&mut self) {}

    fn finish_delivered(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The receiving half of a multiplexed stream.
#[derive(Debug)]
struct MuxSource {
    id: u32,
    rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
    /// Set once the stream's last frame arrived (client side).
    ended: bool,
    slot: Option<OwnedSemaphorePermit>,
}

impl MuxSource {
    async fn recv(&mut self) -> Result<Option<Frame>, StreamError> {
        match self.rx.recv().await {
            Some(f) => {
                if self.shared.role == Role::Client && ends_stream(f.kind) {
                    self.ended = true;
                }
                Ok(Some(f))
            }
            None => Err(self.shared.lost()),
        }
    }

    fn try_recv_cancel(&mut self) -> bool {
        matches!(self.rx.try_recv(), Ok(f) if f.kind == FrameKind::Cancel)
    }
}

impl RecvFrames for MuxSource {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Frame>, StreamError>> {
        Box::pin(Self::recv(self))
    }

    fn try_recv_cancel(&mut self) -> bool {
        Self::try_recv_cancel(self)
    }
}

impl Drop for MuxSource {
    fn drop(&mut self) {
        let abandoned = self.shared.role == Role::Client && !self.ended && !self.shared.is_closed();
        let mut table = self.shared.lock();
        table.streams.remove(&self.id);
        if abandoned {
            // The server may still be working on it: tell it to stop, and keep the slot
            // until its last frame says it has.
            if let Some(slot) = self.slot.take() {
                table.draining.insert(self.id, slot);
            }
            drop(table);
            let _ = self
                .shared
                .out
                .try_send(Frame::new(FrameKind::Cancel, self.id, Bytes::new()));
        }
    }
}

fn stream_pair(
    shared: &Arc<Shared>,
    id: u32,
    rx: mpsc::Receiver<Frame>,
    slot: Option<OwnedSemaphorePermit>,
) -> RequestStream {
    RequestStream {
        sink: FrameSink::new(
            Box::new(MuxSink {
                id,
                shared: shared.clone(),
            }),
            shared.timeout,
        ),
        source: FrameSource::new(
            Box::new(MuxSource {
                id,
                rx,
                shared: shared.clone(),
                ended: false,
                slot,
            }),
            shared.timeout,
        ),
    }
}

/// The client's hello over `io`: writes it as stream 0 and reads the server's answer.
/// An I/O error is returned as such, so a TLS alert in it can be read.
pub async fn hello<S>(io: &mut S) -> std::io::Result<Option<Frame>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    write_frame(io, &crate::proto::connection::hello_frame()).await?;
    io.flush().await?;
    read_frame(io).await
}

/// Starts the client side over `io` (after [`hello`]) with the stream limit of `ack`:
/// every stream's sends and receives fail after `timeout` without progress; the reader
/// reads the byte stream through a buffer of `read_buffer` bytes.
pub fn start_client<S>(
    io: S,
    ack: &HelloAck,
    timeout: Duration,
    read_buffer: usize,
) -> Arc<dyn Connection>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let max_streams = ack.max_streams;
    let (shared, reader, writer) = start(io, Role::Client, timeout, read_buffer);
    tokio::spawn(read_loop(reader, shared.clone(), None, max_streams));
    tokio::spawn(writer);
    Arc::new(MuxClient {
        _close: Arc::new(CloseOnDrop(shared.clone())),
        shared,
        next_id: Arc::new(tokio::sync::Mutex::new(1)),
        slots: Arc::new(Semaphore::new(max_streams.max(1) as usize)),
    })
}

/// The server side over `io`: reads the client's hello within `hello_timeout`, sends what
/// `hello` answers, and if it accepted, starts the multiplexer with its stream limit
/// (streams as in [`start_client`]). `None` when the client sent no acceptable hello; the
/// byte stream is then dropped.
pub async fn serve<S>(
    mut io: S,
    hello: ServerHello,
    hello_timeout: Duration,
    timeout: Duration,
    read_buffer: usize,
) -> Option<Arc<dyn Connection>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let first = match tokio::time::timeout(hello_timeout, read_frame(&mut io)).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) | Err(_) => {
            debug!("no hello; closing");
            return None;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before hello");
            return None;
        }
    };
    let answer = hello.answer(&first);
    let frame = answer.frame()?;
    if write_frame(&mut io, frame).await.is_err() || io.flush().await.is_err() {
        return None;
    }
    let HelloAnswer::Accepted { .. } = answer else {
        return None;
    };
    let max_streams = hello.max_streams;
    let (shared, reader, writer) = start(io, Role::Server, timeout, read_buffer);
    let (tx, rx) = mpsc::channel(max_streams.max(1) as usize);
    tokio::spawn(read_loop(reader, shared.clone(), Some(tx), max_streams));
    tokio::spawn(writer);
    Some(Arc::new(MuxServer {
        shared,
        incoming: tokio::sync::Mutex::new(rx),
    }))
}

type Reader<S> = FrameReader<tokio::io::ReadHalf<S>>;

fn start<S>(
    io: S,
    role: Role,
    timeout: Duration,
    read_buffer: usize,
) -> (
    Arc<Shared>,
    Reader<S>,
    impl Future<Output = ()> + Send + 'static,
)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(WRITE_QUEUE_FRAMES);
    let shared = Arc::new(Shared {
        role,
        table: Mutex::new(Table::default()),
        error: OnceLock::new(),
        out: out_tx,
        timeout,
        closed: watch::Sender::new(false),
        going_away: AtomicBool::new(false),
    });
    let writer = write_loop(wr, out_rx, shared.clone());
    (shared, FrameReader::new(rd, read_buffer), writer)
}

async fn read_loop<S>(
    mut rd: Reader<S>,
    shared: Arc<Shared>,
    incoming: Option<mpsc::Sender<(Frame, RequestStream)>>,
    max_streams: u32,
) where
    S: AsyncRead + Send + Unpin,
{
    let why = loop {
        let read = tokio::select! {
            r = rd.next() => r,
            () = shared.wait_closed() => return,
        };
        let frame = match read {
            Ok(Some(f)) => f,
            Ok(None) => break "peer closed the connection".to_owned(),
            Err(e) => {
                if shared.role == Role::Server
                    && let Some(code) = frame_error_code(&e)
                {
                    // Framing is lost for the whole byte stream: say why on stream 0 (the
                    // writer sends queued frames before it notices the close), then end.
                    let _ = shared
                        .out
                        .try_send(Frame::new(FrameKind::Error, 0, code.encode()));
                }
                break io_reason(&e);
            }
        };
        trace!(kind = ?frame.kind, stream = frame.stream, bytes = frame.payload.len(), "frame in");
        if let Err(why) = route(&shared, incoming.as_ref(), max_streams, frame).await {
            break why;
        }
    };
    debug!(reason = %why, "multiplexed connection ended");
    shared.fail(why);
}

async fn route(
    shared: &Arc<Shared>,
    incoming: Option<&mpsc::Sender<(Frame, RequestStream)>>,
    max_streams: u32,
    frame: Frame,
) -> Result<(), String> {
    if frame.stream == 0 {
        return match (shared.role, frame.kind) {
            (Role::Client, FrameKind::Error) => Err(format!(
                "server ended the connection: {}",
                crate::proto::ErrorCode::decode(&frame.payload)
                    .map(|c| c.describe())
                    .unwrap_or("malformed error")
            )),
            (Role::Client, FrameKind::GoAway) => {
                // Streams in flight go on; new ones go on a fresh connection.
                debug!("server is retiring the connection");
                shared.going_away.store(true, Ordering::Relaxed);
                Ok(())
            }
            (Role::Server, FrameKind::GoAway) => Err("peer is going away".into()),
            (_, k) => Err(format!("protocol violation: {k:?} frame on stream 0")),
        };
    }
    let existing = shared.lock().streams.get(&frame.stream).cloned();
    if let Some(tx) = existing {
        if frame.kind == FrameKind::Request {
            return Err("protocol violation: request on an open stream".into());
        }
        // A closed queue means the stream's owner is gone: drop the frame.
        let _ = tx.send(frame).await;
        return Ok(());
    }
    let Some(incoming) = incoming else {
        // Client: a frame for a stream we abandoned; its last one frees the slot.
        if ends_stream(frame.kind) {
            shared.lock().draining.remove(&frame.stream);
        }
        return Ok(());
    };
    let id = frame.stream;
    let rx = {
        let mut table = shared.lock();
        if id <= table.max_seen {
            // A stream the server already finished; the client may still be sending.
            return Ok(());
        }
        if frame.kind != FrameKind::Request || id.is_multiple_of(2) {
            return Err(format!(
                "protocol violation: {:?} opens stream {id}",
                frame.kind
            ));
        }
        if table.streams.len() >= max_streams as usize {
            return Err(format!(
                "protocol violation: more than {max_streams} streams open"
            ));
        }
        table.max_seen = id;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_FRAMES);
        table.streams.insert(id, tx);
        rx
    };
    let pair = stream_pair(shared, id, rx, None);
    incoming
        .send((frame, pair))
        .await
        .map_err(|_| "server stopped accepting".to_owned())
}

/// Reads a byte stream's frames into buffers of its own: each frame's payload is a view of
/// the buffer the bytes were read into, so a frame costs neither a copy nor an allocation of
/// its own. Reads stop at the end of a large frame, so its successor starts a fresh region
/// rather than straddling the end of the buffer (which would copy it when the buffer grows).
pub(crate) struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    /// Bytes asked for per read when no large frame is pending.
    read_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads `rd` in reads of `read_size` bytes (at least 4 KiB) between large frames.
    pub(crate) fn new(rd: R, read_size: usize) -> Self {
        let read_size = read_size.clamp(4 << 10, SMALL_READ_BYTES);
        Self {
            rd,
            buf: BytesMut::with_capacity(read_size),
            read_size,
        }
    }

    /// The next frame; `None` on a clean end of stream at a frame boundary. An invalid frame
    /// is an `InvalidData` error wrapping the [`FrameError`].
    pub(crate) async fn next(&mut self) -> std::io::Result<Option<Frame>> {
        use std::io::{Error, ErrorKind};
        loop {
            match Frame::decode(&mut self.buf) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(Error::new(ErrorKind::InvalidData, e)),
            }
            // The rest of the frame whose header is in, or a read's worth for the next one.
            let header = FrameHeader::decode(&self.buf).ok();
            let n = match header {
                Some(h) if h.len as usize + HEADER_LEN - self.buf.len() > self.read_size => {
                    let rest = h.len as usize + HEADER_LEN - self.buf.len();
                    self.buf.reserve(rest);
                    (&mut self.rd)
                        .take(rest as u64)
                        .read_buf(&mut self.buf)
                        .await?
                }
                _ => {
                    self.buf.reserve(self.read_size);
                    self.rd.read_buf(&mut self.buf).await?
                }
            };
            if n == 0 {
                return match (self.buf.is_empty(), header) {
                    (true, _) => Ok(None),
                    (false, None) => Err(Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection ended inside a frame header",
                    )),
                    (false, Some(_)) => Err(Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection ended inside a frame",
                    )),
                };
            }
        }
    }
}

/// Reads one frame, reading nothing past it (for the hello, before the multiplexer takes the
/// byte stream); `None` on a clean end of stream at a frame boundary. An invalid frame
/// is an `InvalidData` error wrapping the [`FrameError`].
pub async fn read_frame<R>(rd: &mut R) -> std::io::Result<Option<Frame>>
where
    R: AsyncRead + Unpin,
{
    use std::io::{Error, ErrorKind};
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = rd.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection ended inside a frame header",
                ))
            };
        }
        got += n;
    }
    let h = FrameHeader::decode(&header).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
    let len = h.len as usize;
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        let n = (&mut *rd)
            .take((len - payload.len()) as u64)
            .read_buf(&mut payload)
            .await?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                "connection ended inside a frame",
            ));
        }
    }
    Ok(Some(Frame::new(h.kind, h.stream, payload.freeze())))
}

/// Writes one frame, header and payload in as few calls as the stream allows.
pub async fn write_frame<W>(wr: &mut W, frame: &Frame) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let header = frame
        .header()
        .encode()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let total = HEADER_LEN + frame.payload.len();
    let mut done = 0;
    while done < total {
        let n = if done < HEADER_LEN {
            let parts = [IoSlice::new(&header[done..]), IoSlice::new(&frame.payload)];
            wr.write_vectored(&parts).await?
        } else {
            wr.write(&frame.payload[done - HEADER_LEN..]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

async fn write_loop<W>(mut wr: W, mut rx: mpsc::Receiver<Frame>, shared: Arc<Shared>)
where
    W: AsyncWrite + Send + Unpin,
{
    let timeout = shared.timeout;
    loop {
        let frame = tokio::select! {
            biased;
            f = rx.recv() => f,
            // Wake up when the connection fails elsewhere, even with nothing to send.
            () = shared.wait_closed() => None,
        };
        let Some(frame) = frame else { break };
        let result = tokio::time::timeout(timeout, async {
            write_frame(&mut wr, &frame).await?;
            if rx.is_empty() {
                wr.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.fail(io_reason(&e));
                break;
            }
            Err(_) => {
                shared.fail(format!("peer did not read for {timeout:?}"));
                break;
            }
        }
    }
    // Best effort: tell TLS to send close_notify.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

/// The code for a malformed frame, if `e` is one (rather than an I/O failure).
fn frame_error_code(e: &std::io::Error) -> Option<crate::proto::ErrorCode> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<FrameError>())
        .map(FrameError::code)
}

fn ends_stream(kind: FrameKind) -> bool {
    matches!(
        kind,
        FrameKind::Response | FrameKind::End | FrameKind::Error
    )
}

fn io_reason(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => format!("TLS: {tls}"),
        None => e.to_string(),
    }
}

/// Frames queued per stream before the reader waits: enough to keep a stream busy, few
/// enough that a stalled stream pins at most a few MiB.
const STREAM_QUEUE_FRAMES: usize = 4;

/// Most bytes a frame reader asks for between large frames: enough for many small frames
/// and the start of a large one.
const SMALL_READ_BYTES: usize = 64 << 10;

/// Frames queued for the writer across all streams of a connection.
const WRITE_QUEUE_FRAMES: usize = 16;

/// Read buffer over TLS. rustls already holds decrypted records, so the buffer saves no
/// system calls; kept small, it lets a large payload read bypass it (one copy fewer).
pub(crate) const TLS_READ_BUFFER: usize = 64 << 10;

/// Read buffer over a bare socket (the bench's baseline): large reads mean few system
/// calls per MiB.
pub const PLAIN_READ_BUFFER: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// Many tasks opening streams at once: every stream reaches the server and gets its
    /// answer (numbers reach the wire in order, so none is mistaken for a finished one),
    /// and abandoned streams give their slots back once the server ends them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_opens_all_arrive_and_abandoned_slots_return() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let max = 4;
        let limits = ServerHello {
            max_streams: max,
            max_transfers: 1,
            chunk_bytes: 1 << 20,
        };
        let t = Duration::from_secs(10);
        let server = tokio::spawn(serve(b, limits, t, t, TLS_READ_BUFFER));
        let answer = hello(&mut a).await.unwrap().unwrap();
        let ack = crate::proto::connection::handle_answer(&answer).unwrap();
        assert_eq!(ack.max_streams, max);
        let client = start_client(a, &ack, t, TLS_READ_BUFFER);
        let server = server.await.unwrap().expect("hello accepted");
        tokio::spawn(async move {
            while let Some(IncomingStream { first, stream }) = server.accept().await {
                let (frame, mut s) = (first.unwrap(), stream);
                tokio::spawn(async move {
                    // Answer slowly enough that streams overlap.
                    tokio::task::yield_now().await;
                    let _ = s.sink.send(FrameKind::Response, frame.payload).await;
                });
            }
        });
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let c = client.clone();
            tasks.spawn(async move {
                let mut s = c.open(Bytes::from(i.to_be_bytes().to_vec())).await?;
                let f = s.source.recv().await?.ok_or(StreamError::ConnectionLost(
                    LostConnection::with_detail(LostKind::Closed, "eof"),
                ))?;
                assert_eq!(&f.payload[..], &i.to_be_bytes());
                Ok::<_, StreamError>(())
            });
        }
        let all = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap().unwrap();
            }
        })
        .await;
        assert!(all.is_ok(), "some streams never got an answer");

        // Abandon `max` streams before their answers: their slots come back when the
        // answers arrive, so the connection is not wedged and breaks no limit.
        for i in 0..max {
            drop(
                client
                    .open(Bytes::from(i.to_be_bytes().to_vec()))
                    .await
                    .unwrap(),
            );
        }
        let mut s = tokio::time::timeout(
            Duration::from_secs(10),
            client.open(Bytes::from_static(b"last")),
        )
        .await
        .expect("slots of abandoned streams never returned")
        .unwrap();
        let f = s.source.recv().await.unwrap().unwrap();
        assert_eq!(&f.payload[..], b"last");
        assert!(!client.is_closed());
    }

    /// A server retiring the connection says `GoAway`: the client opens no further streams
    /// on it, while a stream in flight still gets its answer; then the server closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_away_stops_new_streams_but_not_those_in_flight() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let limits = ServerHello {
            max_streams: 4,
            max_transfers: 1,
            chunk_bytes: 1 << 20,
        };
        let t = Duration::from_secs(10);
        let server = tokio::spawn(serve(b, limits, t, t, TLS_READ_BUFFER));
        let answer = hello(&mut a).await.unwrap().unwrap();
        let ack = crate::proto::connection::handle_answer(&answer).unwrap();
        let client = start_client(a, &ack, t, TLS_READ_BUFFER);
        let server = server.await.unwrap().expect("hello accepted");
        let mut in_flight = client.open(Bytes::from_static(b"first")).await.unwrap();
        let IncomingStream { mut stream, .. } = server.accept().await.unwrap();
        assert!(!client.is_going_away());

        server.go_away();
        let heard = tokio::time::timeout(t, async {
            while !client.is_going_away() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(heard.is_ok(), "GoAway never reached the client");
        assert!(!client.is_closed(), "GoAway closed the connection");
        match client.open(Bytes::from_static(b"second")).await {
            Err(StreamError::ConnectionLost(lost)) => {
                assert!(matches!(lost.kind, LostKind::GoingAway), "{lost}");
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a stream opened after GoAway"),
        }
        stream
            .sink
            .send(FrameKind::Response, Bytes::from_static(b"answer"))
            .await
            .unwrap();
        let f = in_flight.source.recv().await.unwrap().unwrap();
        assert_eq!(&f.payload[..], b"answer");

        // With nothing in flight the server closes at once: GoAway still goes first.
        server.close(Close::MaxAge);
        let closed = tokio::time::timeout(t, async {
            while !client.is_closed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "the close never reached the client");
    }

    /// `GoAway` then a close, with nothing between: the client hears the `GoAway` before
    /// the connection ends, so it knows the close was a retirement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn go_away_right_before_the_close_still_arrives() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let limits = ServerHello {
            max_streams: 4,
            max_transfers: 1,
            chunk_bytes: 1 << 20,
        };
        let t = Duration::from_secs(10);
        let server = tokio::spawn(serve(b, limits, t, t, TLS_READ_BUFFER));
        let answer = hello(&mut a).await.unwrap().unwrap();
        let ack = crate::proto::connection::handle_answer(&answer).unwrap();
        let client = start_client(a, &ack, t, TLS_READ_BUFFER);
        let server = server.await.unwrap().expect("hello accepted");
        server.go_away();
        server.close(Close::MaxAge);
        let closed = tokio::time::timeout(t, async {
            while !client.is_closed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "the close never reached the client");
        assert!(client.is_going_away(), "the client missed the GoAway");
    }
}
