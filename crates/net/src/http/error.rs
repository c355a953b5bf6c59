//! The one place where the router's own failures become HTTP responses.
//!
//! Bodies are short plain text naming the service (never backend
//! addresses or anything else a client should not learn).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use crate::http::body::RespBody;
use crate::http::table::ServiceId;

/// Why the router answered a request itself instead of forwarding it.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matched the request's host and path (404).
    #[error("no route for host {host} path {path}")]
    NoRoute {
        /// The request's host, normalized.
        host: String,
        /// The request's path.
        path: String,
    },
    /// The request was not valid HTTP/1.1, or had no usable host (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request head was larger than the router accepts (431).
    #[error("request header fields too large (the limit is {0} bytes for the whole head)")]
    HeadTooLarge(usize),
    /// The service has no instance the router may use now (503).
    #[error("no healthy instance of service {0}")]
    NoHealthyInstance(ServiceId),
    /// The service's bulkhead is full (503).
    #[error("service {service} is at its concurrency limit ({limit})")]
    AtConcurrencyLimit {
        /// The service.
        service: ServiceId,
        /// Its `max_concurrent`.
        limit: u32,
    },
    /// The instance did not answer within the upstream timeout (504).
    #[error("service {0} did not answer in time")]
    Timeout(ServiceId),
    /// Connecting to or talking with the instance failed (502).
    #[error("bad gateway: service {service} failed: {reason}")]
    Upstream {
        /// The service.
        service: ServiceId,
        /// What went wrong, without addresses.
        reason: &'static str,
    },
    /// The client went away before service answered: the request was
    /// cancelled. Nothing is sent (there is nobody to send it to); 499 is
    /// nginx's status for it in logs.
    #[error("the client closed the connection before service {0} answered")]
    ClientGone(ServiceId),
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoHealthyInstance(_) | ProxyError::AtConcurrencyLimit { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ClientGone(_) => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }

    /// The response as HTTP/1.1 bytes, appended to `out`, for the
    /// router's own HTTP/1.1 connections. With a `Date` (hyper adds one to
    /// the HTTP/2 responses).
    pub(crate) fn write_h1(&self, out: &mut Vec<u8>, close: bool) {
        use std::io::Write;
        let status = self.status();
        let body = format!("{self}\n");
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        crate::http::date::write_header(out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
    }

    /// The response sent to the client.
    pub(crate) fn into_response(self) -> Response<RespBody> {
        let mut body = self.to_string();
        body.push('\n');
        let mut resp = Response::new(RespBody::Local(Full::new(Bytes::from(body))));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}
