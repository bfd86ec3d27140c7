//! The conformance suite of the `Model` trait, run against every model
//! and every optimizer it trains with: what a job's workers, shards and
//! serving rely on a model for.
//!
//! * its gradient is the slope of the logistic loss (against central
//!   finite differences);
//! * a row predicts the same bits from a learner's table, from the
//!   parameters a worker pulls, and from serving's copy of them;
//! * a worker's step (pull, predict, gradient, push) trains a table
//!   exactly as the row learner does, zero gradients being no-ops;
//! * a snapshot round-trips byte for byte and restores a learner that
//!   goes on training as the original does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use braid_actors::checkpoint::storage::CheckpointStorage;
use braid_actors::stream::coordinator::JobConfig;
use braid_actors::stream::graph::StreamEnv;
use braid_actors::stream::local;
use braid_actors::stream::plan::Plan;
use braid_actors::train::data::{FeatureBatch, SyntheticConfig, SyntheticStream};
use braid_actors::train::messages::{Delta, ModelVersion};
use braid_actors::train::model::{FactorizationMachine, Learner, LogisticRegression, Model};
use braid_actors::train::optimizer::{logloss, FtrlParams, OptimizerKind, BIAS_KEY};
use braid_actors::train::pipeline::{self, PipelineConfig, RowReader, SyntheticReader};
use braid_actors::train::ps::{Consistency, PsConfig};
use braid_actors::train::serving::Serving;

/// A row: label, feature ids, optional values.
type Row = (f32, Vec<u64>, Option<Vec<f32>>);

/// Deterministic rows over `keys` keys: some with values (a few of them
/// 0), some with a key repeated, labels correlated with the keys.
fn rows(n: usize, keys: u64, seed: u64) -> Vec<Row> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let len = 1 + (next() % 8) as usize;
            let mut ids: Vec<u64> = (0..len).map(|_| next() % keys).collect();
            if i % 7 == 0 {
                ids.push(ids[0]);
            }
            let values = (i % 3 == 0).then(|| {
                ids.iter()
                    .enumerate()
                    .map(|(j, _)| {
                        if j == 1 {
                            0.0
                        } else {
                            0.25 + (next() % 8) as f32 / 4.0
                        }
                    })
                    .collect()
            });
            let score = ids.iter().filter(|k| **k % 3 == 0).count() as u64;
            let label = f32::from(u8::from(next() % 4 < 1 + score.min(2)));
            (label, ids, values)
        })
        .collect()
}

/// Every optimizer logistic regression trains with.
fn logistic_models() -> Vec<(&'static str, LogisticRegression)> {
    let ftrl = |l1, l2| {
        OptimizerKind::Ftrl(FtrlParams {
            alpha: 0.1,
            beta: 1.0,
            l1,
            l2,
        })
    };
    [
        ("ftrl", ftrl(0.0, 0.0)),
        ("ftrl-l1-l2", ftrl(0.05, 0.5)),
        ("sgd", OptimizerKind::Sgd { lr: 0.05 }),
        ("adagrad", OptimizerKind::AdaGrad { lr: 0.1, eps: 1e-6 }),
    ]
    .into_iter()
    .map(|(name, kind)| (name, LogisticRegression::new(kind).unwrap()))
    .collect()
}

