//! Fuzz targets for what a streaming job's recovery decodes from checkpoint
//! storage: manifests, commit markers, subtask state blobs and operator
//! state.
//!
//! Under `cargo test` each target runs for about a second on random input
//! (bolero's default); a longer campaign of one target is one command (see
//! the README's "Fuzzing" section). Every target asserts that decoding never
//! panics and that the memory it holds is bounded by its input, never by a
//! length field it read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../object-store/tests/support/alloc_meter.rs"]
mod alloc_meter;

use bolero::check;
use braid_actors::checkpoint::storage::{
    decode_manifest_object, encode_manifest_object, CheckpointStorage, Epoch, Manifest, StateHandle,
};
use braid_actors::stream::coordinator::{decode_subtask, encode_subtask};
use braid_actors::stream::functions::{
    KeyedProcess, KeyedProcessFunction, ProcessContext, RunningAggregate,
};
use braid_actors::stream::operator::{decode_state, EventTime, Operator, Snapshot};
use braid_actors::stream::window::{Reduce, WindowOperator, WindowSpec};
use bytes::Bytes;
use object_store::PutPayload;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[global_allocator]
static METER: alloc_meter::Meter = alloc_meter::Meter;

/// Slack for allocations no input drives (error messages, serde's bounded
/// preallocation of a sequence).
const SLACK: usize = 4 << 20;

/// `body` behind a valid manifest header (so the fuzzer reaches the JSON).
fn with_header(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "braid-manifest v1 crc32={:08x} len={}\n",
        crc32fast::hash(body),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[test]
fn manifests_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            let _ = decode_manifest_object(bytes);
            let framed = with_header(bytes);
            if let Ok((manifest, crc)) = decode_manifest_object(&framed) {
                assert_eq!(crc, crc32fast::hash(bytes));
                let again = encode_manifest_object(&manifest).expect("it encodes");
                assert_eq!(
                    decode_manifest_object(&again).expect("it decodes").0,
                    manifest
                );
            }
        });
    });
}

type ManifestFields = (
    String,
    u64,
    u64,
    Vec<(String, u64, u32)>,
    Vec<(String, Vec<u8>)>,
);

fn manifest((job, epoch, generation, states, metadata): &ManifestFields) -> Manifest {
    Manifest {
        job: job.clone(),
        epoch: Epoch(*epoch),
        generation: *generation,
        states: states
            .iter()
            .map(|(operator, len, crc32)| StateHandle {
                operator: operator.clone(),
                path: format!("{job}/chk-{epoch:020}/state/{operator}"),
                len: *len,
                crc32: *crc32,
            })
            .collect(),
        metadata: metadata.iter().cloned().collect::<BTreeMap<_, _>>(),
    }
}

#[test]
fn manifests_round_trip() {
    check!().with_type::<ManifestFields>().for_each(|fields| {
        let sent = manifest(fields);
        let bytes = encode_manifest_object(&sent).expect("a manifest encodes");
        let (got, _) = decode_manifest_object(&bytes).expect("and decodes");
        assert_eq!(got, sent);
        // Any single flipped byte is refused, never misread.
        let at = (fields.1 as usize) % bytes.len();
        let mut flipped = bytes.clone();
        flipped[at] ^= 1 << (fields.2 % 8);
        if let Ok((other, _)) = decode_manifest_object(&flipped) {
            panic!("a flipped byte at {at} decoded as {other:?}");
        }
    });
}

/// Recovery end to end: whatever marker and manifest bytes an epoch holds,
/// `latest` skips it or returns a manifest that verifies, never panics.
#[test]
fn latest_checkpoint_from_stored_bytes() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    check!()
        .with_type::<(Vec<u8>, Vec<u8>, bool)>()
        .for_each(|(marker, manifest, frame_it)| {
            let storage = CheckpointStorage::in_memory("job", 2);
            let epoch = Epoch(3);
            let manifest = if *frame_it {
                with_header(manifest)
            } else {
                manifest.clone()
            };
            let store = storage.store().clone();
            runtime.block_on(async {
                for (path, bytes) in [
                    (storage.marker_path(epoch), marker.clone()),
                    (storage.manifest_path(epoch), manifest.clone()),
                ] {
                    store
                        .put(&path, PutPayload::from(Bytes::from(bytes)))
                        .await
                        .expect("an in-memory put");
                }
            });
            let found = alloc_meter::assert_bounded(marker.len() + manifest.len(), SLACK, || {
                runtime.block_on(storage.latest())
            });
            if let Ok(Some(m)) = found {
                assert_eq!((m.job.as_str(), m.epoch), ("job", epoch));
            }
        });
}

