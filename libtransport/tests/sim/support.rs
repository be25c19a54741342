//! Helpers of the moved tests: clients of any workload, raw requests on a sim connection,
//! and a clock that follows tokio's (virtual) time.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use certs::test_util::TestPki;
use libtransport::clock::{Clock, SystemClock};
use libtransport::proto::{ErrorCode, Frame, FrameKind, Request, Response};
use libtransport::test_util::sim::{SERVER_ADDR, SimNet};
use libtransport::test_util::{TestGrant, TestServer, identity};
use libtransport::transport::{Connection, Connector};
use libtransport::{Client, ClientConfig, ConnectError, TransportConfig};

use super::tuning;

/// A server on `net` as `/node/storage` of `pki`, granting `grants`.
pub(crate) async fn server(
    net: &SimNet,
    pki: &TestPki,
    grants: &[TestGrant<'_>],
    transport: TransportConfig,
) -> TestServer {
    TestServer::start_sim(pki, grants, transport, net).await
}

/// A client of `pki`'s workload `path` over `net`.
pub(crate) async fn client_as(
    net: &SimNet,
    pki: &TestPki,
    path: &str,
) -> Result<Client, ConnectError> {
    let id = identity(pki, path);
    let config = ClientConfig::builder()
        .identity(id.clone())
        .transport(tuning())
        .build();
    Client::connect_with(config, SERVER_ADDR, Arc::new(net.connector(id))).await
}

/// A connection of `pki`'s workload `path` past its hello, for requests the client driver
/// would never send.
pub(crate) async fn raw_session(net: &SimNet, pki: &TestPki, path: &str) -> Arc<dyn Connection> {
    net.connector(identity(pki, path))
        .connect(SERVER_ADDR)
        .await
        .unwrap_or_else(|e| panic!("seed {}: raw session: {e}", net.seed()))
        .connection
}

/// Sends `req` and then `data` (as `Data` frames and an `End`, if any) on a new stream, ends
/// it, and collects every frame the server answers until it ends the stream.
pub(crate) async fn raw_call(
    conn: &dyn Connection,
    req: &Request,
    data: Option<&[u8]>,
) -> Vec<Frame> {
    let mut s = conn.open(req.encode()).await.expect("open a stream");
    if let Some(data) = data {
        s.sink
            .send_data(Bytes::copy_from_slice(data))
            .await
            .expect("send data");
        s.sink
            .send(FrameKind::End, Bytes::new())
            .await
            .expect("send end");
    }
    s.sink.finish();
    let mut frames = Vec::new();
    while let Ok(Some(f)) = s.source.recv().await {
        frames.push(f);
    }
    frames
}

/// The one `Response` of an answer, if that is what it is.
pub(crate) fn response(frames: &[Frame]) -> Option<Response> {
    match frames {
        [f] if f.kind == FrameKind::Response => Response::decode(&f.payload).ok(),
        _ => None,
    }
}

/// The one `Error` of an answer, if that is what it is.
pub(crate) fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    match frames {
        [f] if f.kind == FrameKind::Error => ErrorCode::decode(&f.payload).ok(),
        _ => None,
    }
}

/// Wall and monotonic time that move with tokio's clock: under `start_paused` they follow
/// virtual time, so certificates expire and renewals fall due as the test's timers run.
#[derive(Debug)]
pub(crate) struct VirtualClock {
    wall: SystemTime,
    mono: Instant,
    start: tokio::time::Instant,
}

impl VirtualClock {
    pub(crate) fn new() -> Self {
        Self {
            wall: SystemClock.now(),
            mono: SystemClock.instant(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }

    fn instant(&self) -> Instant {
        self.mono + self.start.elapsed()
    }
}

/// Sends a `Read` (or any request answered by data) on a new stream: its data up to `End`,
/// or the code of the `Error` it ended with.
pub(crate) async fn raw_read(conn: &dyn Connection, req: &Request) -> Result<Vec<u8>, ErrorCode> {
    let mut s = conn.open(req.encode()).await.expect("open a stream");
    s.sink.finish();
    let mut out = Vec::new();
    loop {
        let f = s
            .source
            .recv()
            .await
            .expect("the stream failed")
            .expect("the stream ended before End or Error");
        match f.kind {
            FrameKind::Data => out.extend_from_slice(&f.payload),
            FrameKind::End => return Ok(out),
            FrameKind::Error => return Err(ErrorCode::decode(&f.payload).expect("an error code")),
            k => panic!("unexpected {k:?}"),
        }
    }
}
