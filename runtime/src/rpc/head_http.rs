//! What the head serves over HTTP, behind the cluster token: `/metrics`
//! (its families and its node's).

use super::head_service::HeadService;
use std::sync::Arc;

/// The head's HTTP routes.
pub(crate) fn router(service: HeadService, token: &str) -> axum::Router {
    crate::telemetry::http::metrics_router(
        token,
        Arc::new(move || {
            let service = service.clone();
            Box::pin(async move { service.metrics_text().await })
        }),
    )
}
