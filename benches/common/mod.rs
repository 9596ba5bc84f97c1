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

/// CPU time (user + system, seconds) this process has used so far, from `/proc/self/stat`.
/// Comparing CPU per unit of work is steadier than wall-clock rates on a shared 2-core machine.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
