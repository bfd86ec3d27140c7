//! The code generated from `proto/braid.proto` (package `braid.v1`):
//! messages, `head_client`/`head_server` and `node_client`/`node_server`.

#![allow(missing_docs)]
#![allow(clippy::all, clippy::pedantic)]

tonic::include_proto!("braid.v1");
