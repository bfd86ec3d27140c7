//! Tasks and objects against a real embedded cluster (a head, a node and
//! worker processes re-executed from this test binary): values, references
//! as arguments, nested references, wait, cancel, timeouts, panics, unknown
//! functions, zero-copy arrays and batches, and blocking wrappers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid::{Error, ObjectRef, Runtime, TaskOptions};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[braid::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[braid::remote]
fn sum(values: Vec<f32>) -> f64 {
    values.iter().map(|v| f64::from(*v)).sum()
}

/// An application's own error type.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Refusal {
    /// Below the minimum.
    TooSmall(u64),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TooSmall(n) => write!(f, "{n} is too small"),
        }
    }
}

#[braid::remote]
fn checked(n: u64) -> Result<u64, Refusal> {
    if n < 10 {
        Err(Refusal::TooSmall(n))
    } else {
        Ok(n * 2)
    }
}

#[braid::remote]
fn opens(path: String) -> Result<u64, std::io::Error> {
    std::fs::metadata(path).map(|m| m.len())
}

#[braid::remote]
fn greet(name: String, times: usize) -> String {
    format!("hello {name}").repeat(times)
}

#[braid::remote]
fn big(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[braid::remote]
fn sum_refs(refs: Vec<ObjectRef<i64>>) -> i64 {
    let rt = braid::current().unwrap();
    refs.iter().map(|r| rt.get_blocking(r).unwrap()).sum()
}

#[braid::remote]
fn make_refs(n: i64) -> Vec<ObjectRef<i64>> {
    let rt = braid::current().unwrap();
    (0..n).map(|i| rt.put(&i).unwrap()).collect()
}

#[braid::remote]
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[braid::remote]
async fn async_sleep_ms(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Reads a lent batch in this worker process: its sum of `feature`, or
/// the error.
#[braid::remote]
async fn sum_lent(lent: braid::Lent<braid::Batch>) -> Result<u64, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    let rt = braid::current().map_err(|e| e.to_string())?;
    let batch = rt
        .get_batch_lent(&lent)
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(batch
        .column(0)
        .as_primitive::<UInt64Type>()
        .values()
        .iter()
        .sum())
}

/// A process that batches are lent to as they are sealed.
#[braid::actor]
pub struct LentReader {}

#[braid::actor]
impl LentReader {
    fn new() -> Self {
        LentReader {}
    }

    fn seat(&self) -> Result<braid::store::StoreSeat, String> {
        Ok(braid::current().map_err(|e| e.to_string())?.store_seat())
    }

    /// Sum of `feature` of a lent batch, and whether it was held through
    /// its ticket (this process's store connection then pins it while the
    /// batch lives, and no longer after).
    async fn sum(&self, lent: braid::Lent<braid::Batch>) -> Result<(u64, bool), String> {
        let rt = braid::current().map_err(|e| e.to_string())?;
        let adopted = lent.ticket().is_some_and(|t| t.to() == rt.store_seat());
        let sum = sum_lent(lent).await?;
        Ok((sum, adopted && rt.store().pinned_objects() == 0))
    }
}

#[braid::remote]
fn panics(message: String) -> i64 {
    panic!("{message}")
}

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        braid::init_blocking_with(braid::InitOptions::new().num_cpus(2.0))
            .expect("embedded cluster")
    })
}

#[tokio::test]
async fn tasks_return_values_and_take_references_as_arguments() {
    let rt = rt();
    let x = add::remote(rt, 1, 2).unwrap();
    let y = add::remote(rt, &x, 10).unwrap();
    assert_eq!(rt.get(&y).await.unwrap(), 13);
    assert_eq!(rt.get(&x).await.unwrap(), 3);
    assert_eq!(add(2, 2), 4, "the function stays callable locally");
}

