//! The head's dashboard: a page (HTML, JavaScript and CSS compiled into
//! the binary; no CDN, no Node toolchain) and the JSON it reads under
//! `/api/`. Everything is behind the cluster token: opening
//! `/?token=TOKEN` (the URL `braid start --head` prints) sets a cookie and
//! redirects to `/`; `/api/*` answers 401 without it.
//!
//! * `/api/nodes`, `/api/actors`, `/api/jobs`, `/api/placement_groups`:
//!   the head's tables ([`api`]).
//! * `/api/series`: every metric family of the head and of each live node
//!   (nodes answer their `/api/families`), labelled by node: the stream
//!   and online-learning pages are drawn from them.
//! * `/api/history?name=N`: the last ten minutes of the series drawn over
//!   time, sampled by the head each second ([`history`]).

pub mod api;
pub mod history;

use crate::rpc::ClusterStatusRecord;
use crate::telemetry::http::{protect, TOKEN_COOKIE};
use crate::telemetry::Family;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

const INDEX: &str = include_str!("assets/index.html");
const APP: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// A future the dashboard awaits.
pub type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the dashboard reads: the head's tables and every node's series.
pub trait ClusterView: Send + Sync + 'static {
    /// The head's tables now.
    fn status(&self) -> ClusterStatusRecord;
    /// The head's families, and each live node's (short node id, families).
    fn series(&self) -> Pending<Vec<(String, Vec<Family>)>>;
}

type View = Arc<dyn ClusterView>;

/// The dashboard's routes, behind `token`. Starts sampling the history,
/// which lasts as long as the routes.
pub fn router(view: View, token: &str) -> axum::Router {
    let history = Arc::new(history::History::default());
    history::History::sample(Arc::downgrade(&history), view.clone());
    let past = axum::Router::new()
        .route(
            "/api/history",
            get(
                |State(h): State<Arc<history::History>>,
                 Query(q): Query<HashMap<String, String>>| async move {
                    h.query(q.get("name").map_or("", String::as_str))
                },
            ),
        )
        .with_state(history);
    let routes = axum::Router::new()
        .route(
            "/api/nodes",
            get(|State(v): State<View>| async move { api::nodes(&v.status()) }),
        )
        .route(
            "/api/actors",
            get(|State(v): State<View>| async move { api::actors(&v.status()) }),
        )
        .route(
            "/api/jobs",
            get(|State(v): State<View>| async move { api::jobs(&v.status()) }),
        )
        .route(
            "/api/placement_groups",
            get(|State(v): State<View>| async move { api::placement_groups(&v.status()) }),
        )
        .route(
            "/api/series",
            get(|State(v): State<View>| async move { api::series(v.series().await) }),
        )
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { page(APP, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { page(STYLE, "text/css; charset=utf-8") }),
        )
        .with_state(view)
        .merge(past);
    protect(routes, token)
}

/// The page; opened as `/?token=T` (checked by then), it trades the token
/// for a cookie and sends the browser to `/`, so the token leaves the
/// address bar.
async fn index(Query(query): Query<HashMap<String, String>>) -> Response {
    match query.get("token") {
        Some(token) => (
            [(
                header::SET_COOKIE,
                format!("{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
            )],
            Redirect::to("/"),
        )
            .into_response(),
        None => page(INDEX, "text/html; charset=utf-8"),
    }
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
