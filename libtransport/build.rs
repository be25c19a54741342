//! Generates the SPIFFE Workload API's messages, client and server (`workload::pb`) from
//! `proto/workload.proto` into `OUT_DIR`. protox compiles the file in Rust, so the build
//! needs no system `protoc`; tonic-prost-build turns the descriptors into code.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    let descriptors = protox::compile(["workload.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        // These carry a private key or a bearer token: `workload.rs` writes their Debug by
        // hand, without the secret, so logging a message never leaks one.
        .skip_debug([".X509SVID", ".JWTSVID"])
        .compile_fds(descriptors)?;
    Ok(())
}
