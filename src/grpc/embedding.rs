//! EmbeddingService: unary and bidirectional-stream image embedding.

use super::convert::{check_request_id, tensor_format_from_pb};
use super::pb::{self, embedding_service_server::EmbeddingService};
use super::{ordered_stream, to_status, Observe, ResponseStream};
use crate::engine::{EmbedOutput, Registry};
use crate::error::invalid;
use tonic::{Request, Response, Status, Streaming};

pub struct Embedding {
    pub registry: Registry,
}

/// Room left in a message for the fields around an embedding chunk (the request id, at most
/// [`super::convert::MAX_REQUEST_ID_BYTES`], the handle, the shape).
const CHUNK_OVERHEAD: usize = 64 * 1024;

fn response(req_id: &str, o: &EmbedOutput) -> pb::EmbedResponse {
    pb::EmbedResponse {
        request_id: req_id.to_owned(),
        embedding_handle: o.handle.clone(),
        cache_hit: o.cache_hit,
        original_height: o.original_size.0 as i32,
        original_width: o.original_size.1 as i32,
        timing: Some(pb::Timing { queue_ms: o.queue.as_secs_f64() * 1e3, compute_ms: o.compute.as_secs_f64() * 1e3 }),
        last_chunk: true,
        ..Default::default()
    }
}

async fn run(registry: &Registry, r: pb::EmbedRequest) -> Result<EmbedOutput, Status> {
    if r.model_id.is_empty() {
        return Err(to_status(invalid("model_id", "is empty")));
    }
    check_request_id(&r.request_id).map_err(to_status)?;
    let format = tensor_format_from_pb(r.return_embedding, "return_embedding").map_err(to_status)?;
    registry.embed(&r.model_id, r.image, format).await.map_err(to_status)
}

#[tonic::async_trait]
impl EmbeddingService for Embedding {
    async fn embed(&self, req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let r = req.into_inner();
        let obs = Observe::start("Embed", &self.registry.metric_label(&r.model_id));
        let req_id = r.request_id.clone();
        let fmt = r.return_embedding;
        let max = self.registry.settings().limits.max_message_bytes;
        let res = run(&self.registry, r).await.and_then(|o| {
            let mut resp = response(&req_id, &o);
            if let Some((shape, bytes)) = o.embedding {
                if bytes.len() + CHUNK_OVERHEAD > max {
                    return Err(Status::resource_exhausted(format!(
                        "return_embedding: {} bytes exceed the {max}-byte message limit; use EmbedStream (chunked) or FP16",
                        bytes.len()
                    )));
                }
                resp.embedding_shape = shape;
                resp.embedding_format = fmt;
                resp.embedding_chunk = bytes;
            }
            Ok(Response::new(resp))
        });
        obs.finish(&res);
        res
    }

    type EmbedStreamStream = ResponseStream<pb::EmbedResponse>;

    async fn embed_stream(&self, req: Request<Streaming<pb::EmbedRequest>>) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let registry = self.registry.clone();
        let chunk = registry.settings().limits.max_message_bytes.saturating_sub(CHUNK_OVERHEAD).max(1);
        Ok(Response::new(ordered_stream(req.into_inner(), move |r: pb::EmbedRequest, tx| {
            let registry = registry.clone();
            async move {
                if registry.shutting_down() {
                    let _ = tx.send(Err(super::shutting_down())).await;
                    return false;
                }
                let obs = Observe::start("EmbedStream", &registry.metric_label(&r.model_id));
                let req_id = r.request_id.clone();
                let fmt = r.return_embedding;
                let res = run(&registry, r).await;
                obs.finish(&res);
                let o = match res {
                    Ok(o) => o,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return false;
                    }
                };
                let base = response(&req_id, &o);
                let Some((shape, bytes)) = o.embedding else {
                    return tx.send(Ok(base)).await.is_ok();
                };
                // Chunked so that no message exceeds the limit; the last says so.
                let n = bytes.len().div_ceil(chunk).max(1);
                for (i, part) in bytes.chunks(chunk).enumerate() {
                    let msg = pb::EmbedResponse {
                        embedding_shape: shape.clone(),
                        embedding_format: fmt,
                        embedding_chunk: part.to_vec(),
                        last_chunk: i + 1 == n,
                        ..base.clone()
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return false;
                    }
                }
                true
            }
        })))
    }
}