#[test]
fn subtask_blobs_from_bytes() {
    check!().for_each(|bytes: &[u8]| {
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            if let Ok((states, offset)) = decode_subtask(bytes) {
                let total: usize = states.iter().map(|(k, v)| k.len() + v.len()).sum();
                assert!(total + offset.map_or(0, |o| o.len()) <= bytes.len());
            }
        });
    });
}

#[test]
fn subtask_blobs_round_trip() {
    check!()
        .with_type::<(Vec<(String, Vec<u8>)>, Option<Vec<u8>>)>()
        .for_each(|(states, offset)| {
            let snapshots = states
                .iter()
                .map(|(name, bytes)| {
                    let bytes = bytes.clone();
                    (name.clone(), Snapshot::new(move || Ok(bytes)))
                })
                .collect();
            let blob = encode_subtask(snapshots, offset.clone()).expect("a blob encodes");
            let (got, got_offset) = decode_subtask(&blob).expect("and decodes");
            // Later states of the same name win, as a chain's restore sees them.
            let want: std::collections::HashMap<_, _> = states.iter().cloned().collect();
            assert_eq!(got, want);
            assert_eq!(&got_offset, offset);
        });
}

/// Counts records per key: a keyed process function with state.
struct Count;

impl KeyedProcessFunction<String, u64> for Count {
    type State = (u64, Vec<u64>);
    type Out = u64;

    fn process(
        &mut self,
        _key: &String,
        value: u64,
        _time: Option<EventTime>,
        state: &mut Self::State,
        _ctx: &mut ProcessContext<'_, String, u64>,
    ) {
        state.0 += value;
    }
}

fn sum(a: &u64, b: &u64) -> u64 {
    a.wrapping_add(*b)
}

/// The built-in keyed operators' restore (keyed state and timers, running
/// aggregates, count and event-time windows) on any bytes.
#[test]
fn operator_states_from_bytes() {
    let mut keyed = KeyedProcess::<String, u64, _>::new(Count);
    let mut running = RunningAggregate::<String, u64, _>::new(Reduce(sum));
    let mut windows = [
        WindowSpec::TumblingCount { size: 3 },
        WindowSpec::SlidingCount { size: 4, slide: 2 },
    ]
    .map(|spec| WindowOperator::<String, u64, _>::new(spec, Reduce(sum)));
    check!().for_each(|bytes: &[u8]| {
        alloc_meter::assert_bounded(bytes.len(), SLACK, || {
            let _ = keyed.restore(bytes);
            let _ = running.restore(bytes);
            for window in &mut windows {
                let _ = window.restore(bytes);
            }
            let _ = decode_state::<(Vec<(u64, PathBuf)>, u64)>(bytes);
        });
    });
}

/// Found by `operator_states_from_bytes`: imbl's `Deserialize` reserved
/// whatever length a blob declared, so eight bytes aborted the process
/// ("memory allocation of 2305843009213693952 bytes failed").
#[test]
fn a_huge_declared_length_in_keyed_state_is_an_error() {
    let bytes = (1u64 << 61).to_le_bytes();
    let mut running = RunningAggregate::<String, u64, _>::new(Reduce(sum));
    assert!(running.restore(&bytes).is_err());
    let mut keyed = KeyedProcess::<String, u64, _>::new(Count);
    assert!(keyed.restore(&bytes).is_err());
    let mut window =
        WindowOperator::<String, u64, _>::new(WindowSpec::TumblingCount { size: 3 }, Reduce(sum));
    let mut state = vec![0u8; 64];
    state.extend_from_slice(&bytes);
    for cut in 0..state.len() {
        let _ = window.restore(&state[cut..]);
    }
}

/// Found by the campaign: an uppercase hex digit in the header's CRC
/// (a flipped case bit) decoded as the same header.
#[test]
fn a_manifest_header_is_accepted_only_as_the_encoder_spells_it() {
    // A manifest whose CRC has a letter in it.
    let (text, crc) = (0u64..)
        .find_map(|epoch| {
            let mut fields = ManifestFields::default();
            fields.1 = epoch;
            let bytes = encode_manifest_object(&manifest(&fields)).expect("a manifest encodes");
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let crc = text
                .split_whitespace()
                .find_map(|f| f.strip_prefix("crc32="))?
                .to_owned();
            crc.bytes()
                .any(|b| b.is_ascii_alphabetic())
                .then_some((text, crc))
        })
        .expect("some crc has a letter");
    for spelled in [crc.to_uppercase(), format!("+{}", &crc[1..])] {
        let respelled = text.replacen(&format!("crc32={crc}"), &format!("crc32={spelled}"), 1);
        assert!(
            decode_manifest_object(respelled.as_bytes()).is_err(),
            "crc32={spelled} accepted"
        );
    }
    let longer = text.replacen(" len=", " len=+", 1);
    assert!(decode_manifest_object(longer.as_bytes()).is_err());
}
