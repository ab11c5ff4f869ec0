//! Dataset readers: the HAM10000 layout as released and a generic layout.
//!
//! HAM10000: `images/<id>.jpg`, `masks/<id>_segmentation.png`, `HAM10000_metadata.csv` with at
//! least `lesion_id,image_id,dx`. Generic: `images/` and `masks/` paired by file stem (a mask may
//! also be named `<stem>_segmentation` or `<stem>_mask`), with an optional `labels.csv` holding
//! `image_id,label` and optionally `group` (for example a lesion or patient id).
//!
//! Listing never stops at one bad item: an image without a mask is reported and skipped.

use crate::error::{invalid, Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const HAM_METADATA: &str = "HAM10000_metadata.csv";
pub const GENERIC_LABELS: &str = "labels.csv";
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp"];

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub id: String,
    pub image: PathBuf,
    pub mask: PathBuf,
    /// Lesion type (HAM10000 `dx`) or the generic label; None when the metadata has no row.
    pub label: Option<String>,
    /// Items that must stay on the same side of a split (HAM10000 `lesion_id`).
    pub group: Option<String>,
}

/// An item that could not be used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub id: String,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: &'static str,
    pub items: Vec<Item>,
    pub problems: Vec<Problem>,
    /// The label of each problem's image, so that the filters select problems as they select
    /// items (a run over one label, or one shard, lists only its own unusable images).
    problem_labels: HashMap<String, Option<String>>,
}

impl Dataset {
    /// Lists `root` (HAM10000 layout when its metadata CSV is there, else generic), sorted by id.
    pub fn open(root: &Path) -> Result<Self> {
        let images = root.join("images");
        let masks = root.join("masks");
        for (dir, what) in [(root, "dataset"), (&images, "dataset images/"), (&masks, "dataset masks/")] {
            if !dir.is_dir() {
                return Err(invalid("dataset", format!("{what} folder {} does not exist", dir.display())));
            }
        }
        let (layout, labels) = if root.join(HAM_METADATA).is_file() {
            ("ham10000", read_labels(&root.join(HAM_METADATA), "image_id", "dx", Some("lesion_id"))?)
        } else if root.join(GENERIC_LABELS).is_file() {
            ("generic", read_labels(&root.join(GENERIC_LABELS), "image_id", "label", None)?)
        } else {
            ("generic", HashMap::new())
        };
        let mask_files = list_files(&masks)?;
        let mut by_stem: HashMap<String, PathBuf> = HashMap::new();
        for m in mask_files {
            if let Some(stem) = m.file_stem().and_then(|s| s.to_str()) {
                by_stem.insert(stem.to_owned(), m.clone());
            }
        }
        let mut items = Vec::new();
        let mut problems = Vec::new();
        let mut problem_labels = HashMap::new();
        let mut image_files = list_files(&images)?;
        image_files.sort();
        for image in image_files {
            let ext = image.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            let Some(id) = image.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
            if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                continue; // not an image (a README, a thumbnail database)
            }
            let mask = [format!("{id}_segmentation"), format!("{id}_mask"), id.clone()].iter().find_map(|s| by_stem.get(s).cloned());
            let Some(mask) = mask else {
                problem_labels.insert(id.clone(), labels.get(&id).and_then(|(l, _)| l.clone()));
                problems.push(Problem { id: id.clone(), message: format!("no mask for {} in {}", image.display(), masks.display()) });
                continue;
            };
            let (label, group) = labels.get(&id).cloned().unwrap_or((None, None));
            items.push(Item { id, image, mask, label, group });
        }
        if items.is_empty() {
            return Err(invalid("dataset", format!("no image with a mask under {}", root.display())));
        }
        Ok(Self { root: root.to_owned(), layout, items, problems, problem_labels })
    }

    /// Keeps the items of the given ids (all when empty), then at most `limit` (0: all).
    pub fn keep_ids(&mut self, ids: &[String], limit: usize) {
        if !ids.is_empty() {
            let keep: std::collections::HashSet<&String> = ids.iter().collect();
            self.items.retain(|i| keep.contains(&i.id));
            self.problems.retain(|p| keep.contains(&p.id));
        }
        self.filter(&[], limit);
    }

    /// Keeps the items of the given labels (all when empty), then at most `limit` (0: all).
    pub fn filter(&mut self, labels: &[String], limit: usize) {
        if !labels.is_empty() {
            self.items.retain(|i| i.label.as_ref().is_some_and(|l| labels.contains(l)));
            let pl = &self.problem_labels;
            self.problems.retain(|p| pl.get(&p.id).and_then(Option::as_ref).is_some_and(|l| labels.contains(l)));
        }
        if limit > 0 {
            self.items.truncate(limit);
        }
    }

    /// Shard `index` of `count` (every count-th item), for spreading a dataset over workers.
    pub fn shard(&mut self, index: usize, count: usize) {
        if count > 1 {
            keep_every(&mut self.items, index, count);
            // The unusable images the same way, so that the shards together list each once.
            keep_every(&mut self.problems, index, count);
        }
    }
}

