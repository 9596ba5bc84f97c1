//! Shared by the load harnesses (each bench is its own crate and includes this with `mod common;`).

/// The numeric value after `name` on the command line (`--signals 300`), else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
