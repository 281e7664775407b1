//! `egress-gateway explain` and `check` on inventory files, through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egress-gateway"))
        .args(args)
        .output()
        .expect("the egress-gateway binary runs")
}

fn seed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/seed-inventory.yaml")
}

fn explain(pod: &str, dst: &str) -> Output {
    let seed = seed();
    let seed = seed.to_str().expect("utf-8 path");
    run(&["explain", "--inputs", seed, "--pod", pod, "--dst", dst])
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("explain");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("scratch file");
    path
}

#[test]
fn red_destination_goes_through_the_red_gateway() {
    let out = explain("app/client", "192.0.2.10");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("namespace annotation egress.projectcalico.org/egressGatewayPolicy"),
        "{text}"
    );
    assert!(text.contains("policy:      red-blue"), "{text}");
    assert!(
        text.contains("rule:        #1 (destination 192.0.2.0/24)"),
        "{text}"
    );
    assert!(
        text.contains("gateway egress/egress-red-0  ip 10.244.2.10  node node-b"),
        "{text}"
    );
    assert!(!text.contains("blue-0"), "{text}");
    assert!(
        text.contains("maxNextHops: all, gatewayPreference: None"),
        "{text}"
    );
    assert!(
        text.contains("source IP:   the egress IP of the gateway"),
        "{text}"
    );
}

#[test]
fn blue_destination_goes_through_the_blue_gateway() {
    let out = explain("app/client", "198.51.100.7");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rule:        #2 (destination 198.51.100.0/24)"),
        "{text}"
    );
    assert!(
        text.contains("gateway egress/egress-blue-0  ip 10.244.2.11"),
        "{text}"
    );
    assert!(!text.contains("red-0"), "{text}");
}

#[test]
fn local_destination_and_unlisted_ones_use_no_gateway() {
    let out = explain("app/client", "172.16.1.20");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("#3 (destination 172.16.1.0/24)"), "{text}");
    assert!(
        text.contains("NoGateway (the matched rule has no gateway)"),
        "{text}"
    );
    let text = String::from_utf8_lossy(&explain("app/client", "203.0.113.1").stdout).into_owned();
    assert!(text.contains("NoGateway (no rule"), "{text}");
    let text = String::from_utf8_lossy(&explain("other/plain", "192.0.2.10").stdout).into_owned();
    assert!(text.contains("not opted in"), "{text}");
}

#[test]
fn a_missing_policy_blocks() {
    let text = std::fs::read_to_string(seed())
        .expect("seed")
        .replace("egressGatewayPolicy: red-blue", "egressGatewayPolicy: gone");
    let file = scratch("missing.yaml", &text);
    let file = file.to_str().expect("utf-8 path");
    let out = run(&[
        "explain",
        "--inputs",
        file,
        "--pod",
        "app/client",
        "--dst",
        "192.0.2.10",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Blocked: EgressGatewayPolicy 'gone' does not exist"),
        "{text}"
    );
}

#[test]
fn an_unknown_pod_exits_1() {
    let out = explain("app/nobody", "192.0.2.10");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pod app/nobody is not in the inputs"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn check_summarises_inventories_and_warns_about_missing_policies() {
    let out = run(&["check", seed().to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: ok (1 policies, 3 namespaces, 4 pods)\n",
            seed().display()
        )
    );
    assert!(out.stderr.is_empty(), "{out:?}");

    let pods = scratch(
        "pods.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: app\n  annotations:\n    \
         egress.projectcalico.org/egressGatewayPolicy: gone\n",
    );
    let out = run(&["check", pods.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "warnings alone exit 0: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{}:7: warning: pod app/p names EgressGatewayPolicy 'gone'",
            pods.display()
        )),
        "{err}"
    );
    // Given together with the file that defines the policy, there is nothing to warn about.
    let policy = scratch(
        "gone.yaml",
        "apiVersion: projectcalico.org/v3\nkind: EgressGatewayPolicy\nmetadata: { name: gone }\nspec: {}\n",
    );
    let out = run(&[
        "check",
        pods.to_str().expect("utf-8 path"),
        policy.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");

    let bad = scratch(
        "bad.yaml",
        "kind: Namespace\nmetadata:\n  name: a\n---\nkind: Pod\nmetadata:\n  name: p\n  labels: nope\n",
    );
    let out = run(&["check", bad.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{}:8: metadata.labels: expected a mapping, found the value `nope`\n",
            bad.display()
        )
    );
}

#[test]
fn check_reports_bad_selector_annotations_as_errors() {
    let file = scratch(
        "badsel.yaml",
        "kind: Namespace\nmetadata:\n  name: a\n  annotations:\n    \
         egress.projectcalico.org/selector: \"egress-code in {'red'\"\n",
    );
    let out = run(&["check", file.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{}:5: metadata.annotations.egress.projectcalico.org/selector: invalid selector",
            file.display()
        )),
        "{err}"
    );
}
