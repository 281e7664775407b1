//! A real Kubernetes API server (kube-apiserver + etcd, from `scripts/kube-apiserver.sh`) for node-agent
//! tests, started inside a node's network namespace: the agent there reaches it on that namespace's
//! loopback, and the server dies with the test ([`ApiServer`] stops it on drop).
//!
//! The harness's [`Inventory`] is written to it as real objects: namespaces, policies, pods (with a
//! container, as the API requires) and then each pod's status (`podIPs`, `hostIP`, phase Running) through
//! the status subresource, as a kubelet would report it.
//!
//! The binaries are built once per machine (`scripts/kube-apiserver.sh build`, ~10 min, needs Go); tests
//! skip without them ([`require_kube!`](crate::require_kube)) unless `EGRESS_REQUIRE_KUBE=1`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::agent::{Inventory, PodObj};
use crate::error::{Context, Error, Result};
use crate::netns::Netns;

/// `scripts/kube-apiserver.sh` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-apiserver.sh")
}

/// `kubectl`, if the API server and etcd are built too; otherwise why not.
pub fn binaries() -> Result<PathBuf> {
    let script = script();
    let out = crate::cmd::run(&script.to_string_lossy(), &["env"])?;
    let var = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(PathBuf::from)
    };
    let bin =
        var("KUBE_BIN").ok_or_else(|| Error::msg("kube-apiserver.sh env printed no KUBE_BIN"))?;
    for name in ["kube-apiserver", "etcd", "kubectl"] {
        if !bin.join(name).is_file() {
            crate::bail!(
                "{} is not built: run `scripts/kube-apiserver.sh build` (needs Go; ~10 minutes once)",
                bin.join(name).display()
            );
        }
    }
    Ok(bin.join("kubectl"))
}

/// Skips (returns from) the calling test unless the API server binaries are built (fails instead with
/// `EGRESS_REQUIRE_KUBE=1`); evaluates to `kubectl`'s path.
#[macro_export]
macro_rules! require_kube {
    () => {
        match $crate::kube::binaries() {
            Ok(kubectl) => kubectl,
            Err(why) => {
                if std::env::var("EGRESS_REQUIRE_KUBE").as_deref() == Ok("1") {
                    panic!(
                        "{}: a Kubernetes API server is required but unusable: {why}",
                        $crate::privilege::current_test_name()
                    );
                }
                println!("SKIPPED {}: {why}", $crate::privilege::current_test_name());
                return;
            }
        }
    };
}

/// kube-apiserver and etcd running in one namespace, state in `dir`.
#[derive(Debug)]
pub struct ApiServer {
    ns: String,
    dir: PathBuf,
    kubectl: PathBuf,
    running: bool,
}

