//! ModelService: list, describe, load and unload hosted models.

use super::convert::{model_info_to_pb, precision_from_pb, variant_from_pb};
use super::pb::{self, model_service_server::ModelService};
use super::{check_bearer, to_status, Observe};
use crate::engine::Registry;
use crate::settings::ModelSettings;
use tonic::{Request, Response, Status};

pub struct Models {
    pub registry: Registry,
}

#[tonic::async_trait]
impl ModelService for Models {
    async fn list_models(&self, _req: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let obs = Observe::start("ListModels", "");
        let r = Ok(Response::new(pb::ListModelsResponse { models: self.registry.list().iter().map(model_info_to_pb).collect() }));
        obs.finish(&r);
        r
    }

    async fn get_model(&self, req: Request<pb::GetModelRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        let id = req.into_inner().id;
        let obs = Observe::start("GetModel", &self.registry.metric_label(&id));
        let r = self.registry.get(&id).map(|i| Response::new(model_info_to_pb(&i))).map_err(to_status);
        obs.finish(&r);
        r
    }

    async fn load_model(&self, req: Request<pb::LoadModelRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        check_bearer(&req, self.registry.settings().auth.admin_token.as_deref())?;
        let r = req.into_inner();
        let obs = Observe::start("LoadModel", &self.registry.metric_label(&r.id));
        let res = (|| {
            let ms = ModelSettings {
                id: r.id.clone(),
                variant: variant_from_pb(r.variant, "variant")?,
                checkpoint: (!r.checkpoint.is_empty()).then(|| r.checkpoint.clone().into()),
                device: (!r.device.is_empty()).then(|| r.device.clone()),
                precision: precision_from_pb(r.precision, "precision")?,
                decoders: r.decoders.map(|n| n as usize),
            };
            self.registry.load(ms)
        })()
        .map(|i| Response::new(model_info_to_pb(&i)))
        .map_err(to_status);
        obs.finish(&res);
        res
    }

    async fn unload_model(&self, req: Request<pb::UnloadModelRequest>) -> Result<Response<pb::UnloadModelResponse>, Status> {
        check_bearer(&req, self.registry.settings().auth.admin_token.as_deref())?;
        let id = req.into_inner().id;
        let obs = Observe::start("UnloadModel", &self.registry.metric_label(&id));
        let r = self.registry.unload(&id).map(|_| Response::new(pb::UnloadModelResponse {})).map_err(to_status);
        obs.finish(&r);
        r
    }
}