/// A learner of `model` trained on `rows`.
fn trained<M: Model>(model: &M, rows: &[Row]) -> Learner<M> {
    let mut learner = Learner::with_model(model.clone(), 0).unwrap();
    for (label, ids, values) in rows {
        learner.learn(ids, values.as_deref(), *label).unwrap();
    }
    learner
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Sums a row as a worker does: its features in order, then the bias,
/// each with `params_of` its key.
fn row_of<M: Model>(
    model: &M,
    ids: &[u64],
    values: Option<&[f32]>,
    params_of: impl Fn(usize, u64) -> Vec<f32>,
) -> M::Row {
    let mut row = M::Row::default();
    for (i, &k) in ids.iter().enumerate() {
        model.add(&mut row, &params_of(i, k), values.map_or(1.0, |v| v[i]));
    }
    model.add(&mut row, &params_of(ids.len(), BIAS_KEY), 1.0);
    row
}

fn gradient_is_the_slope_of_logloss<M: Model>(name: &str, model: &M) {
    let learner = trained(model, &rows(3000, 64, 7));
    let h = 1e-2f32;
    let mut checked = 0;
    for (label, ids, values) in rows(40, 64, 99) {
        // Distinct keys: a repeated key's gradient is the sum of its
        // occurrences'.
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != ids.len() {
            continue;
        }
        let values = values.as_deref();
        let params = |_: usize, k: u64| learner.params(k).as_ref().to_vec();
        let row = row_of(model, &ids, values, params);
        let p = model.predict(&row);
        let d = model.margin_gradient(p, label);
        for (i, &k) in ids.iter().chain([&BIAS_KEY]).enumerate() {
            let x = values.map_or(1.0, |v| v.get(i).copied().unwrap_or(1.0));
            let at = learner.params(k);
            let g = model.gradient(&row, d, at.as_ref(), x);
            assert_eq!(g.as_ref().len(), M::WIDTH);
            for j in 0..M::WIDTH {
                let loss = |delta: f32| {
                    let row = row_of(model, &ids, values, |pos, key| {
                        let mut p = learner.params(key).as_ref().to_vec();
                        if pos == i {
                            p[j] += delta;
                        }
                        p
                    });
                    logloss(model.predict(&row), label)
                };
                let slope = (loss(h) - loss(-h)) / (2.0 * f64::from(h));
                let want = f64::from(g.as_ref()[j]);
                assert!(
                    (slope - want).abs() <= 1e-3 + 1e-2 * want.abs(),
                    "{name}: key {k} parameter {j}: gradient {want}, finite difference {slope}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "{name}: {checked} parameters checked");
}

fn learner_pulled_and_served_predictions_agree<M: Model>(name: &str, model: &M) {
    let learner = trained(model, &rows(3000, 1 << 10, 3));
    let mut keys: Vec<u64> = learner.table().iter().map(|(k, _)| k).collect();
    keys.sort_unstable();
    let mut params = Vec::new();
    learner.pull(&keys, &mut params);
    assert_eq!(params.len(), keys.len() * M::WIDTH);
    for bits_of_space in [Some(12), None] {
        let mut config = PsConfig::new(name, 1, 1, OptimizerKind::Sgd { lr: 0.1 });
        config.feature_bits = bits_of_space;
        let serving = Serving::with_model(&config, model.clone());
        serving.apply(Delta {
            shard: 0,
            version: ModelVersion {
                epoch: 0,
                records: 3000,
            },
            full: true,
            keys: keys.clone().into(),
            weights: params.clone().into(),
            batches: Vec::new(),
        });
        for (_, ids, values) in rows(200, 1 << 11, 5) {
            let values = values.as_deref();
            let local = learner.predict(&ids, values).unwrap();
            let mut wanted: Vec<u64> = ids.clone();
            wanted.push(BIAS_KEY);
            let mut pulled = Vec::new();
            learner.pull(&wanted, &mut pulled);
            let row = row_of(model, &ids, values, |i, _| {
                pulled[i * M::WIDTH..(i + 1) * M::WIDTH].to_vec()
            });
            let worker = model.predict(&row);
            let served = serving.read(|view| view.predict(&ids, values));
            assert_eq!(
                local.to_bits(),
                worker.to_bits(),
                "{name}: learner {local} vs pulled {worker}"
            );
            assert_eq!(
                served.to_bits(),
                worker.to_bits(),
                "{name} ({bits_of_space:?} bits): served {served} vs pulled {worker}"
            );
        }
    }
}

fn a_workers_step_trains_as_the_learner_does<M: Model>(name: &str, model: &M) {
    let mut learned = Learner::with_model(model.clone(), 0).unwrap();
    let mut pushed = Learner::with_model(model.clone(), 0).unwrap();
    for (label, ids, values) in rows(2000, 256, 11) {
        let values = values.as_deref();
        let want = learned.learn(&ids, values, label).unwrap();
        let mut keys = ids.clone();
        keys.push(BIAS_KEY);
        let mut pulled = Vec::new();
        pushed.pull(&keys, &mut pulled);
        let x = |i: usize| values.map_or(1.0, |v| v.get(i).copied().unwrap_or(1.0));
        let params = |i: usize| &pulled[i * M::WIDTH..(i + 1) * M::WIDTH];
        let mut row = M::Row::default();
        for i in 0..keys.len() {
            model.add(&mut row, params(i), x(i));
        }
        let p = model.predict(&row);
        assert_eq!(p.to_bits(), want.to_bits(), "{name}: prediction");
        let d = model.margin_gradient(p, label);
        let mut grads = Vec::new();
        for i in 0..keys.len() {
            grads.extend_from_slice(model.gradient(&row, d, params(i), x(i)).as_ref());
        }
        pushed.push(&keys, &grads).unwrap();
    }
    assert_eq!(
        pushed.to_bytes(),
        learned.to_bytes(),
        "{name}: pulls and pushes trained another table than learn"
    );
    // Zero gradients insert nothing; absent keys read 0.
    let before = pushed.to_bytes();
    let absent = [1u64 << 40, (1 << 40) + 1];
    pushed.push(&absent, &vec![0.0; 2 * M::WIDTH]).unwrap();
    assert_eq!(
        pushed.to_bytes(),
        before,
        "{name}: a zero gradient changed the table"
    );
    let mut out = vec![f32::NAN];
    pushed.pull(&absent, &mut out);
    assert_eq!(bits(&out), vec![0; 2 * M::WIDTH], "{name}: absent keys");
    assert!(
        pushed.push(&absent, &[0.0]).is_err() || M::WIDTH == 0,
        "{name}: a push of the wrong length is refused"
    );
}

fn a_snapshot_round_trips_and_trains_on_alike<M: Model>(name: &str, model: &M) {
    let data = rows(3000, 512, 21);
    let (first, rest) = data.split_at(1500);
    let mut original = trained(model, first);
    let bytes = original.to_bytes();
    assert_eq!(bytes.len(), original.encoded_len());
    let mut restored = Learner::<M>::from_bytes(&bytes).unwrap();
    assert_eq!(restored.to_bytes(), bytes, "{name}: not byte for byte");
    for (label, ids, values) in rest {
        let a = original.learn(ids, values.as_deref(), *label).unwrap();
        let b = restored.learn(ids, values.as_deref(), *label).unwrap();
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{name}: predictions after restore"
        );
    }
    assert_eq!(
        restored.to_bytes(),
        original.to_bytes(),
        "{name}: trained apart"
    );
    assert!(Learner::<M>::from_bytes(&bytes[..bytes.len() / 2]).is_err());
}

/// Runs the whole suite against `model`.
fn conformance<M: Model>(name: &str, model: M) {
    gradient_is_the_slope_of_logloss(name, &model);
    learner_pulled_and_served_predictions_agree(name, &model);
    a_workers_step_trains_as_the_learner_does(name, &model);
    a_snapshot_round_trips_and_trains_on_alike(name, &model);
}

#[test]
fn logistic_regression_conforms_under_every_optimizer() {
    for (name, model) in logistic_models() {
        conformance(name, model);
    }
}

fn factorization_machines() -> Vec<(&'static str, FactorizationMachine)> {
    vec![
        ("fm", FactorizationMachine::new(0.05, 1e-6, 0.1, 7).unwrap()),
        (
            "fm-wide-init",
            FactorizationMachine::new(0.1, 0.0, 0.3, 1).unwrap(),
        ),
    ]
}

#[test]
fn factorization_machines_conform() {
    for (name, model) in factorization_machines() {
        conformance(name, model);
    }
    assert!(FactorizationMachine::new(0.0, 0.0, 0.1, 0).is_err());
    assert!(FactorizationMachine::new(0.1, -1.0, 0.1, 0).is_err());
    assert!(FactorizationMachine::new(0.1, 0.0, f32::NAN, 0).is_err());
}

/// Progressive logloss of the last `tail` of `rows` rows whose label is
/// the XOR of two one-hot features: no weights separate it, an
/// interaction does.
fn xor_logloss<M: Model>(model: M, rows: usize, tail: usize) -> f64 {
    let mut learner = Learner::with_model(model, 0).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut loss = 0.0;
    for i in 0..rows {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (a, b) = (x & 1, (x >> 1) & 1);
        let label = (a ^ b) as f32;
        let p = learner.learn(&[10 + a, 20 + b], None, label).unwrap();
        if i >= rows - tail {
            loss += logloss(p, label);
        }
    }
    loss / tail as f64
}

#[test]
fn a_factorization_machine_learns_an_interaction_logistic_regression_cannot() {
    let lr = LogisticRegression::new(OptimizerKind::AdaGrad { lr: 0.1, eps: 1e-6 }).unwrap();
    let fm = FactorizationMachine::new(0.1, 1e-6, 0.1, 3).unwrap();
    let (lr, fm) = (
        xor_logloss(lr, 20_000, 2_000),
        xor_logloss(fm, 20_000, 2_000),
    );
    assert!(lr > 0.69, "logistic regression's logloss {lr}");
    assert!(fm < 0.1, "the factorization machine's logloss {fm}");
}

/// The job's serving parameters, by key, after training `model` on
/// `rows` synthetic rows with `workers` × `shards` under BSP.
fn served_by_the_job<M: Model>(
    model: M,
    workers: usize,
    shards: usize,
    rows: u64,
) -> Vec<(u64, Vec<u32>)> {
    let name = format!("fm-job-{}-{workers}x{shards}", std::process::id());
    let mut ps = PsConfig::new(&name, workers, shards, OptimizerKind::Sgd { lr: 0.1 });
    ps.consistency = Consistency::Bsp;
    ps.feature_bits = Some(12);
    let mut config = PipelineConfig::new(ps);
    config.batch_rows = 64;
    config.rows = Some(rows);
    let env = StreamEnv::new(1);
    let handles = pipeline::build_model(&env, config, model, move || {
        let stream = SyntheticStream::new(synthetic(rows))?;
        Ok(Box::new(SyntheticReader(stream)) as Box<dyn RowReader>)
    })
    .unwrap();
    let report = local::run(
        &Plan::new(env.into_graph()),
        JobConfig::new(CheckpointStorage::in_memory(&name, 2)),
    )
    .unwrap();
    assert_eq!(report.failures, 0);
    let figures = handles.eval.figures();
    assert_eq!(figures.rows, rows);
    assert!(figures.auc > 0.55, "auc {}", figures.auc);
    handles.serving.read(|served| {
        (0..1u64 << 12)
            .chain([BIAS_KEY])
            .map(|k| (k, bits(served.params(k).as_ref())))
            .filter(|(_, p)| p.iter().any(|b| *b != 0))
            .collect()
    })
}

fn synthetic(rows: u64) -> SyntheticConfig {
    SyntheticConfig {
        rows,
        bits: 12,
        ..SyntheticConfig::default()
    }
}

/// What one learner of `model` holds after the same rows, as
/// [`served_by_the_job`] reports it.
fn learned_alone<M: Model>(model: M, rows: u64) -> Vec<(u64, Vec<u32>)> {
    let mut reader = SyntheticReader(SyntheticStream::new(synthetic(rows)).unwrap());
    let mut learner = Learner::with_model(model, 0).unwrap();
    let mut batch = FeatureBatch::new();
    loop {
        batch.clear();
        if reader.read(&mut batch, 1000).unwrap() == 0 {
            break;
        }
        for (label, ids, values) in batch.iter() {
            learner.learn(ids, values, label).unwrap();
        }
    }
    (0..1u64 << 12)
        .chain([BIAS_KEY])
        .map(|k| (k, bits(learner.params(k).as_ref())))
        .filter(|(_, p)| p.iter().any(|b| *b != 0))
        .collect()
}

#[test]
fn a_factorization_machine_trains_and_serves_through_the_unchanged_job() {
    let fm = FactorizationMachine::new(0.05, 1e-6, 0.1, 11).unwrap();
    // One worker chains its shards: the job trains as one learner does.
    let chained = served_by_the_job(fm, 1, 2, 12_000);
    assert_eq!(
        chained,
        learned_alone(fm, 12_000),
        "chained job vs one learner"
    );
    // Workers pull, predict, push: BSP runs are deterministic.
    let a = served_by_the_job(fm, 2, 3, 12_000);
    assert!(!a.is_empty());
    assert_eq!(
        a,
        served_by_the_job(fm, 2, 3, 12_000),
        "two BSP runs differ"
    );
}
