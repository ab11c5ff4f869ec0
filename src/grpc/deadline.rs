//! Request deadlines: the shorter of the client's `grpc-timeout` and `limits.request_timeout_ms`.
//! On expiry the call's future is dropped (queued model work for it is then skipped: its reply
//! channel is closed) and the client gets DEADLINE_EXCEEDED. tonic's own `Server::timeout`
//! answers CANCELLED, which tells a client that gave no deadline nothing about why. (tonic still
//! applies a client's `grpc-timeout` inside this layer, answering CANCELLED; this layer's
//! deadline is taken first, so it never expires after tonic's, and a client usually enforces
//! its own deadline as well.)
//!
//! As with tonic's timeout, the deadline covers a call until its response starts: a server
//! stream (Evaluate, Train) runs on once it has begun, and stops when the client goes away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::Status;

/// The grpc-timeout header (gRPC over HTTP/2): at most 8 digits and a unit, H M S m u n.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone, Debug)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// `limit`: the server's own deadline for every call.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, limit: self.limit }
    }
}

#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> tower::Service<Request<B>> for Deadline<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = grpc_timeout(req.headers()).map_or(self.limit, |t| t.min(self.limit));
        // Taken before the inner call starts tonic's timer on the same header (see above).
        let deadline = tokio::time::Instant::now() + limit;
        let call = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, call).await {
                Ok(r) => r,
                Err(_) => Ok(Status::deadline_exceeded(format!("the call's deadline ({} ms) passed before it was done", limit.as_millis()))
                    .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Option<Duration> {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        grpc_timeout(&h)
    }

    #[test]
    fn grpc_timeout_units_and_bad_values() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "12x", "-1S", "1.5S", "+1S"] {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&h), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
