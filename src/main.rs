use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use skinsam::device::parse_device;
use skinsam::model::{checkpoint, Precision, Sam, SamVariant};
use skinsam::parity;
use skinsam::predictor::{PointPrompt, Predictor, Prompt};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "skinsam", version, about = "SkinSAM Serve: Segment Anything for skin lesions")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (the default when no subcommand is given).
    Serve {
        /// TOML settings file (defaults < file < SKINSAM__* environment variables).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List the models of a running server.
    Models {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Embed an image on a running server; prints the handle.
    Embed {
        image: PathBuf,
        #[arg(long, default_value = "skinsam-tiny")]
        model: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Segment an image on a running server: writes the mask PNG and an overlay PNG beside it.
    Segment {
        image: PathBuf,
        #[arg(long, default_value = "skinsam-tiny")]
        model: String,
        /// x0,y0,x1,y1 in image pixels.
        #[arg(long, value_parser = parse_floats::<4>, allow_hyphen_values = true)]
        r#box: Option<[f32; 4]>,
        /// x,y of a foreground point (repeatable).
        #[arg(long, value_parser = parse_floats::<2>, allow_hyphen_values = true)]
        point: Vec<[f32; 2]>,
        #[arg(long, default_value = "mask.png")]
        out: PathBuf,
        /// Decode SAM's three candidate masks (its ambiguity output) and write the one with the
        /// highest predicted IoU, printing all three scores; default the single-mask output, the
        /// one skinsam_tiny and fine-tuned models are trained on.
        #[arg(long)]
        multimask: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Evaluate models on a dataset through a running server; writes a report folder.
    Eval {
        #[command(flatten)]
        eval: EvalCli,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A/B comparison: `eval` with two or more models, every pair compared on the same images and prompts.
    Compare {
        #[command(flatten)]
        eval: EvalCli,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fine-tune a hosted model on a server-side dataset (admin); prints the epochs.
    Train {
        #[command(flatten)]
        train: TrainCli,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Merge the report folders of a sharded evaluation into one report.
    MergeReports {
        #[arg(long)]
        out: PathBuf,
        shards: Vec<PathBuf>,
    },
    /// Compare against golden outputs of the official package (scripts/make_golden.py).
    Parity {
        #[arg(long, default_value = "tests/fixtures/golden")]
        golden: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "fp32")]
        precision: Precision,
        /// Fail unless logits agree within this and masks reach --min-mask-iou.
        #[arg(long, default_value_t = 1e-3)]
        max_logit_diff: f64,
        #[arg(long, default_value_t = 0.999)]
        min_mask_iou: f64,
        /// How large CPU products run: auto (timed), matmul or conv (settings `cpu_products`);
        /// the two routes take different attention code, so parity is checked on each.
        #[arg(long, default_value = "auto")]
        cpu_products: skinsam::model::common::CpuProducts,
    },
    /// Convert a checkpoint (.pth or .safetensors) to safetensors, checked strictly against the variant.
    Convert {
        #[arg(long)]
        variant: SamVariant,
        /// Store the large tensors as fp16 (half the size; loaded back as fp32).
        #[arg(long)]
        fp16: bool,
        input: PathBuf,
        output: PathBuf,
    },
    /// Segment one image file locally (no server): writes the best mask as a PNG.
    Predict {
        image: PathBuf,
        #[arg(long)]
        variant: SamVariant,
        #[arg(long)]
        checkpoint: PathBuf,
        /// x0,y0,x1,y1 in image pixels.
        #[arg(long, value_parser = parse_floats::<4>, allow_hyphen_values = true)]
        r#box: Option<[f32; 4]>,
        /// x,y of a foreground point (repeatable).
        #[arg(long, value_parser = parse_floats::<2>, allow_hyphen_values = true)]
        point: Vec<[f32; 2]>,
        #[arg(long, default_value = "mask.png")]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "fp32")]
        precision: Precision,
    },
    /// Time set_image and a box + point predict (see scripts/bench.sh); prints JSON.
    Bench {
        #[arg(long)]
        variant: SamVariant,
        /// Random weights when absent.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long)]
        image: PathBuf,
        #[arg(long, value_parser = parse_floats::<4>, allow_hyphen_values = true)]
        r#box: [f32; 4],
        #[arg(long, value_parser = parse_floats::<2>, allow_hyphen_values = true)]
        point: [f32; 2],
        #[arg(long, default_value = "fp32")]
        precision: Precision,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 3)]
        embed_repeat: usize,
        #[arg(long, default_value_t = 30)]
        predict_repeat: usize,
        /// libtorch intra-op threads (0: libtorch's default, one per core).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// How large CPU products run: auto (timed), matmul or conv (settings `cpu_products`).
        #[arg(long, default_value = "auto")]
        cpu_products: skinsam::model::common::CpuProducts,
    },
    /// (Re)draw a training run's curve.png from its last.json (written every epoch anyway).
    TrainCurve { run_dir: PathBuf },
    /// Time the trainer's step on cached embeddings (see scripts/bench_train.sh); prints JSON.
    TrainBench {
        #[arg(long)]
        variant: SamVariant,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Load generator against a running server: Segment latency/throughput by concurrency, and
    /// embedding throughput with distinct images; prints JSON lines.
    Loadgen {
        #[arg(long, default_value = "skinsam-tiny")]
        model: String,
        #[arg(long)]
        image: PathBuf,
        #[arg(long, value_parser = parse_floats::<4>, allow_hyphen_values = true)]
        r#box: [f32; 4],
        #[arg(long, value_parser = parse_floats::<2>, allow_hyphen_values = true)]
        point: [f32; 2],
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        concurrency: Vec<usize>,
        /// Segment requests per concurrency level.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        #[arg(long, default_value_t = 1)]
        prompts: usize,
        /// Distinct images for the embedding test (0: skip it), sent at each --embed-concurrency.
        #[arg(long, default_value_t = 0)]
        embed_images: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        embed_concurrency: Vec<usize>,
        /// Also send the distinct images as Segment requests (the whole call for a new image).
        #[arg(long)]
        segment_new_images: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The Segment decode in-process (predict + PNG), for comparison with `loadgen`; prints JSON.
    DecodeInproc {
        #[arg(long)]
        variant: SamVariant,
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long)]
        image: PathBuf,
        #[arg(long, value_parser = parse_floats::<4>, allow_hyphen_values = true)]
        r#box: [f32; 4],
        #[arg(long, value_parser = parse_floats::<2>, allow_hyphen_values = true)]
        point: [f32; 2],
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value_t = 1)]
        prompts: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Also a running server's model to pair with: each in-process decode alternates with the
        /// same Segment request through gRPC, and the per-pair overhead is reported.
        #[arg(long, requires = "server")]
        paired_model: Option<String>,
        #[arg(long, requires = "paired_model")]
        server: Option<String>,
        /// Bearer token of the paired server, when it requires one.
        #[arg(long, requires = "server")]
        token: Option<String>,
        /// CA certificate (PEM) of an https:// paired server.
        #[arg(long, requires = "server")]
        ca_cert: Option<PathBuf>,
    },
    /// Mask agreement of a reduced precision with fp32 on real images (HAM10000 layout); prints JSON.
    PrecisionAgreement {
        #[arg(long)]
        variant: SamVariant,
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long)]
        precision: Precision,
        /// A folder with images/ and masks/<stem>_segmentation.png.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 20)]
        n: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

