//! CLI `train`: starts (or resumes) a run on a running server and prints its epochs.

use crate::cli::{say, Conn};
use crate::grpc::pb;
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_stream::StreamExt;

/// Runs `req`; prints one line per epoch and returns the final message.
pub fn train(conn: &Conn, req: pb::TrainRequest, quiet: bool) -> Result<pb::TrainFinished> {
    let epochs = req.recipe.as_ref().map_or(0, |r| r.epochs);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut c = pb::training_service_client::TrainingServiceClient::new(conn.channel().await?);
        let mut stream = c.train(conn.request(req)?).await?.into_inner();
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(u64::from(if epochs == 0 { 20 } else { epochs })) };
        bar.set_style(ProgressStyle::with_template("epoch {pos}/{len} {bar:30} {elapsed} {msg}")?);
        while let Some(ev) = stream.next().await {
            match ev?.event {
                Some(pb::train_event::Event::Started(s)) => {
                    say(&bar, format!("run {} on {}: {} training / {} validation images, writing {}", s.run_id, s.device, s.train_images, s.val_images, s.dir));
                    bar.set_position(u64::from(s.epochs_done));
                }
                Some(pb::train_event::Event::Progress(p)) => bar.set_message(format!("step {}/{} loss {:.4}", p.step, p.steps, p.loss)),
                Some(pb::train_event::Event::Epoch(e)) => {
                    let v = e.val.unwrap_or_default();
                    let per: Vec<String> = e.val_by_label.iter().map(|(k, s)| format!("{k} {:.3}", s.dice)).collect();
                    let (multi_loss, multi_val) = match &e.val_multimask {
                        Some(m) => (format!(" + multimask {:.4} + iou {:.4}", e.train_multimask_loss, e.train_iou_loss), format!("  multimask Dice {:.4}", m.dice)),
                        None => (String::new(), String::new()),
                    };
                    say(&bar, format!(
                        "epoch {:>3}  loss {:.4} (dice {:.4} + bce {:.4}{multi_loss})  val Dice {:.4} IoU {:.4} acc {:.4}{multi_val}  [{}]  {:.0} s{}",
                        e.epoch,
                        e.train_loss,
                        e.train_dice_loss,
                        e.train_bce_loss,
                        v.dice,
                        v.iou,
                        v.accuracy,
                        per.join(", "),
                        e.seconds,
                        if e.best { "  best" } else { "" }
                    ));
                    if e.epoch > 0 {
                        bar.set_position(u64::from(e.epoch));
                    }
                }
                Some(pb::train_event::Event::Finished(f)) => {
                    bar.finish_and_clear();
                    println!(
                        "finished ({}): best epoch {} with validation Dice {:.4}; best checkpoint {}{}{}",
                        f.stopped,
                        f.best_epoch,
                        f.best_val_dice,
                        f.best_checkpoint,
                        if f.model_id.is_empty() { String::new() } else { format!("; served as {}", f.model_id) },
                        if f.message.is_empty() { String::new() } else { format!(" ({})", f.message) }
                    );
                    return Ok(f);
                }
                None => {}
            }
        }
        bail!("the server ended the training stream without a final message")
    })
}
