//! The operator console at `/console`: a page, its style and its sign-in script — which hold no
//! data and are served to anyone — and the console itself (`/console/app.js`), served only to an
//! API client with the operator role, whose token the sign-in keeps for the tab and sends with
//! every `/v1/*` call the console makes. The files are embedded in the binary as written in
//! `console/` (no build step, no CDN), and served with a content security policy that allows
//! scripts from Vigil alone (and the `blob:` the sign-in loads the console from).

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../console/index.html");
const LOGIN: &str = include_str!("../console/login.js");
const APP: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/console.css");

/// Scripts and styles from Vigil only; calls to Vigil only; never framed.
const POLICY: &str = "default-src 'none'; script-src 'self' blob:; style-src 'self'; \
                      connect-src 'self'; img-src 'self' data:; form-action 'none'; \
                      frame-ancestors 'none'; base-uri 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /console`: the page and its sign-in form.
pub async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

/// `GET /console/login.js`.
pub async fn login() -> Response {
    asset(LOGIN, "text/javascript; charset=utf-8")
}

/// `GET /console/console.css`.
pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// `GET /console/app.js` (operator role): the console.
pub async fn app() -> Response {
    asset(APP, "text/javascript; charset=utf-8")
}
