//! Builds and runs the gRPC server: the skinsam services (behind the bearer-token
//! interceptor), grpc.health.v1 and server reflection.

use super::embedding::Embedding;
use super::evaluation::Evaluation;
use super::training::Training;
use super::models::Models;
use super::pb::{
    embedding_service_server::EmbeddingServiceServer, evaluation_service_server::EvaluationServiceServer,
    model_service_server::ModelServiceServer, training_service_server::TrainingServiceServer,
    segmentation_service_server::SegmentationServiceServer, FILE_DESCRIPTOR_SET,
};
use super::segmentation::Segmentation;
use crate::engine::Registry;
use crate::settings::Settings;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

pub const SERVICES: [&str; 3] = ["skinsam.v1.ModelService", "skinsam.v1.EmbeddingService", "skinsam.v1.SegmentationService"];
/// Services that need a ready model to serve.
const MODEL_SERVICES: [&str; 3] = ["skinsam.v1.EmbeddingService", "skinsam.v1.SegmentationService", "skinsam.v1.EvaluationService"];

/// Starts loading the configured models; one that cannot even start loading is logged and
/// skipped, the others still serve.
pub fn load_configured(registry: &Registry) {
    for ms in registry.settings().models.clone() {
        let id = ms.id.clone();
        if let Err(e) = registry.load(ms) {
            tracing::error!(model = %id, error = %e, "model not loaded");
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(registry: Registry, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let settings: Settings = registry.settings().clone();
    let max = settings.limits.max_message_bytes;
    let (reporter, health) = tonic_health::server::health_reporter();
    // On the signal: health says NOT_SERVING (load balancers stop sending), tonic stops
    // accepting and drains; `signalled` starts the grace period after which the streams still
    // open are dropped. Without it an open health watch or training stream held the process.
    let (signalled_tx, signalled) = tokio::sync::oneshot::channel::<()>();
    let draining = reporter.clone();
    let stopping = registry.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.begin_shutdown();
        for s in MODEL_SERVICES.iter().chain(&["skinsam.v1.ModelService", ""]) {
            draining.set_service_status(*s, ServingStatus::NotServing).await;
        }
        let _ = signalled_tx.send(());
    };
    for s in MODEL_SERVICES {
        reporter.set_service_status(s, ServingStatus::NotServing).await;
    }
    reporter.set_service_status("skinsam.v1.ModelService", ServingStatus::Serving).await;
    // Health follows the registry: model services serve once a model is ready.
    let mut changes = registry.subscribe();
    let watched = registry.clone();
    tokio::spawn(async move {
        loop {
            // A model that gets ready during the grace period must not undo NOT_SERVING.
            let status = if watched.any_ready() && !watched.shutting_down() { ServingStatus::Serving } else { ServingStatus::NotServing };
            for s in MODEL_SERVICES {
                reporter.set_service_status(s, status).await;
            }
            reporter.set_service_status("", status).await;
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(watch_gpu_memory(registry.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let token = settings.auth.token.clone();
    let admin = settings.auth.admin_token.clone();
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        // The admin token opens every RPC: admin RPCs check it again, and one authorization
        // header cannot carry the user token as well.
        if admin.is_some() && super::check_bearer(&req, admin.as_deref()).is_ok() {
            return Ok(req);
        }
        super::check_bearer(&req, token.as_deref())?;
        Ok(req)
    };
    let models = ModelServiceServer::new(Models { registry: registry.clone() }).max_decoding_message_size(max).max_encoding_message_size(max);
    let embedding = EmbeddingServiceServer::new(Embedding { registry: registry.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let segmentation = SegmentationServiceServer::new(Segmentation { registry: registry.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let evaluation = EvaluationServiceServer::new(Evaluation { registry: registry.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let training = TrainingServiceServer::new(Training::new(registry.clone())).max_decoding_message_size(max).max_encoding_message_size(max);
    let mut builder = tonic::transport::Server::builder();
    match (&settings.tls.cert, &settings.tls.key) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("tls: reading {}: {e}", p.display()));
            let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
            builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        }
        (None, None) => {}
        _ => anyhow::bail!("tls: set both tls.cert and tls.key, or neither"),
    }
    let grace = Duration::from_millis(settings.limits.shutdown_grace_ms);
    let server = builder
        // One span per request: every log line of the call carries its RPC path.
        .trace_fn(|req: &tonic::codegen::http::Request<()>| tracing::info_span!("grpc", rpc = %req.uri().path()))
        .layer(super::deadline::DeadlineLayer::new(Duration::from_millis(settings.limits.request_timeout_ms)))
        .add_service(health)
        .add_service(reflection)
        .add_service(InterceptedService::new(models, auth.clone()))
        .add_service(InterceptedService::new(embedding, auth.clone()))
        .add_service(InterceptedService::new(segmentation, auth.clone()))
        .add_service(InterceptedService::new(evaluation, auth.clone()))
        .add_service(InterceptedService::new(training, auth))
        // Without TCP_NODELAY, small responses wait on delayed ACKs (about 40 ms each).
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown);
    let grace_over = async move {
        match signalled.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = server => r?,
        () = grace_over => tracing::warn!(grace_ms = grace.as_millis() as u64, "shutdown: grace period over, closing the streams still open"),
    }
    Ok(())
}

/// Binds `addr` ("127.0.0.1:0" picks a free port) and returns the listener and its address.
pub async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Sets the GPU memory gauges every few seconds for each CUDA device that hosts a model.
async fn watch_gpu_memory(registry: Registry) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let mut devices: Vec<usize> = registry.list().iter().filter_map(|m| crate::device::cuda_index(&m.device)).collect();
        devices.sort_unstable();
        devices.dedup();
        for index in devices {
            let Ok(Some((used, total))) = tokio::task::spawn_blocking(move || crate::device::cuda_memory(index)).await else {
                continue;
            };
            let label = format!("cuda:{index}");
            metrics::gauge!(crate::metrics::GPU_MEMORY_USED_BYTES, "device" => label.clone()).set(used as f64);
            metrics::gauge!(crate::metrics::GPU_MEMORY_TOTAL_BYTES, "device" => label).set(total as f64);
        }
    }
}