/// Keeps elements index, index + count, index + 2 count, ...
fn keep_every<T>(v: &mut Vec<T>, index: usize, count: usize) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        (i - 1) % count == index
    });
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| invalid("dataset", format!("cannot read {}: {e}", dir.display())))?;
    Ok(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
}

type Labels = HashMap<String, (Option<String>, Option<String>)>;

/// id -> (label, group) from a CSV; a missing column is an error that names it.
fn read_labels(path: &Path, id_col: &str, label_col: &str, group_col: Option<&str>) -> Result<Labels> {
    let mut r = csv::Reader::from_path(path).map_err(|e| invalid("dataset", format!("cannot read {}: {e}", path.display())))?;
    let headers = r.headers().map_err(|e| invalid("dataset", format!("{}: {e}", path.display())))?.clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let id_i = col(id_col);
    let label_i = col(label_col);
    let group_i = group_col.and_then(col).or_else(|| col("group"));
    // A required group column (HAM10000's lesion_id): without it the split by lesion would
    // silently become a random one, with images of one lesion on both sides.
    let group_missing = group_col.filter(|_| group_i.is_none()).map(|g| (g, None));
    let missing: Vec<&str> =
        [(id_col, id_i), (label_col, label_i)].into_iter().chain(group_missing).filter(|(_, i)| i.is_none()).map(|(n, _)| n).collect();
    if !missing.is_empty() {
        return Err(invalid(
            "dataset",
            format!("{} has no column {} (columns: {})", path.display(), missing.join(", "), headers.iter().collect::<Vec<_>>().join(",")),
        ));
    }
    let (id_i, label_i) = (id_i.unwrap_or(0), label_i.unwrap_or(0));
    let mut out = HashMap::new();
    for (n, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| invalid("dataset", format!("{} row {}: {e}", path.display(), n + 2)))?;
        let get = |i: usize| rec.get(i).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        if let Some(id) = get(id_i) {
            out.insert(id, (get(label_i), group_i.and_then(get)));
        }
    }
    Ok(out)
}

/// A binary mask (0/1 per pixel, row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryMask {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl BinaryMask {
    pub fn area(&self) -> u64 {
        self.data.iter().map(|&v| u64::from(v)).sum()
    }

    /// Inclusive pixel bounds (x0, y0, x1, y1) of the foreground, None when empty.
    pub fn bounds(&self) -> Option<(u32, u32, u32, u32)> {
        let (w, h) = (self.width as usize, self.height as usize);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..h {
            for x in 0..w {
                if self.data[y * w + x] != 0 {
                    x0 = x0.min(x);
                    x1 = x1.max(x);
                    y0 = y0.min(y);
                    y1 = y1.max(y);
                }
            }
        }
        (x0 != usize::MAX).then_some((x0 as u32, y0 as u32, x1 as u32, y1 as u32))
    }

    /// The mask at the image's size (width, height), and whether it had to be resized.
    pub fn fitted_to(self, width: u32, height: u32) -> (Self, bool) {
        if (self.width, self.height) == (width, height) {
            (self, false)
        } else {
            (self.resize_nearest(width, height), true)
        }
    }

    /// Nearest-neighbour resize (pixel centres), as masks must stay binary.
    pub fn resize_nearest(&self, width: u32, height: u32) -> Self {
        let mut data = vec![0u8; width as usize * height as usize];
        for y in 0..height as usize {
            let sy = ((y as f64 + 0.5) * f64::from(self.height) / f64::from(height)) as usize;
            let sy = sy.min(self.height as usize - 1);
            for x in 0..width as usize {
                let sx = ((x as f64 + 0.5) * f64::from(self.width) / f64::from(width)) as usize;
                let sx = sx.min(self.width as usize - 1);
                data[y * width as usize + x] = self.data[sy * self.width as usize + sx];
            }
        }
        Self { width, height, data }
    }
}

/// Decodes a mask file: any format the image crate reads (turned by its EXIF orientation, as
/// images are), foreground = grey value >= 128 (HAM10000 masks are {0,255}, 8-bit grey or 1-bit
/// palette). Empty, zero-sized or unreadable files are errors naming `field`.
pub fn decode_mask(bytes: &[u8], field: &str) -> Result<BinaryMask> {
    let img = crate::image_io::decode_oriented(bytes, field, u64::MAX)?;
    let grey = img.to_luma8();
    let (width, height) = grey.dimensions();
    Ok(BinaryMask { width, height, data: grey.into_raw().into_iter().map(|v| u8::from(v >= 128)).collect() })
}

/// Reads a file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::InvalidArgument { field: "dataset".into(), message: format!("cannot read {}: {e}", path.display()) })
}
