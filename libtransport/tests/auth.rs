//! Mutual authentication over real QUIC and TLS/TCP sockets: each bad credential is refused
//! with a typed error before any request is read, on the server (bad clients) and on the
//! client (bad servers), and no dataset byte crosses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly.

use std::net::SocketAddr;
use std::sync::Arc;

use certs::SvidError;
use certs::test_util::{Defect, TestPki};
use libtransport::audit::AuditEvent;
use libtransport::proto::{DatasetName, ObjectPath};
use libtransport::test_util::{AcceptAnyServer, TestServer, identity, identity_of, trace_init};
use libtransport::{
    Client, ClientConfig, ConnectError, IdentityHandle, Path, Rejection, TransportConfig,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CANARY: &[u8] = b"PHI-CANARY-4f1c: patient 0042, MRN 881-22-1907";
const GRANTS: &[(&str, &str, bool, bool)] = &[("/gpu/loader", "scans", true, true)];

async fn server(pki: &TestPki) -> TestServer {
    // Every refusal on its own in the trail (a window would count repeats from one source),
    // so each case can find its own.
    let mut t = TransportConfig::default();
    t.refusal_window(std::time::Duration::ZERO);
    let s = TestServer::start_with(pki, GRANTS, t).await;
    s.put("scans", "shard-0.bin", CANARY);
    s
}

fn client_config(id: IdentityHandle) -> ClientConfig {
    let mut t = TransportConfig::default();
    t.handshake_timeout(std::time::Duration::from_secs(5));
    ClientConfig::builder().identity(id).transport(t).build()
}

/// Each way a client's SVID can be wrong, with the alert the server must answer with.
fn bad_clients(pki: &TestPki) -> Vec<(&'static str, IdentityHandle, Rejection)> {
    let other = TestPki::new(pki.trust_domain().as_str());
    let mut cases = vec![(
        "SVID from another CA",
        identity_of(other.svid("/gpu/loader"), pki.bundle()),
        Rejection::UnknownCa,
    )];
    for defect in Defect::ALL {
        let expected = match defect {
            Defect::Expired | Defect::NotYetValid => Rejection::CertificateExpired,
            _ => Rejection::BadCertificate,
        };
        let name = match defect {
            Defect::Expired => "expired SVID",
            Defect::NotYetValid => "not-yet-valid SVID",
            Defect::ForeignTrustDomain => "another trust domain's ID signed by our CA",
            Defect::TwoUriSans => "two URI SANs",
            Defect::NoUriSan => "no URI SAN",
            Defect::CaAsLeaf => "CA certificate used as leaf",
            Defect::CertSignKeyUsage => "leaf allowed to sign certificates",
        };
        cases.push((
            name,
            identity_of(pki.bad_svid("/gpu/loader", defect), pki.bundle()),
            expected,
        ));
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_every_bad_client_svid_with_a_typed_error() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = server(&pki).await;
    for path in [Path::Quic, Path::Tcp] {
        for (case, id, expected) in bad_clients(&pki) {
            let before = server.audit.events().len();
            let result = Client::connect(client_config(id), server.addr(path), path).await;
            match result {
                Err(ConnectError::Rejected(r)) => {
                    assert_eq!(r, expected, "{case} over {path}: wrong rejection");
                }
                Err(other) => panic!("{case} over {path}: untyped refusal: {other}"),
                Ok(_) => panic!("{case} over {path}: connected"),
            }
            // The refusal is recorded, and the refused peer never got as far as a request.
            let audited = server
                .audit
                .wait_for(|events| {
                    events[before..].iter().any(
                        |e| matches!(e, AuditEvent::ConnectionRefused { path: p, .. } if *p == path),
                    )
                })
                .await;
            let events = server.audit.events();
            let new = &events[before..];
            assert!(audited, "{case} over {path}: refusal not audited: {new:?}");
            assert!(
                !new.iter().any(|e| matches!(
                    e,
                    AuditEvent::ConnectionAccepted { .. }
                        | AuditEvent::Transfer { .. }
                        | AuditEvent::Authorization { .. }
                )),
                "{case} over {path}: got past the handshake: {new:?}"
            );
        }
    }
    // The control: the same server serves a good client.
    let good = Client::connect(
        client_config(identity(&pki, "/gpu/loader")),
        server.addr(Path::Quic),
        Path::Quic,
    )
    .await
    .unwrap();
    let got = good
        .fetch(
            &DatasetName::new("scans").unwrap(),
            &ObjectPath::new("shard-0.bin").unwrap(),
            1 << 20,
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(&got[..], CANARY);
}

/// Whether a refusal has the expected reason.
type Check = fn(&SvidError) -> bool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_every_bad_server_svid_with_a_typed_error() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let other = TestPki::new("hospital.example");
    let mut cases: Vec<(String, IdentityHandle, Check)> = vec![(
        "server SVID from another CA".into(),
        identity_of(other.svid("/node/storage"), pki.bundle()),
        |e| *e == SvidError::UnknownIssuer,
    )];
    for defect in Defect::ALL {
        let check: Check = match defect {
            Defect::Expired => |e| matches!(e, SvidError::Expired { .. }),
            Defect::NotYetValid => |e| matches!(e, SvidError::NotYetValid { .. }),
            Defect::ForeignTrustDomain => |e| matches!(e, SvidError::ForeignTrustDomain { .. }),
            Defect::TwoUriSans => |e| matches!(e, SvidError::UriSanCount(2)),
            Defect::NoUriSan => |e| matches!(e, SvidError::UriSanCount(0)),
            Defect::CaAsLeaf => |e| matches!(e, SvidError::IsCa),
            Defect::CertSignKeyUsage => |e| matches!(e, SvidError::SigningKeyUsage),
        };
        cases.push((
            format!("server {defect:?}"),
            identity_of(pki.bad_svid("/node/storage", defect), pki.bundle()),
            check,
        ));
    }
    for (case, server_id, check) in cases {
        let server =
            TestServer::start_as(&pki, server_id, GRANTS, TransportConfig::default()).await;
        server.put("scans", "shard-0.bin", CANARY);
        for path in [Path::Quic, Path::Tcp] {
            let result = Client::connect(
                client_config(identity(&pki, "/gpu/loader")),
                server.addr(path),
                path,
            )
            .await;
            match result {
                Err(ConnectError::ServerNotTrusted(e)) => {
                    assert!(
                        check(&e),
                        "{case} over {path}: refused for the wrong reason: {e}"
                    );
                }
                Err(other) => panic!("{case} over {path}: untyped refusal: {other}"),
                Ok(_) => panic!("{case} over {path}: client trusted a bad server"),
            }
        }
        // Nothing was requested from the bad server.
        assert!(!server.audit.events().iter().any(|e| matches!(
            e,
            AuditEvent::Transfer { .. } | AuditEvent::Authorization { .. }
        )));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_insisting_on_a_server_id_refuses_another() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = server(&pki).await;
    let config = ClientConfig::builder()
        .identity(identity(&pki, "/gpu/loader"))
        .server_id(pki.id("/node/other-storage"))
        .build();
    for path in [Path::Quic, Path::Tcp] {
        let e = Client::connect(config.clone(), server.addr(path), path)
            .await
            .expect_err("wrong server accepted");
        assert!(
            matches!(e, ConnectError::ServerNotTrusted(SvidError::Other(_))),
            "{e}"
        );
    }
    let right = ClientConfig::builder()
        .identity(identity(&pki, "/gpu/loader"))
        .server_id(server.id.clone())
        .build();
    Client::connect(right, server.addr(Path::Tcp), Path::Tcp)
        .await
        .unwrap();
}

fn raw_client(versions: &[&'static rustls::SupportedProtocolVersion]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![libtransport::tls::ALPN.to_vec()];
    c
}

/// A transportd hello frame followed by a stat request for the canary.
fn hello_and_request() -> Vec<u8> {
    use libtransport::proto::{Frame, FrameKind, Hello, Request};
    let mut out = bytes::BytesMut::new();
    Frame::new(FrameKind::Hello, 0, Hello::current().encode())
        .encode(&mut out)
        .unwrap();
    let req = Request::OpenRead {
        dataset: DatasetName::new("scans").unwrap(),
        object: ObjectPath::new("shard-0.bin").unwrap(),
    };
    Frame::new(FrameKind::Request, 1, req.encode())
        .encode(&mut out)
        .unwrap();
    out.to_vec()
}

/// Everything a raw TLS/TCP client reads before the connection ends, and how it ended.
async fn raw_tcp_exchange(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> (Vec<u8>, Option<rustls::Error>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("transportd.invalid").unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return (Vec::new(), tls_error(&e)),
    };
    let _ = tls.write_all(&hello_and_request()).await;
    let _ = tls.flush().await;
    let mut got = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut got))
        .await
        .expect("server neither answered nor closed");
    (got, end.err().and_then(|e| tls_error(&e)))
}

fn tls_error(e: &std::io::Error) -> Option<rustls::Error> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_gets_nothing() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = server(&pki).await;

    // TLS/TCP: the client's handshake "completes", then the server's alert arrives instead
    // of any answer.
    let (got, err) = raw_tcp_exchange(
        server.addr(Path::Tcp),
        raw_client(&[&rustls::version::TLS13]),
    )
    .await;
    assert!(got.is_empty(), "{} bytes delivered", got.len());
    assert_eq!(
        err,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
        ))
    );

    // QUIC: the connection closes with the same alert as a CRYPTO_ERROR.
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(raw_client(&[&rustls::version::TLS13]))
            .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connecting = endpoint
        .connect(server.addr(Path::Quic), "transportd.invalid")
        .unwrap();
    let close = match connecting.await {
        Err(e) => e,
        Ok(conn) => {
            let exchange = async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&hello_and_request()).await?;
                send.finish()?;
                Ok::<_, Box<dyn std::error::Error>>(recv.read_to_end(1 << 20).await?)
            };
            if let Ok(got) = exchange.await {
                panic!("QUIC client without a certificate read {} bytes", got.len());
            }
            conn.closed().await
        }
    };
    match close {
        // CRYPTO_ERROR 0x100 + certificate_required (116)
        quinn::ConnectionError::ConnectionClosed(c) => {
            assert_eq!(u64::from(c.error_code), 0x100 + 116, "{c}");
        }
        other => panic!("unexpected end: {other}"),
    }
    assert!(
        server
            .audit
            .wait_for(|events| {
                events
                    .iter()
                    .filter(|e| matches!(e, AuditEvent::ConnectionRefused { .. }))
                    .count()
                    >= 2
            })
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_only_peer_is_refused_both_ways() {
    let _trace = trace_init();
    let pki = TestPki::new("hospital.example");
    let server = server(&pki).await;

    // A client offering only TLS 1.2 is refused with protocol_version.
    let (got, err) = raw_tcp_exchange(
        server.addr(Path::Tcp),
        raw_client(&[&rustls::version::TLS12]),
    )
    .await;
    assert!(got.is_empty());
    assert_eq!(
        err,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::ProtocolVersion
        ))
    );
    // QUIC exists only with TLS 1.3 (RFC 9001): quinn cannot even start a TLS 1.2-only
    // client, so the TLS/TCP listener is where a TLS 1.2 peer can knock.

    // A server offering only TLS 1.2 is refused by our client, with a typed error.
    let svid = pki.svid("/node/legacy");
    let tls12 = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(svid.chain().to_vec(), svid.key().clone_key())
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls12));
    let legacy = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        acceptor.accept(sock).await.err()
    });
    let e = Client::connect(
        client_config(identity(&pki, "/gpu/loader")),
        addr,
        Path::Tcp,
    )
    .await
    .expect_err("client accepted a TLS 1.2 server");
    assert!(
        matches!(e, ConnectError::Rejected(Rejection::ProtocolVersion)),
        "{e}"
    );
    assert!(
        legacy.await.unwrap().is_some(),
        "the legacy server saw a handshake succeed"
    );
}
