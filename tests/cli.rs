//! The binary's benchmark subcommand: results alone on stdout (JSON), logs on stderr, and the
//! CPU product route it took reported.

use std::process::Command;

#[test]
fn bench_prints_json_on_stdout_and_logs_on_stderr() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_skinsam"))
        .current_dir(root)
        .args(["bench", "--variant", "tiny", "--checkpoint", "tests/fixtures/golden/sam_tiny.pth"])
        .args(["--image", "tests/fixtures/images/ISIC_0024306.png", "--box", "60,2,169,139", "--point", "110,71"])
        .args(["--embed-repeat", "1", "--predict-repeat", "2", "--threads", "1", "--cpu-products", "auto"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout: {stdout}");
    let r: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(r["cpu_products"]["setting"], "auto");
    let route = r["cpu_products"]["route"].as_str().unwrap();
    assert!(route == "conv" || route == "matmul", "{route}");
    // "auto" timed both routes and logged its choice, on stderr.
    let logged = [format!("route=\"{route}\""), format!("route={route}")];
    assert!(stderr.contains("CPU product route timed") && logged.iter().any(|l| stderr.contains(l.as_str())), "{stderr}");
}
