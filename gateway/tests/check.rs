//! `egress-gateway check`: exit status and output, through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn check(files: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egress-gateway"))
        .arg("check")
        .args(files)
        .output()
        .expect("the egress-gateway binary runs")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.yaml")
}

/// A file under the target directory, unique per test.
fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("check");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("scratch file");
    path
}

#[test]
fn a_valid_file_prints_a_summary_and_exits_0() {
    let out = check(&[&example()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok (2 uplinks, 2 routes)\n", example().display())
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn every_problem_goes_to_stderr_and_exits_1() {
    let text = std::fs::read_to_string(example())
        .expect("example")
        .replace("vni: 4097", "vni: 99999999")
        .replace("workers: 0", "workers: 9999");
    let bad = scratch("bad.yaml", &text);
    let policy = scratch("policy.yaml", "kind: EgressGatewayPolicy\n");
    let out = check(&[&example(), &bad, &policy]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].starts_with(&format!("{}:7: tunnel.vni:", bad.display())),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!("{}:39: workers:", bad.display())),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{}:1: metadata: the object has no metadata",
            policy.display()
        )),
        "{stderr}"
    );
}

#[test]
fn at_least_one_file_is_required() {
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn node_agent_configurations_are_recognised_and_checked() {
    let node = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node.yaml");
    let out = check(&[&node]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok (node agent for node-a, 1 inputs)\n", node.display())
    );

    let bad = scratch(
        "node-bad.yaml",
        "node_name: n\nunderlay_ip: 10.0.0.1\ninputs: [missing.yaml]\nhealth: { intervl: 1s }\n",
    );
    let out = check(&[&bad]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:4: unknown key `intervl` in health; did you mean `interval`?",
            bad.display()
        )),
        "{err}"
    );
    let missing = scratch(
        "node-missing-input.yaml",
        "node_name: n\nunderlay_ip: 10.0.0.1\ninputs: [missing.yaml]\n",
    );
    let out = check(&[&missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.yaml does not exist"),
        "{out:?}"
    );
}