#[tokio::test]
async fn borrowed_strings_and_slices_pass_where_owned_ones_are_taken() {
    let rt = rt();
    let g = greet::remote(rt, "ann", 2).unwrap();
    assert_eq!(rt.get(&g).await.unwrap(), "hello annhello ann");
    let name = String::from("bob");
    let g = greet::remote(rt, &name, 1).unwrap();
    assert_eq!(rt.get(&g).await.unwrap(), "hello bob");
    let values = vec![1.0f32, 2.0, 3.0, 4.0];
    let s = sum::remote(rt, &values[1..3]).unwrap();
    assert_eq!(rt.get(&s).await.unwrap(), 5.0);
    let s = sum::remote(rt, &values).unwrap();
    assert_eq!(rt.get(&s).await.unwrap(), 10.0);
}

#[tokio::test]
async fn a_returned_err_is_the_callers_error_and_downcasts_to_its_type() {
    let rt = rt();
    let fine = checked::remote(rt, 21).unwrap();
    assert_eq!(rt.get(&fine).await, Ok(42), "Ok(T) arrives as T");
    let refused = checked::remote(rt, 3).unwrap();
    let e = rt.get(&refused).await.unwrap_err();
    assert_eq!(e.downcast::<Refusal>(), Some(Refusal::TooSmall(3)));
    assert_eq!(e.downcast::<String>(), None, "only its own type");
    assert!(e.to_string().contains("3 is too small"), "{e}");
    // As an argument of another task, the error fails that task too.
    let chained = checked::remote(rt, &refused).unwrap();
    assert!(rt.get(&chained).await.is_err());
    // An error type that is not Serialize keeps its text.
    let missing = opens::remote(rt, "/no/such/file").unwrap();
    match rt.get(&missing).await {
        Err(Error::Application {
            message, payload, ..
        }) => {
            assert!(message.contains("No such file"), "{message}");
            assert!(payload.is_none());
        }
        other => panic!("an io::Error returned: {other:?}"),
    }
}