impl ApiServer {
    /// Starts them in `ns` with state and logs in `dir` (waits for `/readyz`), then installs the
    /// EgressGatewayPolicy CRD from deploy/ and waits until it is served.
    pub fn start(ns: &Netns, dir: &Path, kubectl: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut server = Self {
            ns: ns.name().to_owned(),
            dir: dir.to_path_buf(),
            kubectl: kubectl.to_path_buf(),
            running: false,
        };
        server.start_again()?;
        let crd =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds/egressgatewaypolicies.yaml");
        server.kubectl(&["apply", "-f", &crd.to_string_lossy()])?;
        server.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/egressgatewaypolicies.projectcalico.org",
        ])?;
        Ok(server)
    }

    /// Starts them again after [`stop`](Self::stop): same ports, data and credentials.
    pub fn start_again(&mut self) -> Result<()> {
        self.start_with(&[])
    }

    /// Like [`start_again`](Self::start_again), with etcd compacted past every resourceVersion handed out
    /// so far: a client resuming a watch is answered `410 Gone` and must list again.
    pub fn start_again_compacted(&mut self) -> Result<()> {
        self.start_with(&["--compact"])
    }

    fn start_with(&mut self, extra: &[&str]) -> Result<()> {
        let script = script().to_string_lossy().into_owned();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut args = vec!["netns", "exec", &self.ns, &script, "start", &dir];
        args.extend_from_slice(extra);
        crate::cmd::run("ip", &args).map_err(|e| {
            let log = crate::process::tail(&self.dir.join("kube-apiserver.log"), 20);
            Error::msg(format!("{e}\nkube-apiserver.log:\n{log}"))
        })?;
        self.running = true;
        Ok(())
    }

    /// Stops them (the data stays).
    pub fn stop(&mut self) {
        if self.running {
            let script = script();
            let dir = self.dir.to_string_lossy().into_owned();
            let _ = crate::cmd::run(&script.to_string_lossy(), &["stop", &dir]);
            self.running = false;
        }
    }

    /// The administrator's kubeconfig (group system:masters).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// `kubectl --kubeconfig <admin> args…` in the namespace; stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_with_input(&["apply", "-f", "-"], Some(yaml))
    }

    fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let kubeconfig = self.kubeconfig().to_string_lossy().into_owned();
        let kubectl = self.kubectl.to_string_lossy().into_owned();
        let mut all = vec![
            "netns",
            "exec",
            &self.ns,
            &kubectl,
            "--kubeconfig",
            &kubeconfig,
        ];
        all.extend_from_slice(args);
        let mut child = Command::new("ip")
            .args(&all)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run kubectl")?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .context("kubectl's stdin")?;
        }
        let out = child.wait_with_output().context("wait for kubectl")?;
        if !out.status.success() {
            return Err(crate::cmd::failure("ip", &all, &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates (or updates) every object of `inventory`, then reports each pod's addresses and phase
    /// Running through the status subresource.
    pub fn apply_inventory(&self, inventory: &Inventory) -> Result<()> {
        let mut docs = Vec::new();
        for n in &inventory.namespaces {
            // A namespace must exist before its pods: apply them first, in their own call.
            docs.push(crate::agent::namespace_yaml(n));
        }
        if !docs.is_empty() {
            self.apply(&docs.join("---\n"))?;
        }
        let mut docs = Vec::new();
        for p in &inventory.policies {
            docs.push(crate::agent::policy_yaml(p));
        }
        for p in &inventory.pods {
            docs.push(pod_object(p));
        }
        if !docs.is_empty() {
            self.apply(&docs.join("---\n"))?;
        }
        for p in &inventory.pods {
            self.set_pod_status(p)?;
        }
        Ok(())
    }

    /// Creates (or updates) `pods` (their namespaces must exist) and reports their status.
    pub fn apply_pods(&self, pods: &[PodObj]) -> Result<()> {
        let docs: Vec<String> = pods.iter().map(pod_object).collect();
        self.apply(&docs.join("---\n"))?;
        for p in pods {
            self.set_pod_status(p)?;
        }
        Ok(())
    }

    /// Reports `pod`'s addresses, host IP and phase Running, as its kubelet would.
    pub fn set_pod_status(&self, pod: &PodObj) -> Result<()> {
        let ips: Vec<String> = pod
            .ips
            .iter()
            .map(|ip| format!("{{\"ip\":\"{ip}\"}}"))
            .collect();
        let first = pod
            .ips
            .first()
            .map(|ip| format!(",\"podIP\":\"{ip}\""))
            .unwrap_or_default();
        let patch = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"hostIP\":\"{}\"{first},\"podIPs\":[{}]}}}}",
            pod.host_ip,
            ips.join(",")
        );
        self.kubectl(&[
            "patch",
            "pod",
            "-n",
            &pod.namespace,
            &pod.name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])
        .map(|_| ())
    }

    /// A kubeconfig at `path` for service account `namespace/name` (a bound token from the TokenRequest
    /// API, valid 1 h), against the same server and CA as the administrator's.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
        path: &Path,
    ) -> Result<PathBuf> {
        let token = self.kubectl(&["create", "token", "-n", namespace, name, "--duration=1h"])?;
        let admin =
            std::fs::read_to_string(self.kubeconfig()).context("read the admin kubeconfig")?;
        // The admin kubeconfig has one user; swap its token (the line `    token: …`).
        let mut out = String::new();
        let mut swapped = false;
        for line in admin.lines() {
            if line.trim_start().starts_with("token:") {
                let indent = &line[..line.len() - line.trim_start().len()];
                out.push_str(&format!("{indent}token: {}\n", token.trim()));
                swapped = true;
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        if !swapped {
            crate::bail!("the admin kubeconfig has no `token:` line to replace");
        }
        std::fs::write(path, out).with_context(|| format!("write {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    /// The last lines of the API server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::tail(&self.dir.join("kube-apiserver.log"), lines)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pod as the API accepts it: the harness's pod without status, with one container.
fn pod_object(p: &PodObj) -> String {
    let mut s = crate::agent::pod_yaml(p);
    if let Some(at) = s.find("status:\n") {
        s.truncate(at);
    }
    s.push_str("  containers:\n  - name: main\n    image: registry.k8s.io/pause:3.10\n");
    s
}
