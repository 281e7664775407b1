//! `egress-gateway check FILE...`: validates configuration files offline, without touching the network.
//!
//! Each file is recognised by its content: a file with `kind:` at the top level is a Kubernetes-style object
//! (a policy), anything else a gateway configuration. Every problem is printed to stderr as
//! `file:line: problem`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::{ConfigErrors, GatewayConfig};

/// Checks every file; success only when all are valid.
pub(crate) fn run(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match check(file) {
            Ok(summary) => println!("{summary}"),
            Err(errors) => {
                eprintln!("{errors}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One file: its summary line, or every problem in it.
fn check(file: &Path) -> Result<String, ConfigErrors> {
    let config = GatewayConfig::load(file)?;
    config
        .check_data_plane()
        .map_err(|e| ConfigErrors(vec![e]))?;
    Ok(format!(
        "{}: ok ({} uplinks, {} routes)",
        file.display(),
        config.uplinks.len(),
        config.route_count()
    ))
}
