//! Shared by the load harnesses (each bench is its own crate and includes this with `mod common;`,
//! so not every harness uses every helper).
#![allow(dead_code)]

/// The numeric value after `name` on the command line (`--signals 300`), else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Vigil's built-in defaults on a loopback port of its own, with its data in `dir`.
pub fn loopback_config(dir: &std::path::Path) -> vigil::Config {
    vigil::Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_owned(),
        ..vigil::Config::default()
    }
}
