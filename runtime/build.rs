//! Generates the gRPC code of `proto/braid.proto` (package `braid.v1`):
//! messages, clients and servers for the `Head` and `Node` services, with
//! the vendored `protoc` so no system install is needed.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Edition 2021: setting an environment variable is safe; the build
    // script is single-threaded at this point.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/braid.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Chunks are served straight from the store's mapping and decoded
        // without an extra copy.
        .bytes(".braid.v1.ObjectChunk.data")
        .compile_protos(&["proto/braid.proto"], &["proto"])?;
    Ok(())
}
