//! What the head serves over HTTP, behind the cluster token: `/metrics`
//! (its families and its node's), the dashboard (`/`, `/api/*`), and what
//! it gathers from every node: the spans of tasks and actor calls,
//! `/api/tasks?job=ID` (JSON) and `/api/timeline?job=ID` (a Chrome trace;
//! `braid timeline`), and the objects in the stores, `/api/objects`.

use super::head_service::HeadService;
use crate::dashboard::{ClusterView, Pending};
use crate::ids::JobId;
use crate::rpc::ClusterStatusRecord;
use crate::telemetry::Family;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
        .with_state(service.clone());
    metrics
        .merge(crate::telemetry::http::protect(spans, token))
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