#[derive(clap::Args)]
struct EvalCli {
    /// Model id (repeatable); "box-ellipse" is the model-free baseline.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Dataset folder (HAM10000 layout, or images/ + masks/); read by the server unless --upload.
    #[arg(long)]
    dataset: PathBuf,
    /// Read the images here and stream them to the server.
    #[arg(long)]
    upload: bool,
    /// Report folder.
    #[arg(long, default_value = "eval-report")]
    out: PathBuf,
    /// none, point, box or box_point (the paper's).
    #[arg(long, default_value = "box_point")]
    mode: skinsam::eval::prompts::PromptMode,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width the prompt offsets refer to (600 for downscaled HAM10000 copies); 0 = own width.
    #[arg(long, default_value_t = 0)]
    reference_width: u32,
    #[arg(long)]
    margin: Option<f32>,
    #[arg(long)]
    max_shift: Option<f32>,
    #[arg(long)]
    max_scale: Option<f32>,
    /// At most this many images (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: u32,
    /// Only these lesion types (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    #[arg(long, default_value_t = 0)]
    shard_index: u32,
    #[arg(long, default_value_t = 0)]
    shard_count: u32,
    /// One mask per prompt instead of the best of three.
    #[arg(long)]
    single_mask: bool,
    #[arg(long, default_value_t = 0)]
    summary_every: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Only the validation images of a training run (its folder, with last.json).
    #[arg(long)]
    val_split_of: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TrainCli {
    /// The hosted model to start from.
    #[arg(long)]
    base: String,
    /// Dataset folder on the server (under its eval.dataset_roots).
    #[arg(long)]
    dataset: PathBuf,
    #[arg(long, default_value = "")]
    run_id: String,
    /// Continue run --run-id from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f32,
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// The paper's plain random split instead of one by lesion.
    #[arg(long)]
    random_split: bool,
    #[arg(long, default_value = "box_point")]
    mode: skinsam::eval::prompts::PromptMode,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    reference_width: u32,
    /// Also train the prompt encoder.
    #[arg(long)]
    train_prompt_encoder: bool,
    /// Full training: the image encoder too (no precomputed embeddings).
    #[arg(long)]
    train_image_encoder: bool,
    /// Freeze the mask decoder (train only what the other flags name).
    #[arg(long)]
    freeze_mask_decoder: bool,
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    #[arg(long)]
    encoder_lr: Option<f64>,
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    #[arg(long, default_value_t = 3)]
    patience: u32,
    #[arg(long, default_value_t = 1e-3)]
    min_delta: f64,
    /// Dice + BCE on full-size masks instead of the low-res logits (256x256 for vit_b/l/h, 64x64
    /// for skinsam_tiny).
    #[arg(long)]
    loss_full_size: bool,
    /// Flips, 90-degree rotations, colour jitter (with --train-image-encoder).
    #[arg(long)]
    augment: bool,
    #[arg(long, default_value_t = 0)]
    max_train_images: u32,
    #[arg(long, default_value_t = 0)]
    max_val_images: u32,
    #[arg(long, default_value_t = 0)]
    progress_every: u32,
    /// Mix of prompt kinds drawn per step, e.g. "box_point=0.55,box=0.2,point=0.15,none=0.1"
    /// (default: always --mode).
    #[arg(long, value_parser = parse_prompt_mix)]
    prompt_mix: Option<PromptMix>,
    #[arg(long, value_enum, default_value = "constant")]
    lr_schedule: skinsam::train::LrSchedule,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u32,
    /// AdamW's decoupled weight decay (0 = Adam).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Also train the three multimask outputs (best of three per sample) and the IoU head.
    #[arg(long)]
    multimask: bool,
    /// Sample lesion types by n(type)^-X per epoch, with replacement (0 = every image once; 1 =
    /// every type equally often).
    #[arg(long, default_value_t = 0.0)]
    class_balance: f64,
    #[arg(long)]
    quiet: bool,
}

/// A newtype, so that clap takes the whole list as one value.
#[derive(Clone, Debug)]
struct PromptMix(Vec<(skinsam::eval::prompts::PromptMode, f64)>);

fn parse_prompt_mix(s: &str) -> std::result::Result<PromptMix, String> {
    s.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?} is not kind=weight"))?;
            Ok((k.trim().parse()?, v.trim().parse::<f64>().map_err(|e| format!("{v:?}: {e}"))?))
        })
        .collect::<std::result::Result<_, String>>()
        .map(PromptMix)
}

