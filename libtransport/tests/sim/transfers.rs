//! Transfers are confined to their object's bytes and chunks and to the identity that
//! opened them: requests the client driver never sends, on raw streams of sim connections
//! (moved from `tests/hostile.rs` and `src/transport/wire_tests.rs`, where they ran on raw
//! QUIC streams and over both transports, which added nothing to them).

use certs::test_util::TestPki;
use libtransport::proto::manifest::MIN_CHUNK_BYTES;
use libtransport::proto::{
    ChunkIndex, DatasetName, ErrorCode, Manifest, ObjectPath, Request, Response, TransferId,
};
use libtransport::test_util::sim::SimNet;
use libtransport::test_util::{random_bytes, trace_init};

use super::support::{error_code, raw_call, raw_read, raw_session, response, server};
use super::tuning;

const GRANTS: &[(&str, &str, bool, bool)] = &[
    ("/gpu/loader", "scans", true, true),
    ("/gpu/other", "scans", true, true),
];

#[tokio::test(start_paused = true)]
async fn resumes_past_the_object_or_of_another_identitys_transfer_are_refused() {
    let _trace = trace_init();
    let net = SimNet::new(113);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let _server = server(&net, &pki, GRANTS, tuning()).await;
    let data = random_bytes(MIN_CHUNK_BYTES as usize * 2 + 100, 7);
    let manifest = Manifest::of_bytes(&data, MIN_CHUNK_BYTES).unwrap();
    assert_eq!(manifest.chunk_count(), 3);
    let open = Request::OpenWrite {
        dataset: DatasetName::new("scans").unwrap(),
        object: ObjectPath::new("ckpt/model.bin").unwrap(),
        manifest: manifest.clone(),
    };

    // The loader starts a push and stores chunk 0.
    let a = raw_session(&net, &pki, "/gpu/loader").await;
    let Some(Response::OpenedWrite { transfer: ta, have }) =
        response(&raw_call(&*a, &open, None).await)
    else {
        panic!("{seed}: no write transfer opened");
    };
    assert_eq!(have.count(), 0, "{seed}");
    let chunk0 = &data[..MIN_CHUNK_BYTES as usize];
    let write = |transfer, chunk| Request::WriteChunk {
        transfer,
        chunk: ChunkIndex(chunk),
    };
    let frames = raw_call(&*a, &write(ta, 0), Some(chunk0)).await;
    assert!(
        matches!(
            response(&frames),
            Some(Response::ChunkStored(ChunkIndex(0)))
        ),
        "{seed}: {frames:?}"
    );
    // Chunks past the object's end are refused.
    for past in [3, 1000, u32::MAX] {
        let frames = raw_call(&*a, &write(ta, past), Some(b"bytes past the object")).await;
        assert_eq!(
            error_code(&frames),
            Some(ErrorCode::Range),
            "{seed}: chunk {past}: {frames:?}"
        );
    }

    // Another identity, on its own connection, names the loader's transfer: it does not
    // exist there, whatever it asks.
    let b = raw_session(&net, &pki, "/gpu/other").await;
    for req in [
        write(ta, 1),
        Request::Commit { transfer: ta },
        Request::Read {
            transfer: ta,
            offset: 0,
            len: 1,
        },
        Request::Close { transfer: ta },
    ] {
        let frames = raw_call(&*b, &req, None).await;
        assert_eq!(
            error_code(&frames),
            Some(ErrorCode::UnknownTransfer),
            "{seed}: {}: {frames:?}",
            req.name()
        );
    }
    // While the loader's write is open, nobody else writes that object.
    assert_eq!(
        error_code(&raw_call(&*b, &open, None).await),
        Some(ErrorCode::Conflict),
        "{seed}"
    );
    // The loader leaves its transfer (its verified chunk stays for a resume).
    assert!(
        matches!(
            response(&raw_call(&*a, &Request::Close { transfer: ta }, None).await),
            Some(Response::Closed)
        ),
        "{seed}"
    );
    drop(a);
    // The other identity opens the same object with the same manifest: it does not resume
    // the loader's chunk, and cannot commit what it has not sent.
    let Some(Response::OpenedWrite { transfer: tb, have }) =
        response(&raw_call(&*b, &open, None).await)
    else {
        panic!("{seed}: no write transfer for the other identity");
    };
    assert_eq!(
        have.count(),
        0,
        "{seed}: another identity resumed the loader's chunks"
    );
    assert_eq!(
        error_code(&raw_call(&*b, &Request::Commit { transfer: tb }, None).await),
        Some(ErrorCode::Incomplete),
        "{seed}"
    );
    assert!(
        matches!(
            response(&raw_call(&*b, &Request::Close { transfer: tb }, None).await),
            Some(Response::Closed)
        ),
        "{seed}"
    );
    // The control: the loader itself resumes, from chunk 1.
    let c = raw_session(&net, &pki, "/gpu/loader").await;
    let Some(Response::OpenedWrite { have, .. }) = response(&raw_call(&*c, &open, None).await)
    else {
        panic!("{seed}: the loader cannot reopen its write");
    };
    assert_eq!(have.count(), 1, "{seed}");
    assert!(have.contains(ChunkIndex(0)), "{seed}");
}

#[tokio::test(start_paused = true)]
async fn reads_beyond_limits_or_objects_are_refused() {
    const CANARY: &[u8] = b"PHI-CANARY-9d2e";
    let _trace = trace_init();
    let net = SimNet::new(139);
    let seed = format!("seed {}", net.seed());
    let pki = TestPki::new("hospital.example");
    let server = server(
        &net,
        &pki,
        &[("/gpu/loader", "scans", true, false)],
        tuning(),
    )
    .await;
    server.put("scans", "a.bin", CANARY);
    let conn = raw_session(&net, &pki, "/gpu/loader").await;
    let open = Request::OpenRead {
        dataset: DatasetName::new("scans").unwrap(),
        object: ObjectPath::new("a.bin").unwrap(),
    };
    let Some(Response::OpenedRead { transfer, .. }) =
        response(&raw_call(&*conn, &open, None).await)
    else {
        panic!("{seed}: no transfer opened");
    };
    let len = CANARY.len() as u64;
    let read = |transfer, offset, len| Request::Read {
        transfer,
        offset,
        len,
    };
    for (offset, n, code) in [
        (0, 1u64 << 63, ErrorCode::TooLarge),
        (u64::MAX - 1, 10, ErrorCode::Range),
        (len + 1, 1, ErrorCode::Range),
        (0, len + 1, ErrorCode::Range),
    ] {
        let got = raw_read(&*conn, &read(transfer, offset, n)).await;
        assert_eq!(got, Err(code), "{seed}: read {offset}+{n}");
    }
    // A transfer id this connection never opened.
    let got = raw_read(&*conn, &read(TransferId(transfer.0 + 1000), 0, 1)).await;
    assert_eq!(got, Err(ErrorCode::UnknownTransfer), "{seed}");
    // The control: reads inside the object work, to its last byte.
    let got = raw_read(&*conn, &read(transfer, 0, len)).await;
    assert_eq!(got.as_deref(), Ok(CANARY), "{seed}");
    let got = raw_read(&*conn, &read(transfer, len - 4, 4)).await;
    assert_eq!(got.as_deref(), Ok(&CANARY[CANARY.len() - 4..]), "{seed}");
}
