//! The binary's server and client subcommands.

use crate::engine::Registry;
use crate::grpc::pb;
use crate::grpc::server;
use crate::settings::Settings;
use anyhow::Context;
use std::path::Path;
use tonic::metadata::MetadataValue;

/// `serve`: loads the settings, starts /metrics and the gRPC server, drains on SIGTERM or Ctrl-C.
pub fn serve(config: Option<&Path>) -> anyhow::Result<()> {
    let settings = Settings::load(config).context("loading settings")?;
    if settings.threads > 0 {
        tch::set_num_threads(settings.threads);
    }
    crate::model::common::set_cpu_products(settings.cpu_products);
    // Under "auto", time the product routes now, alone on the cores: the configured models load
    // and warm up in parallel, and timing there would be skewed by the others (the choice is
    // kept for the whole process).
    for m in &settings.models {
        let device = m.device.as_deref().unwrap_or(&settings.default_device);
        if matches!(crate::device::parse_device(device), Ok(tch::Device::Cpu)) {
            crate::model::common::products_as_conv(tch::Kind::Float);
            crate::model::common::products_as_conv(m.precision.kind());
        }
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if !settings.metrics_addr.is_empty() {
            crate::metrics::install(settings.metrics_addr.parse().context("metrics_addr")?)?;
            tracing::info!(addr = %settings.metrics_addr, "metrics at /metrics");
        }
        let (listener, addr) = server::bind(&settings.grpc_addr).await?;
        tracing::info!(%addr, models = settings.models.len(), "serving gRPC");
        let registry = Registry::new(settings);
        server::load_configured(&registry);
        server::serve(registry, listener, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}

/// Where and how a client command reaches the server.
pub struct Conn {
    /// http://HOST:PORT, or https://HOST:PORT with `ca_cert`.
    pub server: String,
    pub token: Option<String>,
    /// PEM certificate authority that signed the server's TLS certificate.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl Conn {
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let mut ep = tonic::transport::Endpoint::from_shared(self.server.clone())?;
        if let Some(ca) = &self.ca_cert {
            // tonic speaks TLS only to https:// addresses: with http:// the token would go out
            // in plaintext though a certificate authority was given.
            anyhow::ensure!(self.server.starts_with("https://"), "--ca-cert needs an https:// server address, not {}", self.server);
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            ep = ep.tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem)))?;
        }
        Ok(ep.connect().await.with_context(|| format!("connecting to {}", self.server))?)
    }

    pub fn request<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        request(msg, self.token.as_deref())
    }
}

fn request<T>(msg: T, token: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t}"))?);
    }
    Ok(r)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub fn models(conn: &Conn) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut c = pb::model_service_client::ModelServiceClient::new(conn.channel().await?);
        let r = c.list_models(conn.request(pb::ListModelsRequest {})?).await?.into_inner();
        for m in r.models {
            println!(
                "{}\t{:?}\t{:?}\t{}\t{:?}\t{}",
                m.id,
                pb::Variant::try_from(m.variant).unwrap_or_default(),
                pb::ModelState::try_from(m.state).unwrap_or_default(),
                m.device,
                pb::Precision::try_from(m.precision).unwrap_or_default(),
                if m.checkpoint.is_empty() { "random weights".to_owned() } else { format!("{} sha256 {}", m.checkpoint, m.checkpoint_sha256) }
            );
        }
        Ok(())
    })
}

pub fn embed(conn: &Conn, model: &str, image: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    runtime()?.block_on(async {
        let mut c = pb::embedding_service_client::EmbeddingServiceClient::new(conn.channel().await?);
        let r = c.embed(conn.request(pb::EmbedRequest { model_id: model.to_owned(), image: bytes, ..Default::default() })?).await?.into_inner();
        println!("{}\t{}x{}\tcache_hit={}", r.embedding_handle, r.original_width, r.original_height, r.cache_hit);
        Ok(())
    })
}

pub fn segment(conn: &Conn, model: &str, image: &Path, bbox: Option<[f32; 4]>, points: &[[f32; 2]], multimask: bool, out: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let prompt = pb::Prompt {
        points: points.iter().map(|p| pb::Point { x: p[0], y: p[1], label: pb::PointLabel::Foreground as i32 }).collect(),
        r#box: bbox.map(|b| pb::Box { x0: b[0], y0: b[1], x1: b[2], y1: b[3] }),
        mask_input: vec![],
    };
    let resp = runtime()?.block_on(async {
        let mut c = pb::segmentation_service_client::SegmentationServiceClient::new(conn.channel().await?).max_decoding_message_size(64 << 20);
        let req = pb::SegmentRequest {
            model_id: model.to_owned(),
            source: Some(pb::segment_request::Source::Image(bytes.clone())),
            prompts: vec![prompt],
            multimask_output: multimask,
            mask_format: pb::MaskFormat::Png as i32,
            ..Default::default()
        };
        anyhow::Ok(c.segment(conn.request(req)?).await?.into_inner())
    })?;
    let m = resp.masks.first().context("no mask in the response")?;
    // Both files are made in memory first, then each written atomically: a failure leaves
    // neither a partial file nor a mask without its overlay.
    let mask = image::load_from_memory(&m.png)?.into_luma8();
    let img = crate::image_io::decode_rgb(&bytes, "image", u64::MAX)?;
    let overlay_png = crate::eval::report::png(&overlay(&img, &mask))?;
    let overlay_path = out.with_file_name(format!("{}_overlay.png", out.file_stem().and_then(|s| s.to_str()).unwrap_or("mask")));
    crate::eval::report::write_atomic(out, &m.png).with_context(|| format!("writing {}", out.display()))?;
    crate::eval::report::write_atomic(&overlay_path, &overlay_png)?;
    println!(
        "{}: area {} px, scores {:?} (chosen {}), queue {:.1} ms, compute {:.1} ms{} -> {} and {}",
        image.display(),
        m.area,
        m.scores,
        m.chosen_index,
        resp.timing.as_ref().map_or(0.0, |t| t.queue_ms),
        resp.timing.as_ref().map_or(0.0, |t| t.compute_ms),
        if m.clipped { " (prompt clipped to the image)" } else { "" },
        out.display(),
        overlay_path.display()
    );
    Ok(())
}

/// The image with the mask's outline drawn in green.
pub fn overlay(img: &image::RgbImage, mask: &image::GrayImage) -> image::RgbImage {
    let mut out = img.clone();
    let (w, h) = (mask.width().min(img.width()), mask.height().min(img.height()));
    let on = |x: i64, y: i64| x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && mask.get_pixel(x as u32, y as u32).0[0] > 127;
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if on(x, y) && (!on(x - 1, y) || !on(x + 1, y) || !on(x, y - 1) || !on(x, y + 1)) {
                out.put_pixel(x as u32, y as u32, image::Rgb([0, 255, 0]));
            }
        }
    }
    out
}

/// A line above a progress bar, or on stdout when the bar is hidden (--quiet, no terminal),
/// where indicatif would drop it.
pub fn say(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}
