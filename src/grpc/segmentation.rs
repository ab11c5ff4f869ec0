//! SegmentationService: prompts against a cached embedding or an inline image.

use super::convert::segment_request_from_pb;
use super::pb::{self, segmentation_service_server::SegmentationService};
use super::{ordered_stream, to_status, Observe, ResponseStream};
use crate::engine::Registry;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

pub struct Segmentation {
    pub registry: Registry,
}

async fn run(registry: &Registry, r: pb::SegmentRequest) -> Result<pb::SegmentResponse, Status> {
    let (source, prompts, encoding) = segment_request_from_pb(&r).map_err(to_status)?;
    let out = registry.segment(&r.model_id, source, prompts, r.multimask_output, r.return_low_res_logits, encoding).await.map_err(to_status)?;
    let (h, w) = (out.height, out.width);
    let masks = out
        .masks
        .into_iter()
        .map(|mk| pb::MaskResult {
            png: mk.png.unwrap_or_default(),
            rle: mk.rle.map(|counts| pb::Rle { height: h as i32, width: w as i32, counts }),
            scores: mk.scores,
            chosen_index: mk.best as i32,
            area: mk.area,
            low_res_logits: mk.low_res_logits.unwrap_or_default(),
            clipped: mk.clipped,
        })
        .collect();
    let resp = pb::SegmentResponse {
        request_id: r.request_id,
        embedding_handle: out.handle,
        height: h as i32,
        width: w as i32,
        masks,
        timing: Some(pb::Timing { queue_ms: out.queue.as_secs_f64() * 1e3, compute_ms: out.compute.as_secs_f64() * 1e3 }),
    };
    // Checked here: tonic's encoder would fail the call with OUT_OF_RANGE, and end a stream.
    let max = registry.settings().limits.max_message_bytes;
    let size = resp.encoded_len();
    if size > max {
        return Err(Status::resource_exhausted(format!(
            "prompts: the response would be {size} bytes, over the {max}-byte message limit; send fewer prompts per \
             request, or leave out return_low_res_logits or the PNG masks"
        )));
    }
    Ok(resp)
}

#[tonic::async_trait]
impl SegmentationService for Segmentation {
    async fn segment(&self, req: Request<pb::SegmentRequest>) -> Result<Response<pb::SegmentResponse>, Status> {
        let r = req.into_inner();
        let obs = Observe::start("Segment", &self.registry.metric_label(&r.model_id));
        let res = run(&self.registry, r).await.map(Response::new);
        obs.finish(&res);
        res
    }

    type SegmentStreamStream = ResponseStream<pb::SegmentResponse>;

    async fn segment_stream(&self, req: Request<Streaming<pb::SegmentRequest>>) -> Result<Response<Self::SegmentStreamStream>, Status> {
        let registry = self.registry.clone();
        Ok(Response::new(ordered_stream(req.into_inner(), move |r: pb::SegmentRequest, tx| {
            let registry = registry.clone();
            async move {
                if registry.shutting_down() {
                    let _ = tx.send(Err(super::shutting_down())).await;
                    return false;
                }
                let obs = Observe::start("SegmentStream", &registry.metric_label(&r.model_id));
                let res = run(&registry, r).await;
                obs.finish(&res);
                let ok = res.is_ok();
                tx.send(res).await.is_ok() && ok
            }
        })))
    }
}
