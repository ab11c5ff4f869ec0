#![allow(dead_code)]
use skinsam::model::{Sam, SamVariant};
use skinsam::predictor::Predictor;
use skinsam::engine::Registry;
use skinsam::grpc::server::{bind, load_configured, serve};
use skinsam::settings::Settings;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_checkpoint() -> PathBuf {
    fixtures().join("golden/sam_tiny.pth")
}

/// The built-in defaults with the trained default model swapped for the tiny random-weight one,
/// so that server tests stay fast and their numbers come from the golden fixtures.
pub fn tiny_settings() -> Settings {
    let mut s = Settings::defaults();
    s.models = vec![skinsam::settings::ModelSettings {
        id: "tiny-random".into(),
        variant: SamVariant::Tiny,
        checkpoint: Some(tiny_checkpoint()),
        device: None,
        precision: skinsam::model::Precision::Fp32,
        decoders: None,
    }];
    s
}

pub fn tiny_predictor() -> Predictor {
    let (sam, _) = Sam::load(SamVariant::Tiny, &tiny_checkpoint(), tch::Device::Cpu).expect("tiny checkpoint loads");
    Predictor::new(sam)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).expect("fixture image")
}

pub struct TestServer {
    pub url: String,
    pub registry: Registry,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Sends the shutdown signal (what SIGTERM does in `serve`); returns the serving task, which
    /// ends once the server has drained.
    pub fn signal_shutdown(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.server.take().expect("the server was shut down once only")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts the server in-process on 127.0.0.1:0; waits for a ready model when asked.
pub async fn start(settings: Settings, wait_ready: bool) -> TestServer {
    let (listener, addr) = bind("127.0.0.1:0").await.unwrap();
    let registry = Registry::new(settings);
    load_configured(&registry);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(registry.clone(), listener, async move {
        let _ = rx.await;
    }));
    if wait_ready {
        for _ in 0..600 {
            if registry.any_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(registry.any_ready(), "model ready: {:?}", registry.list());
    }
    TestServer { url: format!("http://{addr}"), registry, stop: Some(stop), server: Some(server) }
}

pub async fn channel(s: &TestServer) -> Channel {
    Channel::from_shared(s.url.clone()).unwrap().connect().await.unwrap()
}

