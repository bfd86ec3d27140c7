//! What the head serves over HTTP, behind the cluster token: `/metrics`
//! (its families and its node's), the dashboard (`/`, `/api/*`), and what
//! it gathers from every node: the spans of tasks and actor calls,
//! `/api/tasks?job=ID` (JSON) and `/api/timeline?job=ID` (a Chrome trace;
//! `braid timeline`), and the objects in the stores, `/api/objects`.

use super::head_service::HeadService;
use super::job_manager::{JobManager, JobRequestError, SubmitRequest};
use super::job_package::{PackageError, MAX_PACKAGE_BYTES};
use crate::dashboard::{ClusterView, Pending};
use crate::ids::JobId;
use crate::rpc::ClusterStatusRecord;
use crate::telemetry::Family;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::Arc;

/// The `job` of a query: none, a job id, or the text that is not one.
fn job_of(query: &HashMap<String, String>) -> Result<Option<JobId>, String> {
    match query.get("job").filter(|j| !j.is_empty()) {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| text.clone()),
    }
}

/// The 400 answering a query whose `job` is not a job id.
fn not_a_job(text: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("not a job id: {text:?}\n")).into_response()
}

/// The head's HTTP routes.
pub(crate) fn router(service: HeadService, token: &str) -> axum::Router {
    let scrape = service.clone();
    let metrics = crate::telemetry::http::metrics_router(
        token,
        Arc::new(move || {
            let service = scrape.clone();
            Box::pin(async move { service.metrics_text().await })
        }),
    );
    let spans = axum::Router::new()
        .route(
            "/api/tasks",
            get(
                |State(s): State<HeadService>, Query(q): Query<HashMap<String, String>>| async move {
                    match job_of(&q) {
                        Ok(job) => axum::Json(s.all_spans(job).await).into_response(),
                        Err(text) => not_a_job(text),
                    }
                },
            ),
        )
        .route(
            "/api/timeline",
            get(
                |State(s): State<HeadService>, Query(q): Query<HashMap<String, String>>| async move {
                    match job_of(&q) {
                        Ok(job) => {
                            let spans = s.all_spans(job).await;
                            let trace = tokio::task::spawn_blocking(move || {
                                crate::telemetry::timeline::chrome_trace(&spans)
                            })
                            .await
                            .unwrap_or_default();
                            ([(header::CONTENT_TYPE, "application/json")], trace).into_response()
                        }
                        Err(text) => not_a_job(text),
                    }
                },
            ),
        )
        .route(
            "/api/objects",
            get(
                |State(s): State<HeadService>, Query(q): Query<HashMap<String, String>>| async move {
                    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(1000);
                    let path = format!("/api/objects?limit={limit}");
                    let listed: Vec<serde_json::Value> = s
                        .gather::<braid_store::ObjectInfo>(&path)
                        .await
                        .into_iter()
                        .flat_map(|(node, objects)| {
                            objects.into_iter().map(move |o| {
                                serde_json::json!({
                                    "object_id": o.id.to_string(),
                                    "node_id": node.to_string(),
                                    "size": o.size,
                                    "state": format!("{:?}", o.state).to_uppercase(),
                                    "pins": o.pins,
                                })
                            })
                        })
                        .take(limit)
                        .collect();
                    axum::Json(listed)
                },
            ),
        )
        .route(
            "/api/workers",
            get(
                |State(s): State<HeadService>, Query(q): Query<HashMap<String, String>>| async move {
                    let path = match q.get("job") {
                        Some(job) => format!("/api/workers?job={job}"),
                        None => "/api/workers".to_string(),
                    };
                    let listed: Vec<serde_json::Value> = s
                        .gather::<crate::node::WorkerLog>(&path)
                        .await
                        .into_iter()
                        .flat_map(|(node, workers)| {
                            workers.into_iter().map(move |w| {
                                serde_json::json!({
                                    "node_id": node.to_string(),
                                    "pid": w.pid,
                                    "job_id": w.job.to_string(),
                                    "log": w.path,
                                    "exited": w.exited,
                                })
                            })
                        })
                        .collect();
                    axum::Json(listed)
                },
            ),
        )
        .route(
            "/api/logs",
            get(
                |State(s): State<HeadService>, Query(q): Query<HashMap<String, String>>| async move {
                    let Some(node) = q.get("node") else {
                        return (StatusCode::BAD_REQUEST, "which node? (?node=ID)\n").into_response();
                    };
                    let mut path = format!(
                        "/api/logs?offset={}",
                        q.get("offset").map_or("0", String::as_str)
                    );
                    if let Some(pid) = q.get("pid") {
                        path.push_str(&format!("&pid={pid}"));
                    }
                    match s.node_api(node, &path).await {
                        Ok(answer) => (
                            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY),
                            [(header::CONTENT_TYPE, "application/json")],
                            answer.body,
                        )
                            .into_response(),
                        Err(message) => (StatusCode::NOT_FOUND, format!("{message}\n")).into_response(),
                    }
                },
            ),
        )
        .with_state(service.clone());
    metrics
        .merge(crate::telemetry::http::protect(spans, token))
        .merge(crate::telemetry::http::protect(
            jobs_router(service.clone()),
            token,
        ))
        .merge(crate::dashboard::router(Arc::new(service), token))
}

