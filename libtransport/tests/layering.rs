//! The transport seam holds: nothing of libtransport above `src/transport/` names quinn or
//! tokio-rustls, so the drivers, the protocol core and the request logic run on any
//! transport (QUIC, TLS/TCP, the bench's plaintext one, the in-memory one of the tests).

use std::path::{Path, PathBuf};

/// Crates only the transports may name.
const TRANSPORT_CRATES: &[&str] = &["quinn", "tokio_rustls"];

#[test]
fn nothing_above_the_transports_names_quinn_or_tokio_rustls() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let transports = src.join("transport");
    let mut offences = Vec::new();
    let mut files = 0;
    for file in rust_files(&src) {
        if file.starts_with(&transports) {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&file).expect("source file");
        for (n, line) in text.lines().enumerate() {
            if let Some(name) = names_a_transport_crate(line) {
                offences.push(format!("{}:{}: names {name}", file.display(), n + 1));
            }
        }
    }
    assert!(files > 20, "only {files} files read: wrong directory?");
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

/// The control: the check fires on the ways code names a crate, and not on prose.
#[test]
fn the_check_sees_uses_paths_and_macros_but_not_comments() {
    for code in [
        "use quinn::Endpoint;",
        "    let c: quinn::Connection = x;",
        "fn f(s: tokio_rustls::server::TlsStream<T>) {}",
        "use {bytes::Bytes, quinn};",
        "extern crate quinn;",
    ] {
        assert!(names_a_transport_crate(code).is_some(), "missed: {code}");
    }
    for prose in [
        "// QUIC (quinn) with mutual TLS",
        "//! tokio_rustls is used in transport/tcp.rs",
        "    /// See quinn's docs.",
        "let quinnish = 1;",
    ] {
        assert_eq!(names_a_transport_crate(prose), None, "flagged: {prose}");
    }
}

/// The transport crate a line of code names, if any (comments are not code).
fn names_a_transport_crate(line: &str) -> Option<&'static str> {
    let code = line.split("//").next().unwrap_or("");
    TRANSPORT_CRATES.iter().copied().find(|name| {
        code.match_indices(name).any(|(at, _)| {
            let before = code[..at].chars().next_back();
            let after = code[at + name.len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        })
    })
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}