#[tokio::test]
async fn large_values_travel_through_the_store() {
    let rt = rt();
    let values = vec![0.5f32; 1 << 20];
    let stored = rt.put(&values).unwrap();
    let total = sum::remote(rt, &stored).unwrap();
    assert_eq!(rt.get(&total).await.unwrap(), 0.5 * (1 << 20) as f64);
    let returned = big::remote(rt, 3 << 20).unwrap();
    let bytes = rt.get(&returned).await.unwrap();
    assert_eq!(bytes.len(), 3 << 20);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

#[tokio::test]
async fn nested_references_are_borrowed_and_resolved_where_used() {
    let rt = rt();
    let refs: Vec<ObjectRef<i64>> = (1..=10).map(|i| rt.put(&i).unwrap()).collect();
    let total = sum_refs::remote(rt, refs.clone()).unwrap();
    assert_eq!(rt.get(&total).await.unwrap(), 55);

    let made = make_refs::remote(rt, 5).unwrap();
    let inner = rt.get(&made).await.unwrap();
    drop(made);
    let values = rt.get_all(&inner).await.unwrap();
    assert_eq!(
        values,
        vec![0, 1, 2, 3, 4],
        "refs owned by a worker outlive its task while borrowed"
    );
}

#[tokio::test]
async fn wait_returns_the_first_k_ready() {
    let rt = rt();
    let slow = sleep_ms::remote(rt, 1500).unwrap();
    let fast1 = async_sleep_ms::remote(rt, 1).unwrap();
    let fast2 = add::remote(rt, 1, 1).unwrap().cast::<u64>();
    let refs = vec![slow.clone(), fast1.clone(), fast2.clone()];
    let (ready, rest) = rt.wait(&refs, 2, Some(Duration::from_secs(10))).await;
    assert_eq!(ready.len(), 2);
    assert!(ready.contains(&fast1) && ready.contains(&fast2));
    assert_eq!(rest, vec![slow.clone()]);
    let (ready, rest) = rt.wait(&rest, 1, Some(Duration::from_millis(20))).await;
    assert!(
        ready.is_empty() && rest.len() == 1,
        "timeout returns what is ready"
    );
}

#[tokio::test]
async fn a_panic_becomes_a_task_error_naming_the_function() {
    let rt = rt();
    let r = panics::remote(rt, "boom at line 7".to_string()).unwrap();
    match rt.get(&r).await {
        Err(Error::TaskError { function, message }) => {
            assert!(function.ends_with("panics"), "{function}");
            assert!(message.contains("boom at line 7"), "{message}");
            assert!(
                message.contains("(at runtime/tests/task_api.rs:"),
                "the panic's location: {message}"
            );
        }
        other => panic!("expected TaskError, got {other:?}"),
    }
    let after = add::remote(rt, 20, 22).unwrap();
    assert_eq!(rt.get(&after).await.unwrap(), 42, "the pool keeps serving");
}

#[tokio::test]
async fn an_unknown_function_is_a_typed_error() {
    let rt = rt();
    let r: ObjectRef<i64> =
        braid::__private::submit_task(rt, "no::such::function", &TaskOptions::new(), Ok(vec![]))
            .unwrap();
    assert_eq!(
        rt.get(&r).await.unwrap_err(),
        Error::UnknownFunction("no::such::function".into())
    );
}

#[tokio::test]
async fn per_call_timeout_and_cancel() {
    let rt = rt();
    let opts = TaskOptions::new().timeout(Duration::from_millis(100));
    let start = Instant::now();
    let r = async_sleep_ms::remote_with(rt, &opts, 5_000).unwrap();
    assert!(matches!(rt.get(&r).await, Err(Error::Timeout(_))));
    assert!(start.elapsed() < Duration::from_secs(4));

    let r = async_sleep_ms::remote(rt, 5_000).unwrap();
    assert!(rt.cancel(&r));
    assert_eq!(rt.get(&r).await.unwrap_err(), Error::Cancelled);
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn arrays_are_read_in_place() {
    let rt = rt();
    let values: Vec<f32> = (0..1 << 20).map(|i| i as f32).collect();
    let r = rt.put_array(&values).unwrap();
    let view = rt.get_array(&r).await.unwrap();
    assert_eq!(&view[..], &values[..]);
    let ptr = view.as_ptr() as usize;
    assert!(
        rt.store().arena_range().contains(&ptr),
        "the view points into the shared arena"
    );
}

#[tokio::test]
async fn batches_are_written_and_read_in_place() {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt64Type};
    use arrow_array::{Float32Array, RecordBatch, UInt64Array};
    use braid::store::batch::{BatchLayout, ColumnSpec, Primitive, ValuesMut};
    use std::sync::Arc;
    let rt = rt();
    let arena = rt.store().arena_range();
    let in_arena = |batch: &RecordBatch| {
        batch.columns().iter().all(|c| {
            c.to_data()
                .buffers()
                .iter()
                .all(|b| arena.contains(&(b.as_ptr() as usize)))
        })
    };

    // Built in place.
    let layout = BatchLayout::new(
        4,
        &[
            ColumnSpec::primitive("label", Primitive::Float32),
            ColumnSpec::primitive("feature", Primitive::UInt64),
        ],
    )
    .unwrap();
    let r = rt
        .put_batch_with(&layout, |w| {
            for column in w.columns() {
                match column.values {
                    ValuesMut::Float32(v) => v.copy_from_slice(&[1.0, 0.0, 1.0, 0.0]),
                    ValuesMut::UInt64(v) => v.copy_from_slice(&[7, 8, 9, 10]),
                    _ => unreachable!("two columns"),
                }
            }
            Ok(())
        })
        .unwrap();
    let batch = rt.get_batch(&r).await.unwrap();
    assert_eq!(
        batch.column(1).as_primitive::<UInt64Type>().values(),
        &[7, 8, 9, 10]
    );
    assert!(in_arena(&batch), "the columns point into the shared arena");

    // Written once from a batch built on the heap.
    let heap = RecordBatch::try_from_iter(vec![
        (
            "label",
            Arc::new(Float32Array::from(vec![0.5, 1.5])) as arrow_array::ArrayRef,
        ),
        ("feature", Arc::new(UInt64Array::from(vec![3, 4]))),
    ])
    .unwrap();
    let r = rt.put_batch(&heap).unwrap();
    let read = rt.get_batch(&r).await.unwrap();
    assert_eq!(read, heap);
    assert_eq!(
        read.column(0).as_primitive::<Float32Type>().values(),
        &[0.5, 1.5]
    );
    assert!(in_arena(&read));
}

#[tokio::test]
async fn a_lent_batch_is_read_in_another_process_and_a_freed_one_is_lost() {
    use arrow_array::{RecordBatch, UInt64Array};
    use std::sync::Arc;
    let rt = rt();
    let batch = RecordBatch::try_from_iter(vec![(
        "feature",
        Arc::new(UInt64Array::from(vec![1, 2, 3, 4])) as arrow_array::ArrayRef,
    )])
    .unwrap();
    let r = rt.put_batch(&batch).unwrap();
    let lent = r.lend();
    assert_eq!(sum_lent(lent.clone()).await.unwrap(), 10);
    let id = r.id();
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.store().contains(id).unwrap() {
        assert!(Instant::now() < deadline, "object still in the store");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lost = sum_lent(lent).await.unwrap_err().to_string();
    assert!(lost.contains("ObjectLost"), "{lost}");
}

#[tokio::test]
async fn a_batch_lent_as_it_is_sealed_is_held_by_its_reader_without_the_store() {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    use braid::store::batch::{BatchLayout, ColumnSpec, Primitive, ValuesMut};
    let rt = rt();
    let reader = LentReader::remote(rt).spawn().await.unwrap();
    let seat = reader.seat().await.unwrap();
    let layout =
        BatchLayout::new(4, &[ColumnSpec::primitive("feature", Primitive::UInt64)]).unwrap();
    for rows in [4u64, 40_000] {
        let layout = if rows == 4 {
            layout.clone()
        } else {
            // Above the leased size: created and sealed by calls.
            BatchLayout::new(
                rows as usize,
                &[ColumnSpec::primitive("feature", Primitive::UInt64)],
            )
            .unwrap()
        };
        let (object, lent) = rt
            .put_batch_lent(&layout, &seat, |writer| {
                if let ValuesMut::UInt64(v) = &mut writer.columns()[0].values {
                    for (i, x) in v.iter_mut().enumerate() {
                        *x = i as u64 + 1;
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(lent.ticket().map(|t| t.to()), Some(seat));
        // The owner reads it as usual.
        let mine = rt.get_batch(&object).await.unwrap();
        assert_eq!(
            mine.column(0).as_primitive::<UInt64Type>().len() as u64,
            rows
        );
        drop(mine);
        let (sum, adopted) = reader.sum(lent).await.unwrap();
        assert_eq!(sum, rows * (rows + 1) / 2);
        assert!(adopted, "the reader did not hold the batch by its ticket");
        let id = object.id();
        drop(object);
        let deadline = Instant::now() + Duration::from_secs(10);
        while rt.store().contains(id).unwrap() {
            assert!(Instant::now() < deadline, "a lent batch stays in the store");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // A reader of another store cannot be lent to.
    let stranger = {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let tokio_rt = tokio::runtime::Handle::current();
        let server = braid::store::StoreServer::bind(braid::store::StoreConfig::with_capacity(
            &socket,
            8 << 20,
        ))
        .await
        .unwrap();
        let handle = server.handle();
        tokio_rt.spawn(server.run());
        let client =
            tokio::task::spawn_blocking(move || braid::store::StoreClient::connect(&socket))
                .await
                .unwrap()
                .unwrap();
        let seat = client.seat();
        handle.shutdown();
        seat
    };
    let refused = rt.put_batch_lent(&layout, &stranger, |_| Ok(()));
    assert!(matches!(refused, Err(Error::BadRequest(_))), "{refused:?}");
}

#[test]
fn blocking_wrappers_work_outside_async_code() {
    let rt = rt();
    let r = add::remote(rt, 40, 2).unwrap();
    assert_eq!(rt.get_blocking(&r).unwrap(), 42);
}

#[tokio::test]
async fn a_dropped_object_leaves_the_store() {
    let rt = rt();
    let r = rt.put(&vec![1u8; 1 << 20]).unwrap();
    let id = r.id();
    assert!(rt.store().contains(id).unwrap());
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.store().contains(id).unwrap() {
        assert!(Instant::now() < deadline, "object still in the store");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