impl TrainCli {
    fn request(&self) -> skinsam::grpc::pb::TrainRequest {
        use skinsam::grpc::pb;
        pb::TrainRequest {
            base_model_id: self.base.clone(),
            dataset: self.dataset.canonicalize().unwrap_or_else(|_| self.dataset.clone()).display().to_string(),
            run_id: self.run_id.clone(),
            resume: self.resume,
            recipe: Some(pb::TrainRecipe {
                val_fraction: Some(self.val_fraction),
                split_seed: self.split_seed,
                random_split: self.random_split,
                prompts: Some(pb::PromptSimulation {
                    mode: skinsam::grpc::evaluation::mode_to_pb(self.mode) as i32,
                    seed: self.seed,
                    reference_width: self.reference_width,
                    ..Default::default()
                }),
                train_mask_decoder: Some(!self.freeze_mask_decoder),
                train_prompt_encoder: self.train_prompt_encoder,
                train_image_encoder: self.train_image_encoder,
                learning_rate: Some(self.lr),
                image_encoder_learning_rate: self.encoder_lr,
                batch_size: self.batch_size,
                epochs: self.epochs,
                patience: Some(self.patience),
                min_delta: Some(self.min_delta),
                loss_full_size: self.loss_full_size,
                augment: self.augment,
                max_train_images: self.max_train_images,
                max_val_images: self.max_val_images,
                progress_every: self.progress_every,
                prompt_mix: self
                    .prompt_mix
                    .iter()
                    .flat_map(|m| &m.0)
                    .map(|&(m, weight)| pb::PromptKindWeight { mode: skinsam::grpc::evaluation::mode_to_pb(m) as i32, weight })
                    .collect(),
                lr_schedule: skinsam::grpc::training::lr_schedule_to_pb(self.lr_schedule) as i32,
                warmup_steps: self.warmup_steps,
                weight_decay: self.weight_decay,
                multimask: self.multimask,
                class_balance: self.class_balance,
            }),
        }
    }
}

