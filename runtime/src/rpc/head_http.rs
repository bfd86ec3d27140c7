//! What the head serves over HTTP, behind the cluster token: `/metrics`
//! (its families and its node's) and the dashboard (`/`, `/api/*`).

use super::head_service::HeadService;
use crate::dashboard::{ClusterView, Pending};
use crate::rpc::ClusterStatusRecord;
use crate::telemetry::Family;
use std::sync::Arc;

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
    metrics.merge(crate::dashboard::router(Arc::new(service), token))
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
