//! `egress-gateway check FILE...`: validates configuration and inventory files offline, without touching the
//! network.
//!
//! Each file is recognised by its content: a file with `kind:` at the top level holds Kubernetes objects
//! (Namespaces, Pods, EgressGatewayPolicies, Lists: an inventory), a file with `inputs:` at the top level is
//! a node agent configuration, anything else is a gateway configuration.
//! Every problem is printed to stderr as `file:line: problem`. In inventories, egress selector and
//! maxNextHops annotations that do not parse are errors here (the objects still load for `explain`, where
//! such a pod shows as blocked).
//!
//! A pod or namespace whose `egressGatewayPolicy` annotation names a policy found in none of the given files
//! gets a `file:line: warning: ...` line. It is a warning, not an error (exit status 0 when there is nothing
//! else): the policy may well live in a file that was not given, and a missing policy is valid Kubernetes
//! state (it blocks the pod's egress, fail closed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::node::{NodeConfig, Overrides};
use crate::config::{ConfigErrors, GatewayConfig};
use crate::inventory::{self, FileContents};

/// Checks every file; success only when all are valid.
pub(crate) fn run(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    let mut inventories: Vec<FileContents> = Vec::new();
    for file in files {
        let is_inventory = std::fs::read_to_string(file)
            .map(|text| inventory::is_inventory(&text))
            .unwrap_or(false);
        if is_inventory {
            match inventory::load_file(file) {
                Ok(c) if !c.bad_annotations.is_empty() => {
                    for (line, message) in &c.bad_annotations {
                        eprintln!("{}:{line}: {message}", file.display());
                    }
                    ok = false;
                    inventories.push(c);
                }
                Ok(c) => {
                    println!(
                        "{}: ok ({} policies, {} namespaces, {} pods)",
                        file.display(),
                        c.policies.len(),
                        c.namespaces.len(),
                        c.pods.len()
                    );
                    inventories.push(c);
                }
                Err(errors) => {
                    for e in errors {
                        eprintln!("{e}");
                    }
                    ok = false;
                }
            }
            continue;
        }
        match check(file) {
            Ok(summary) => println!("{summary}"),
            Err(errors) => {
                eprintln!("{errors}");
                ok = false;
            }
        }
    }
    for warning in missing_policies(&inventories) {
        eprintln!("{warning}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `file:line: warning: ...` for each annotation naming a policy that none of the files defines.
pub(crate) fn missing_policies(inventories: &[FileContents]) -> Vec<String> {
    let known: BTreeSet<&str> = inventories
        .iter()
        .flat_map(|c| c.policies.iter().map(|p| p.name()))
        .collect();
    inventories
        .iter()
        .flat_map(|c| c.refs.iter().map(move |r| (c, r)))
        .filter(|(_, r)| !known.contains(r.policy.as_str()))
        .map(|(c, r)| {
            format!(
                "{}:{}: warning: {} names EgressGatewayPolicy '{}', which is in none of the given files \
                 (if it does not exist, its egress traffic is blocked)",
                c.file.display(),
                r.line,
                r.who,
                r.policy
            )
        })
        .collect()
}

/// Whether the text is a node agent configuration (a top-level `inputs:` key) rather than a gateway's.
fn is_node_config(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("inputs:"))
}

/// One file: its summary line, or every problem in it.
fn check(file: &Path) -> Result<String, ConfigErrors> {
    if std::fs::read_to_string(file).is_ok_and(|t| is_node_config(&t)) {
        let config = NodeConfig::load(file, &Overrides::default())?;
        let missing: Vec<String> = config
            .inputs
            .iter()
            .filter(|p| !p.exists())
            .map(|p| format!("{}: input {} does not exist", file.display(), p.display()))
            .collect();
        if !missing.is_empty() {
            return Err(ConfigErrors(
                missing
                    .into_iter()
                    .map(|m| crate::config::ConfigError::new(file, None, m))
                    .collect(),
            ));
        }
        return Ok(format!(
            "{}: ok (node agent for {}, {} inputs)",
            file.display(),
            config.node_name,
            config.inputs.len()
        ));
    }
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