impl EvalCli {
    fn args(self) -> anyhow::Result<skinsam::eval::client::EvalArgs> {
        let ids = match &self.val_split_of {
            Some(dir) => skinsam::train::read_sidecar(dir, skinsam::train::LAST)?.split.val,
            None => vec![],
        };
        Ok(skinsam::eval::client::EvalArgs {
            ids,
            models: self.models,
            dataset: self.dataset,
            upload: self.upload,
            out: self.out,
            mode: self.mode,
            seed: self.seed,
            reference_width: self.reference_width,
            margin: self.margin,
            max_shift: self.max_shift,
            max_scale: self.max_scale,
            limit: self.limit,
            labels: self.labels,
            shard_index: self.shard_index,
            shard_count: self.shard_count,
            single_mask: self.single_mask,
            summary_every: self.summary_every,
            quiet: self.quiet,
        })
    }
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Bearer token, when the server requires one.
    #[arg(long)]
    token: Option<String>,
    /// CA certificate (PEM) for an https:// server.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
}

impl ClientArgs {
    fn conn(self) -> skinsam::cli::Conn {
        skinsam::cli::Conn { server: self.server, token: self.token, ca_cert: self.ca_cert }
    }
}

fn parse_floats<const N: usize>(s: &str) -> Result<[f32; N], String> {
    let v: Vec<f32> = s.split(',').map(|p| p.trim().parse::<f32>().map_err(|e| format!("{p:?}: {e}"))).collect::<Result<_, _>>()?;
    v.try_into().map_err(|v: Vec<f32>| format!("expected {N} comma-separated numbers, got {}", v.len()))
}