impl ClusterView for HeadService {
    fn status(&self) -> ClusterStatusRecord {
        self.status_now()
    }

    fn series(&self) -> Pending<Vec<(String, Vec<Family>)>> {
        let service = self.clone();
        Box::pin(async move { service.all_families().await })
    }
}

/// A job request's answer: its JSON, or the refusal with its status.
fn answered<T: serde::Serialize>(result: Result<T, JobRequestError>) -> Response {
    match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(e @ JobRequestError::NotFound(_)) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Err(e @ (JobRequestError::Invalid(_) | JobRequestError::Package(_))) => {
            let status = match e {
                JobRequestError::Package(PackageError::TooLarge { .. }) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                JobRequestError::Package(PackageError::Io { .. }) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            };
            (status, format!("{e}\n")).into_response()
        }
        Err(e @ JobRequestError::Elsewhere(_)) => {
            (StatusCode::CONFLICT, format!("{e}\n")).into_response()
        }
        Err(e @ JobRequestError::NoPackage(_)) => {
            (StatusCode::GONE, format!("{e}\n")).into_response()
        }
        Err(e @ JobRequestError::Io(_)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

/// The submitted jobs' routes: `PUT /api/jobs/packages/{name}` (a working
/// directory's tar archive, named by its SHA-256), `POST /api/jobs/submit`
/// (a [`SubmitRequest`]), `GET /api/jobs/submitted[/{id}]`, `GET
/// /api/jobs/submitted/{id}/logs?offset=N`, `POST
/// /api/jobs/submitted/{id}/stop`.
fn jobs_router(service: HeadService) -> axum::Router {
    type Jobs = Option<Arc<JobManager>>;
    fn unavailable() -> Response {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "this head runs no submitted jobs\n",
        )
            .into_response()
    }
    fn with(jobs: Jobs, act: impl FnOnce(Arc<JobManager>) -> Response) -> Response {
        match jobs {
            Some(jobs) => act(jobs),
            None => unavailable(),
        }
    }
    fn id_of(text: &str) -> Result<JobId, JobRequestError> {
        text.parse()
            .map_err(|_| JobRequestError::Invalid(format!("not a job id: {text:?}")))
    }
    axum::Router::new()
        .route(
            "/api/jobs/packages/{name}",
            axum::routing::put(
                |State(j): State<Jobs>, Path(name): Path<String>, body: axum::body::Bytes| async move {
                    let Some(jobs) = j else {
                        return unavailable();
                    };
                    let stored =
                        tokio::task::spawn_blocking(move || jobs.store_package(&name, &body)).await;
                    match stored {
                        Ok(result) => answered(result),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
                            .into_response(),
                    }
                },
            )
            .layer(axum::extract::DefaultBodyLimit::max(
                usize::try_from(MAX_PACKAGE_BYTES).unwrap_or(usize::MAX),
            )),
        )
        .route(
            "/api/jobs/submit",
            post(
                |State(j): State<Jobs>, axum::Json(request): axum::Json<SubmitRequest>| async move {
                    with(j, |jobs| answered(jobs.submit(request)))
                },
            ),
        )
        .route(
            "/api/jobs/submitted",
            get(|State(j): State<Jobs>| async move {
                with(j, |jobs| axum::Json(jobs.list()).into_response())
            }),
        )
        .route(
            "/api/jobs/submitted/{id}",
            get(|State(j): State<Jobs>, Path(id): Path<String>| async move {
                with(j, |jobs| answered(id_of(&id).and_then(|id| jobs.get(id))))
            }),
        )
        .route(
            "/api/jobs/submitted/{id}/logs",
            get(
                |State(j): State<Jobs>,
                 Path(id): Path<String>,
                 Query(q): Query<HashMap<String, String>>| async move {
                    let offset = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
                    with(j, |jobs| {
                        answered(id_of(&id).and_then(|id| jobs.logs(id, offset)))
                    })
                },
            ),
        )
        .route(
            "/api/jobs/submitted/{id}/stop",
            post(|State(j): State<Jobs>, Path(id): Path<String>| async move {
                with(j, |jobs| answered(id_of(&id).and_then(|id| jobs.stop(id))))
            }),
        )
        .with_state(service.jobs())
}
