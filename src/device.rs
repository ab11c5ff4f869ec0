//! Device selection: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".

use crate::error::{invalid, Result};
use tch::Device;

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => cuda(n),
            None => Err(invalid("device", format!("{s:?} is not auto, cpu, cuda or cuda:N"))),
        },
    }
}

fn cuda(n: usize) -> Result<Device> {
    let count = tch::Cuda::device_count() as usize;
    if n >= count {
        return Err(invalid("device", format!("cuda:{n} requested but {count} CUDA device(s) are available")));
    }
    Ok(Device::Cuda(n))
}