fn main() -> anyhow::Result<()> {
    skinsam::device::tune_allocator();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve { config: None });
    let json_logs = match &command {
        Command::Serve { config } => skinsam::settings::Settings::load(config.as_deref())?.log_format == "json",
        _ => false,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Logs on stderr: the client and benchmark subcommands print their results (JSON lines) on
    // stdout, where a log line would break the parsers reading them.
    // Colours only on a terminal: not as escape codes in log files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if json_logs {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    }
    match command {
        Command::Serve { config } => skinsam::cli::serve(config.as_deref())?,
        Command::Models { client } => skinsam::cli::models(&client.conn())?,
        Command::Eval { eval, client } => skinsam::eval::client::eval(&client.conn(), eval.args()?)?,
        Command::Compare { eval, client } => {
            if eval.models.len() < 2 {
                bail!("compare needs two or more --model");
            }
            skinsam::eval::client::eval(&client.conn(), eval.args()?)?
        }
        Command::Train { train, client } => {
            skinsam::train::client::train(&client.conn(), train.request(), train.quiet)?;
        }
        Command::TrainCurve { run_dir } => {
            let sidecar = skinsam::train::read_sidecar(&run_dir, skinsam::train::LAST)?;
            let out = run_dir.join("curve.png");
            skinsam::eval::report::write_atomic(&out, &skinsam::train::curve::curve_png(&sidecar.history)?)?;
            println!("{}", out.display());
        }
        Command::TrainBench { variant, batch, steps, device } => {
            let r = skinsam::train::bench::time_steps(variant, batch, steps, parse_device(&device)?);
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::MergeReports { out, shards } => skinsam::eval::client::merge_reports(&out, &shards)?,
        Command::Embed { image, model, client } => skinsam::cli::embed(&client.conn(), &model, &image)?,
        Command::Segment { image, model, r#box, point, out, multimask, client } => {
            skinsam::cli::segment(&client.conn(), &model, &image, r#box, &point, multimask, &out)?
        }
        Command::Parity { golden, device, precision, max_logit_diff, min_mask_iou, cpu_products } => {
            skinsam::model::common::set_cpu_products(cpu_products);
            let device = parse_device(&device)?;
            let t = Instant::now();
            let r = parity::check_golden(&golden, device, precision)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            eprintln!(
                "{} {:?} on {:?}: features max|d| {:.2e}, low-res logits max|d| {:.2e}, IoU pred max|d| {:.2e}, min mask IoU {:.5}, resize max|d| {} ({:.3}% differ) in {:.1}s",
                r.variant, precision, device, r.features_max_abs, r.low_res_max_abs, r.iou_max_abs, r.mask_iou_min,
                r.resize_max_abs, 100.0 * r.resize_mismatch_fraction, t.elapsed().as_secs_f64()
            );
            if device == tch::Device::Cpu {
                let route = skinsam::model::common::route_taken(precision.kind()).unwrap_or("matmul");
                eprintln!("CPU product route: {route}");
            }
            if r.low_res_max_abs > max_logit_diff || r.mask_iou_min < min_mask_iou {
                bail!("parity check failed (limits: logits {max_logit_diff}, mask IoU {min_mask_iou})");
            }
        }
        Command::Convert { variant, fp16, input, output } => {
            let (sam, ckpt) = Sam::load(variant, &input, tch::Device::Cpu)?;
            checkpoint::save_safetensors_as(&sam.vs, &output, if fp16 { tch::Kind::Half } else { tch::Kind::Float })?;
            println!("{} ({} tensors, sha256 {}) -> {}", input.display(), ckpt.num_tensors, ckpt.sha256, output.display());
        }
        Command::Predict { image, variant, checkpoint, r#box, point, out, device, precision } => {
            let device = parse_device(&device)?;
            let bytes = std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let img = skinsam::image_io::decode_rgb(&bytes, "image", 100_000_000)?;
            let (mut sam, ckpt) = Sam::load(variant, &checkpoint, device)?;
            sam.set_precision(precision);
            eprintln!("loaded {variant} from {} (sha256 {})", checkpoint.display(), ckpt.sha256);
            let predictor = Predictor::new(sam);
            let t = Instant::now();
            let emb = predictor.set_image(&img)?;
            let t_embed = t.elapsed();
            let prompt = Prompt {
                points: point.iter().map(|p| PointPrompt { x: p[0], y: p[1], label: 1 }).collect(),
                bbox: r#box,
                mask_input: None,
            };
            let t = Instant::now();
            let pred = predictor.predict(&emb, &[prompt], true)?.remove(0);
            let t_predict = t.elapsed();
            let mask = pred.masks.get(pred.best as i64).to_kind(tch::Kind::Uint8) * 255;
            let (h, w) = (mask.size()[0] as u32, mask.size()[1] as u32);
            let buf = Vec::<u8>::try_from(mask.flatten(0, -1))?;
            skinsam::eval::report::write_atomic(&out, &skinsam::masks::to_png(&buf, h, w)?)?;
            eprintln!(
                "embed {:.0} ms, predict {:.1} ms, scores {:?}, best {}{} -> {}",
                t_embed.as_secs_f64() * 1e3,
                t_predict.as_secs_f64() * 1e3,
                pred.iou_predictions,
                pred.best,
                if pred.clipped { " (prompt clipped to the image)" } else { "" },
                out.display()
            );
        }
        Command::Bench { variant, checkpoint, image, r#box, point, precision, device, embed_repeat, predict_repeat, threads, cpu_products } => {
            skinsam::model::common::set_cpu_products(cpu_products);
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let r = skinsam::bench::time_predictor(skinsam::bench::TimingArgs {
                variant,
                checkpoint: checkpoint.as_deref(),
                device: parse_device(&device)?,
                precision,
                image: &image,
                prompt: Prompt { points: vec![PointPrompt { x: point[0], y: point[1], label: 1 }], bbox: Some(r#box), mask_input: None },
                embed_repeat,
                predict_repeat,
            })?;
            let mut r = serde_json::to_value(&r)?;
            // The route the encoder's products took (timed on first use under "auto"); null when
            // none was chosen (another device, fp16).
            let route = if r["device"] == "cpu" { skinsam::model::common::route_taken(precision.kind()) } else { None };
            r["cpu_products"] = serde_json::json!({ "setting": cpu_products, "route": route });
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::Loadgen { model, image, r#box, point, concurrency, requests, prompts, embed_images, embed_concurrency, segment_new_images, client } => {
            let conn = client.conn();
            let bytes = std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let prompt = Prompt { points: vec![PointPrompt { x: point[0], y: point[1], label: 1 }], bbox: Some(r#box), mask_input: None };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                for c in concurrency {
                    let r = skinsam::loadgen::segment_load(&conn, &model, bytes.clone(), &prompt, prompts, c, requests).await?;
                    println!("{}", serde_json::to_string(&r)?);
                }
                if embed_images > 0 {
                    let base = skinsam::image_io::decode_rgb(&bytes, "image", u64::MAX)?;
                    for c in embed_concurrency {
                        // Distinct images (one pixel changed, and a different one per run) so nothing is cached.
                        let images = (0..embed_images)
                            .map(|i| {
                                let mut img = base.clone();
                                img.put_pixel(0, 0, image::Rgb([(i % 256) as u8, (i / 256) as u8, c as u8]));
                                let mut out = std::io::Cursor::new(Vec::new());
                                img.write_to(&mut out, image::ImageFormat::Png).map(|_| out.into_inner())
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        let r = skinsam::loadgen::new_image_load(&conn, &model, images.clone(), c, None).await?;
                        println!("{}", serde_json::to_string(&r)?);
                        if segment_new_images {
                            // Other pixels again, so that these images are new to the cache too.
                            let fresh: Vec<Vec<u8>> = images.iter().map(|b| { let mut v = b.clone(); v.push(0); v }).collect();
                            let r = skinsam::loadgen::new_image_load(&conn, &model, fresh, c, Some(&prompt)).await?;
                            println!("{}", serde_json::to_string(&r)?);
                        }
                    }
                }
                anyhow::Ok(())
            })?;
        }
        Command::DecodeInproc { variant, checkpoint, image, r#box, point, n, prompts, device, paired_model, server, token, ca_cert } => {
            let prompt = Prompt { points: vec![PointPrompt { x: point[0], y: point[1], label: 1 }], bbox: Some(r#box), mask_input: None };
            let device = skinsam::device::parse_device(&device)?;
            if let (Some(model), Some(server)) = (paired_model, server) {
                let conn = skinsam::cli::Conn { server, token, ca_cert };
                let r = skinsam::loadgen::paired_overhead(&conn, &model, variant, checkpoint.as_deref(), device, &image, &prompt, prompts, n)?;
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let r = skinsam::loadgen::in_process_decode(variant, checkpoint.as_deref(), device, &image, &prompt, prompts, n)?;
                println!("{}", serde_json::to_string(&r)?);
            }
        }
        Command::PrecisionAgreement { variant, checkpoint, precision, data, n, device } => {
            let mut pairs = Vec::new();
            let mut names: Vec<_> = std::fs::read_dir(data.join("images"))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            names.sort();
            for img in names.into_iter().take(n) {
                let stem = img.file_stem().and_then(|s| s.to_str()).context("image name")?.to_owned();
                pairs.push((img, data.join("masks").join(format!("{stem}_segmentation.png"))));
            }
            let r = skinsam::bench::precision_agreement(variant, checkpoint.as_deref(), parse_device(&device)?, precision, &pairs)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}
