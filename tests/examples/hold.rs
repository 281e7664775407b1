//! Builds the standard topology and keeps it for manual exploration until stdin reaches end of file
//! (press Ctrl-D), then removes it. `cargo run -p tests --example hold [-- userspace]`.
//!
//! Killed instead (Ctrl-C), it leaves its namespaces behind; the next harness run sweeps them.

use std::io::Read;

use tests::{GatewayMode, Topology};

fn main() -> tests::Result<()> {
    if tests::require_netns("hold").is_none() {
        return Ok(());
    }
    let mode = match std::env::args().nth(1).as_deref() {
        Some("userspace") => GatewayMode::userspace()?,
        _ => GatewayMode::Kernel,
    };
    let mut topo = Topology::standard(mode)?;
    topo.gateway_mut(1)
        .wait_ready(std::time::Duration::from_secs(30))?;
    println!("namespaces (enter one with `ip netns exec NAME bash`):");
    for n in topo.namespaces() {
        println!("  {n}");
    }
    println!("logs and configuration: {}", topo.dir().display());
    println!("press Ctrl-D to remove the topology");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}
