//! Transport: the gRPC services over the engine.

pub mod convert;
pub mod deadline;
pub mod embedding;
pub mod evaluation;
pub mod training;
pub mod models;
pub mod segmentation;
pub mod server;

pub mod pb {
    tonic::include_proto!("skinsam.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("skinsam_descriptor");
}

use crate::error::Error;
use crate::metrics as m;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Code, Status};

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Responses buffered per stream before the handler waits for the client to read.
const STREAM_BUFFER: usize = 4;

/// Serves a bidirectional stream one request at a time, so responses keep request order.
/// `handle` sends the responses for one request and returns false to end the stream (after an
/// error status, or when a send failed because the client went away, which stops the work).
pub fn ordered_stream<Req, Resp, F, Fut>(input: impl Stream<Item = Result<Req, Status>> + Send + 'static, mut handle: F) -> ResponseStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: FnMut(Req, mpsc::Sender<Result<Resp, Status>>) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        futures::pin_mut!(input);
        loop {
            match input.next().await.transpose() {
                Ok(Some(req)) => {
                    // The client going away drops the request's future, and with it the reply
                    // channel the model thread checks before it starts the work.
                    let keep = tokio::select! {
                        biased;
                        () = tx.closed() => false,
                        keep = handle(req, tx.clone()) => keep,
                    };
                    if !keep {
                        break;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    break;
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// What a stream's next message gets once the server has had its shutdown signal: the stream
/// ends there, instead of taking work the grace period may cut off.
pub fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down; send the rest of the stream to another replica")
}

/// The one mapping from engine errors to gRPC statuses. libtorch and internal failures keep
/// their details in the logs.
pub fn to_status(e: Error) -> Status {
    match e {
        Error::InvalidArgument { field, message } => Status::invalid_argument(format!("{field}: {message}")),
        Error::NotFound(m) => Status::not_found(m),
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::Checkpoint(c @ crate::model::CheckpointError::Write { .. }) => {
            tracing::error!(error = %c, "writing a file failed");
            Status::internal("internal error (details in the server log)")
        }
        Error::Checkpoint(c) => Status::invalid_argument(format!("checkpoint: {c}")),
        Error::Torch(t) => {
            tracing::error!(error = %t, "libtorch failure");
            Status::internal("internal error (details in the server log)")
        }
        Error::Internal(msg) => {
            tracing::error!(error = %msg, "internal error");
            Status::internal("internal error (details in the server log)")
        }
    }
}

fn code_label(c: Code) -> &'static str {
    match c {
        Code::Ok => "ok",
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable",
        Code::FailedPrecondition => "failed_precondition",
        Code::Cancelled => "cancelled",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        _ => "internal",
    }
}

/// Latency, in-flight and status-code metrics around one unary call or one stream message.
pub struct Observe {
    rpc: &'static str,
    model: String,
    start: Instant,
    finished: bool,
}

impl Observe {
    pub fn start(rpc: &'static str, model: &str) -> Self {
        metrics::gauge!(m::IN_FLIGHT, "rpc" => rpc).increment(1.0);
        Self { rpc, model: model.to_owned(), start: Instant::now(), finished: false }
    }

    pub fn finish<T>(mut self, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        self.finished = true;
        metrics::histogram!(m::REQUEST_SECONDS, "rpc" => self.rpc, "model" => self.model.clone()).record(self.start.elapsed().as_secs_f64());
        metrics::counter!(m::REQUESTS_TOTAL, "rpc" => self.rpc, "code" => code_label(code)).increment(1);
    }
}

impl Drop for Observe {
    fn drop(&mut self) {
        // Dropped unfinished: the call's future was dropped, because the client went away or
        // its deadline passed (the client gets DEADLINE_EXCEEDED then); both are counted as
        // "cancelled": the call's work was abandoned.
        if !self.finished {
            self.record(Code::Cancelled);
        }
        metrics::gauge!(m::IN_FLIGHT, "rpc" => self.rpc).decrement(1.0);
    }
}

/// Bearer-token check used by the interceptor (all RPCs) and by the admin RPCs.
pub fn check_bearer<T>(req: &tonic::Request<T>, token: Option<&str>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match got {
        // An empty token never matches (settings refuse an empty one; this guards the check itself).
        Some(t) if !t.is_empty() && constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Status::permission_denied("wrong bearer token")),
        None => Err(Status::unauthenticated("missing 'authorization: Bearer <token>' metadata")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_bearer_token_never_matches() {
        let mut req = tonic::Request::new(());
        req.metadata_mut().insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(check_bearer(&req, Some("")).unwrap_err().code(), Code::PermissionDenied);
        req.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
        assert!(check_bearer(&req, Some("t")).is_ok());
    }

    #[tokio::test]
    async fn a_stream_the_client_leaves_drops_the_request_in_hand() {
        // The request's future holds the model's reply channel: dropping it is what tells the
        // model thread to skip the work.
        struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.take().map(|t| t.send(()));
            }
        }
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel();
        let mut guard = Some(Dropped(Some(dropped_tx)));
        let input = tokio_stream::iter([Ok::<u32, Status>(1)]).chain(tokio_stream::pending());
        let out: ResponseStream<u32> = ordered_stream(input, move |_req, _tx| {
            let g = guard.take();
            async move {
                let _g = g;
                std::future::pending::<bool>().await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(out); // the client went away
        tokio::time::timeout(std::time::Duration::from_secs(5), dropped).await.expect("the request in hand was dropped").unwrap();
    }
}
