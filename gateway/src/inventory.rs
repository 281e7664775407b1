//! Reading Kubernetes-shaped YAML (what `kubectl get -o yaml` prints) into the policy engine's types.
//!
//! Accepted: `v1` `Namespace`, `v1` `Pod` and `projectcalico.org/v3` `EgressGatewayPolicy` objects, as single
//! documents, multi-document streams (documents separated by lines that are exactly `---`) and `kind: List`
//! with `items`. Unknown fields, and objects of other kinds, are ignored. Wrong types, bad addresses, CIDRs
//! and selectors, and duplicate destinations in one policy are reported as `file:line: problem`, with the
//! line in the whole file (also in the second and later documents of a stream).

use core::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use forwarder_core::policy::model::{
    ANNOTATION_MAX_NEXT_HOPS, ANNOTATION_NAMESPACE_SELECTOR, ANNOTATION_POLICY, ANNOTATION_SELECTOR,
};
use forwarder_core::policy::{
    EgressGatewayPolicy, GatewaySpec, Inventory, Labels, Namespace, Pod, PolicyError, Preference,
    Rule, Selector,
};
use ipnet::IpNet;
use marked_yaml::types::MarkedMappingNode;
use marked_yaml::{LoadError, LoaderOptions, Node};

/// One problem in an inventory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InventoryError {
    /// The file.
    pub(crate) file: PathBuf,
    /// 1-based line in the file.
    pub(crate) line: usize,
    /// What is wrong.
    pub(crate) message: String,
}

impl fmt::Display for InventoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// A pod or namespace that names a policy in its `egressGatewayPolicy` annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicyRef {
    /// `pod NS/NAME` or `namespace NAME`.
    pub(crate) who: String,
    /// The policy named.
    pub(crate) policy: String,
    /// Line of the annotation.
    pub(crate) line: usize,
}

/// The objects of one file.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileContents {
    /// The file.
    pub(crate) file: PathBuf,
    /// Namespaces, in file order.
    pub(crate) namespaces: Vec<Namespace>,
    /// Pods, in file order.
    pub(crate) pods: Vec<Pod>,
    /// Policies, in file order.
    pub(crate) policies: Vec<EgressGatewayPolicy>,
    /// Policy names used by annotations.
    pub(crate) refs: Vec<PolicyRef>,
    /// Egress selector annotations that do not parse: (line, message). Not errors of the file (the
    /// resolution blocks such pods, as Calico does), but `check` reports them.
    pub(crate) bad_annotations: Vec<(usize, String)>,
}

/// Whether the text looks like Kubernetes objects (a top-level `kind:` key) rather than a gateway
/// configuration.
pub(crate) fn is_inventory(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("kind:"))
}

/// Reads and parses one file.
pub(crate) fn load_file(file: &Path) -> Result<FileContents, Vec<InventoryError>> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        vec![InventoryError {
            file: file.to_owned(),
            line: 1,
            message: format!("cannot read the file: {e}"),
        }]
    })?;
    parse(&text, file)
}

/// Each input file's path, modification time and size: what tells that an input changed.
pub(crate) type Fingerprint = Vec<(PathBuf, Option<std::time::SystemTime>, u64)>;

/// The files behind the inputs: files as given, directories' `*.yaml`, `*.yml` and `*.json` files in
/// name order (hidden entries skipped, as a ConfigMap mount's `..data` links are).
pub(crate) fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input)
            .map_err(|e| format!("{}: cannot read: {e}", input.display()))?;
        if !meta.is_dir() {
            files.push(input.clone());
            continue;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|e| format!("{}: cannot list the directory: {e}", input.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.')
                    && [".yaml", ".yml", ".json"].iter().any(|x| name.ends_with(x))
                    && p.is_file()
            })
            .collect();
        entries.sort();
        files.extend(entries);
    }
    Ok(files)
}

/// What tells a changed input: each file's path, modification time and size (through symlinks).
pub(crate) fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).ok();
            (
                f.clone(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map_or(0, |m| m.len()),
            )
        })
        .collect()
}

/// Reads several files into one inventory (later objects replace earlier ones with the same name).
pub(crate) fn load_files(files: &[PathBuf]) -> Result<Inventory, Vec<InventoryError>> {
    let mut errors = Vec::new();
    let mut contents = Vec::new();
    for file in files {
        match load_file(file) {
            Ok(c) => contents.push(c),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(merge(&contents))
    } else {
        Err(errors)
    }
}

/// All files' objects in one inventory.
pub(crate) fn merge(contents: &[FileContents]) -> Inventory {
    let mut inventory = Inventory::new();
    for c in contents {
        for ns in &c.namespaces {
            inventory.insert_namespace(ns.clone());
        }
        for pod in &c.pods {
            inventory.insert_pod(pod.clone());
        }
        for policy in &c.policies {
            inventory.insert_policy(policy.clone());
        }
    }
    inventory
}

/// Parses the text of one file (`file` is used in messages).
pub(crate) fn parse(text: &str, file: &Path) -> Result<FileContents, Vec<InventoryError>> {
    let mut r = Reader {
        file,
        errors: Vec::new(),
        out: FileContents {
            file: file.to_owned(),
            ..FileContents::default()
        },
    };
    for (start, doc) in documents(text) {
        if let Some(line) = inline_document(&doc, start) {
            r.error(
                line,
                "a document starts on its `---` line; put `---` on a line of its own",
            );
            continue;
        }
        // Blank lines in front keep the parser's line numbers equal to the file's.
        let padded = format!("{}{doc}", "\n".repeat(start));
        let options = LoaderOptions::default()
            .error_on_duplicate_keys(true)
            .prevent_coercion(true);
        match marked_yaml::parse_yaml_with_options(0, &padded, options) {
            Ok(root) => r.object(&root, ""),
            Err(e) => {
                let last = start + doc.lines().count().max(1);
                let (line, message) = load_error(&e, last);
                r.error(line, message);
            }
        }
    }
    if r.errors.is_empty() {
        Ok(r.out)
    } else {
        Err(r.errors)
    }
}

/// The documents of a stream: (number of lines before it, its text), skipping empty ones.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        if is_separator(line) {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 1;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && t != "..."
            })
        })
        .collect()
}

/// A line that starts a new document: `---`, possibly followed by blanks or a comment.
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        let rest = rest.trim();
        rest.is_empty()
            || (rest.starts_with('#')
                && line.as_bytes().get(3).is_some_and(u8::is_ascii_whitespace))
    })
}

/// A `--- content` line: a document starting on the separator line, which this reader does not split.
fn inline_document(doc: &str, start: usize) -> Option<usize> {
    doc.lines()
        .position(|l| l.starts_with("--- ") || l.starts_with("---\t"))
        .map(|i| start + i + 1)
}

fn load_error(e: &LoadError, last_line: usize) -> (usize, String) {
    match e {
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => (
            m.line(),
            "each document must be a Kubernetes object (a mapping with apiVersion, kind, metadata)"
                .into(),
        ),
        LoadError::UnexpectedAnchor(m) => (
            m.line(),
            "YAML anchors and aliases are not supported here; write the value out".into(),
        ),
        LoadError::MappingKeyMustBeScalar(m) => (
            m.line(),
            "a key must be a plain name, not a list or mapping".into(),
        ),
        LoadError::UnexpectedTag(m) => (
            m.line(),
            "YAML tags (`!foo`) are not supported here; remove the tag".into(),
        ),
        LoadError::ScanError(m, e) if m.line() > last_line => (
            last_line,
            format!("YAML syntax error at the end of the document: {}", e.info()),
        ),
        LoadError::ScanError(m, e) => (
            m.line(),
            format!("YAML syntax error at column {}: {}", m.column(), e.info()),
        ),
        LoadError::DuplicateKey(d) => (
            d.key.span().start().map_or(0, |m| m.line()),
            format!(
                "key `{}` appears twice in this mapping (first on line {})",
                d.key.as_str(),
                d.prev_key.span().start().map_or(0, |m| m.line())
            ),
        ),
    }
}

fn line_of(node: &Node) -> usize {
    node.span().start().map_or(1, |m| m.line())
}

fn describe(node: &Node) -> String {
    match node {
        Node::Scalar(s) => format!("the value `{}`", s.as_str()),
        Node::Sequence(_) => "a list".into(),
        Node::Mapping(_) => "a mapping".into(),
    }
}

fn is_null(node: &Node) -> bool {
    matches!(node, Node::Scalar(s) if s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A value found under a key: the node, its key path and the line to report it on.
struct Field<'n> {
    node: &'n Node,
    path: String,
    line: usize,
}

struct Reader<'f> {
    file: &'f Path,
    errors: Vec<InventoryError>,
    out: FileContents,
}

impl Reader<'_> {
    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(InventoryError {
            file: self.file.to_owned(),
            line,
            message: message.into(),
        });
    }

    /// `key` of `map` (absent or null: `None`); reported on the key's line unless it is a scalar.
    fn get<'n>(&self, map: &'n MarkedMappingNode, path: &str, key: &str) -> Option<Field<'n>> {
        let (k, node) = map.iter().find(|(k, _)| k.as_str() == key)?;
        if is_null(node) {
            return None;
        }
        let line = match node {
            Node::Scalar(_) => line_of(node),
            _ => k.span().start().map_or(line_of(node), |m| m.line()),
        };
        Some(Field {
            node,
            path: join(path, key),
            line,
        })
    }

    fn mapping<'n>(&mut self, f: &Field<'n>) -> Option<&'n MarkedMappingNode> {
        match f.node {
            Node::Mapping(m) => Some(m),
            other => {
                self.error(
                    f.line,
                    format!("{}: expected a mapping, found {}", f.path, describe(other)),
                );
                None
            }
        }
    }

    fn list<'n>(&mut self, f: &Field<'n>) -> Option<Vec<Field<'n>>> {
        match f.node {
            Node::Sequence(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, node)| Field {
                        node,
                        path: format!("{}[{i}]", f.path),
                        line: line_of(node),
                    })
                    .collect(),
            ),
            other => {
                self.error(
                    f.line,
                    format!("{}: expected a list, found {}", f.path, describe(other)),
                );
                None
            }
        }
    }

    fn string<'n>(&mut self, f: &Field<'n>) -> Option<&'n str> {
        match f.node {
            Node::Scalar(s) => Some(s.as_str()),
            other => {
                self.error(
                    f.line,
                    format!(
                        "{}: expected a single value, found {}",
                        f.path,
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        f: &Field<'_>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(f)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(m) => {
                self.error(f.line, format!("{}: {m}", f.path));
                None
            }
        }
    }

    /// `key: value` pairs (labels, annotations), each value a single value.
    fn string_map(&mut self, f: &Field<'_>) -> Labels {
        let mut out = Labels::new();
        let Some(map) = self.mapping(f) else {
            return out;
        };
        for (k, v) in map.iter() {
            let field = Field {
                node: v,
                path: join(&f.path, k.as_str()),
                line: line_of(v),
            };
            if is_null(v) {
                out.insert(k.as_str().to_owned(), String::new());
            } else if let Some(s) = self.string(&field) {
                out.insert(k.as_str().to_owned(), s.to_owned());
            }
        }
        out
    }

    /// One object (or a `List` of them).
    fn object(&mut self, node: &Node, path: &str) {
        let root = Field {
            node,
            path: path.to_owned(),
            line: line_of(node),
        };
        let Some(map) = self.mapping(&root) else {
            return;
        };
        let Some(kind) = self.get(map, path, "kind") else {
            self.error(
                root.line,
                format!(
                    "{}the object has no `kind`; expected Namespace, Pod, EgressGatewayPolicy or List",
                    if path.is_empty() { String::new() } else { format!("{path}: ") }
                ),
            );
            return;
        };
        let Some(kind) = self.string(&kind) else {
            return;
        };
        match kind {
            "List" | "NamespaceList" | "PodList" | "EgressGatewayPolicyList" => {
                if let Some(items) = self.get(map, path, "items") {
                    for item in self.list(&items).unwrap_or_default() {
                        self.object(item.node, &item.path);
                    }
                }
            }
            "Namespace" => self.namespace(map, path, root.line),
            "Pod" => self.pod(map, path, root.line),
            "EgressGatewayPolicy" => self.policy(map, path, root.line),
            // Other objects (Services, Deployments...) carry nothing routing needs.
            _ => {}
        }
    }

    /// `metadata`: name (required), namespace, labels, annotations, and the line of the policy annotation.
    fn metadata(
        &mut self,
        map: &MarkedMappingNode,
        path: &str,
        line: usize,
    ) -> Option<(String, Option<String>, Labels, Labels, usize)> {
        let Some(meta) = self.get(map, path, "metadata") else {
            self.error(
                line,
                format!("{}: the object has no metadata", join(path, "metadata")),
            );
            return None;
        };
        let meta_map = self.mapping(&meta)?;
        let name = match self.get(meta_map, &meta.path, "name") {
            Some(f) => self.string(&f)?.to_owned(),
            None => {
                self.error(meta.line, format!("{}: missing `name`", meta.path));
                return None;
            }
        };
        let namespace = match self.get(meta_map, &meta.path, "namespace") {
            Some(f) => Some(self.string(&f)?.to_owned()),
            None => None,
        };
        let labels = self
            .get(meta_map, &meta.path, "labels")
            .map(|f| self.string_map(&f))
            .unwrap_or_default();
        let mut annotation_line = meta.line;
        let annotations = match self.get(meta_map, &meta.path, "annotations") {
            Some(f) => {
                if let Node::Mapping(m) = f.node {
                    if let Some((_, v)) = m.iter().find(|(k, _)| k.as_str() == ANNOTATION_POLICY) {
                        annotation_line = line_of(v);
                    }
                    self.check_annotations(m, &f.path);
                }
                self.string_map(&f)
            }
            None => Labels::new(),
        };
        Some((name, namespace, labels, annotations, annotation_line))
    }

    /// Records egress selector and maxNextHops annotations that do not parse.
    fn check_annotations(&mut self, m: &MarkedMappingNode, path: &str) {
        for (k, v) in m.iter() {
            let Node::Scalar(text) = v else {
                continue;
            };
            let text = text.as_str();
            let problem = match k.as_str() {
                ANNOTATION_SELECTOR | ANNOTATION_NAMESPACE_SELECTOR if !text.is_empty() => {
                    parse_selector(text).err()
                }
                ANNOTATION_MAX_NEXT_HOPS if !text.is_empty() => text
                    .parse::<u32>()
                    .err()
                    .map(|_| format!("`{text}` is not a whole number (0 or more)")),
                _ => None,
            };
            if let Some(message) = problem {
                self.out.bad_annotations.push((
                    line_of(v),
                    format!(
                        "{}: {message} (the pod's egress traffic would be blocked)",
                        join(path, k.as_str())
                    ),
                ));
            }
        }
    }

    fn policy_ref(&mut self, who: String, annotations: &Labels, line: usize) {
        if let Some(policy) = annotations.get(ANNOTATION_POLICY) {
            if !policy.is_empty() {
                self.out.refs.push(PolicyRef {
                    who,
                    policy: policy.clone(),
                    line,
                });
            }
        }
    }

    fn namespace(&mut self, map: &MarkedMappingNode, path: &str, line: usize) {
        let Some((name, _, labels, annotations, aline)) = self.metadata(map, path, line) else {
            return;
        };
        self.policy_ref(format!("namespace {name}"), &annotations, aline);
        self.out.namespaces.push(Namespace {
            name,
            labels,
            annotations,
        });
    }

    fn pod(&mut self, map: &MarkedMappingNode, path: &str, line: usize) {
        let Some((name, namespace, labels, annotations, aline)) = self.metadata(map, path, line)
        else {
            return;
        };
        let namespace = namespace.unwrap_or_else(|| "default".to_owned());
        let mut ips: Vec<IpAddr> = Vec::new();
        let mut host_ip = None;
        if let Some(status) = self.get(map, path, "status") {
            if let Some(st) = self.mapping(&status) {
                if let Some(f) = self.get(st, &status.path, "podIPs") {
                    for item in self.list(&f).unwrap_or_default() {
                        let Some(m) = self.mapping(&item) else {
                            continue;
                        };
                        if let Some(ipf) = self.get(m, &item.path, "ip") {
                            if let Some(ip) = self.parsed(&ipf, ip) {
                                if !ips.contains(&ip) {
                                    ips.push(ip);
                                }
                            }
                        }
                    }
                }
                if let Some(f) = self.get(st, &status.path, "podIP") {
                    if let Some(ip) = self.parsed(&f, ip) {
                        if !ips.contains(&ip) {
                            ips.insert(0, ip);
                        }
                    }
                }
                if let Some(f) = self.get(st, &status.path, "hostIP") {
                    host_ip = self.parsed(&f, ip);
                }
            }
        }
        let mut node = None;
        if let Some(spec) = self.get(map, path, "spec") {
            if let Some(sp) = self.mapping(&spec) {
                if let Some(f) = self.get(sp, &spec.path, "nodeName") {
                    node = self.string(&f).map(str::to_owned);
                }
            }
        }
        self.policy_ref(format!("pod {namespace}/{name}"), &annotations, aline);
        self.out.pods.push(Pod {
            namespace,
            name,
            labels,
            annotations,
            ip: ips,
            node,
            host_ip,
        });
    }

    fn policy(&mut self, map: &MarkedMappingNode, path: &str, line: usize) {
        let Some((name, _, _, _, _)) = self.metadata(map, path, line) else {
            return;
        };
        let before = self.errors.len();
        let mut rules = Vec::new();
        let mut rule_lines = Vec::new();
        if let Some(spec) = self.get(map, path, "spec") {
            if let Some(sp) = self.mapping(&spec) {
                if let Some(f) = self.get(sp, &spec.path, "rules") {
                    for item in self.list(&f).unwrap_or_default() {
                        let (rule, line) = self.rule(&item);
                        if let Some(rule) = rule {
                            rules.push(rule);
                            rule_lines.push(line);
                        }
                    }
                }
            }
        }
        if self.errors.len() > before {
            return;
        }
        match EgressGatewayPolicy::new(name, rules) {
            Ok(p) => self.out.policies.push(p),
            Err(e @ PolicyError::DuplicateDestination { .. }) => {
                let PolicyError::DuplicateDestination {
                    rules: (_, second), ..
                } = &e;
                let at = rule_lines.get(*second).copied().unwrap_or(line);
                self.error(at, e.to_string());
            }
        }
    }

    /// One rule, and the line of its destination (or of the rule).
    fn rule(&mut self, item: &Field<'_>) -> (Option<Rule>, usize) {
        let Some(m) = self.mapping(item) else {
            return (None, item.line);
        };
        let before = self.errors.len();
        let mut line = item.line;
        let description = self
            .get(m, &item.path, "description")
            .and_then(|f| self.string(&f).map(str::to_owned));
        let mut destination = None;
        if let Some(d) = self.get(m, &item.path, "destination") {
            line = d.line;
            if let Some(dm) = self.mapping(&d) {
                if let Some(c) = self.get(dm, &d.path, "cidr") {
                    line = c.line;
                    destination = self.parsed(&c, cidr);
                }
            }
        }
        let gateway = self
            .get(m, &item.path, "gateway")
            .and_then(|g| self.gateway(&g));
        let preference = match self.get(m, &item.path, "gatewayPreference") {
            Some(f) => self
                .parsed(&f, |s| match s {
                    "None" => Ok(Preference::None),
                    "PreferNodeLocal" => Ok(Preference::PreferNodeLocal),
                    other => Err(format!(
                        "`{other}` is not a gateway preference; use None or PreferNodeLocal"
                    )),
                })
                .unwrap_or_default(),
            None => Preference::None,
        };
        if self.errors.len() > before {
            return (None, line);
        }
        (
            Some(Rule {
                description,
                destination,
                gateway,
                preference,
            }),
            line,
        )
    }

    fn gateway(&mut self, g: &Field<'_>) -> Option<GatewaySpec> {
        let m = self.mapping(g)?;
        let selector = match self.get(m, &g.path, "selector") {
            Some(f) => self.parsed(&f, parse_selector)?,
            None => {
                self.error(
                    g.line,
                    format!(
                        "{}: missing `selector`; select the gateway pods, e.g. \"egress-code == 'red'\"",
                        g.path
                    ),
                );
                return None;
            }
        };
        let namespace_selector = match self.get(m, &g.path, "namespaceSelector") {
            Some(f) => Some(self.parsed(&f, parse_selector)?),
            None => None,
        };
        let max_next_hops = match self.get(m, &g.path, "maxNextHops") {
            Some(f) => Some(self.parsed(&f, |s| {
                s.parse::<u32>()
                    .map_err(|_| format!("`{s}` is not a whole number (0 or more)"))
            })?),
            None => None,
        };
        Some(GatewaySpec {
            selector,
            namespace_selector,
            max_next_hops,
        })
    }
}

fn ip(s: &str) -> Result<IpAddr, String> {
    IpAddr::from_str(s).map_err(|_| format!("`{s}` is not an IP address"))
}

fn cidr(s: &str) -> Result<IpNet, String> {
    let net = IpNet::from_str(s)
        .map_err(|_| format!("`{s}` is not a CIDR; write e.g. 192.0.2.0/24 or 2001:db8::/32"))?;
    if net.trunc() != net {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| {
        format!(
            "invalid selector `{s}`: {e} (character {} of the selector)",
            e.position + 1
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn directories_list_their_yaml_files_without_hidden_entries() {
        let dir = std::env::temp_dir().join(format!("egress-agent-inputs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2026_11_26")).unwrap();
        for f in [
            "b.yaml",
            "a.yml",
            "c.json",
            "notes.txt",
            ".hidden.yaml",
            "..2026_11_26/x.yaml",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let files = input_files(std::slice::from_ref(&dir)).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a.yml", "b.yaml", "c.json"]);
        let before = fingerprint(&files);
        std::fs::write(dir.join("b.yaml"), "kind: List\nitems: []\n").unwrap();
        assert_ne!(fingerprint(&files), before);
        assert!(input_files(&[dir.join("missing")])
            .unwrap_err()
            .contains("cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    fn parse_ok(text: &str) -> FileContents {
        parse(text, Path::new("t.yaml")).unwrap()
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text, Path::new("t.yaml"))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const POLICY: &str = "\
apiVersion: projectcalico.org/v3
kind: EgressGatewayPolicy
metadata:
  name: egw
  resourceVersion: \"12\"
spec:
  rules:
  - destination:
      cidr: 10.0.0.0/8
    description: local
  - destination:
      cidr: 192.0.2.0/24
    gateway:
      namespaceSelector: \"projectcalico.org/name == 'egress'\"
      selector: \"egress-code == 'red'\"
      maxNextHops: 2
    gatewayPreference: PreferNodeLocal
";

    #[test]
    fn a_policy_document() {
        let c = parse_ok(POLICY);
        assert_eq!(c.policies.len(), 1);
        let p = &c.policies[0];
        assert_eq!(p.name(), "egw");
        assert_eq!(p.rules().len(), 2);
        assert!(p.rules()[0].gateway.is_none());
        let gw = p.rules()[1].gateway.as_ref().unwrap();
        assert_eq!(gw.max_next_hops, Some(2));
        assert!(gw.namespace_selector.is_some());
        assert_eq!(p.rules()[1].preference, Preference::PreferNodeLocal);
    }

    #[test]
    fn a_kind_list_with_pods_and_namespaces() {
        let c = parse_ok(
            "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    name: app
    labels: { team: a }
    annotations:
      egress.projectcalico.org/egressGatewayPolicy: egw
- apiVersion: v1
  kind: Pod
  metadata:
    name: client
    namespace: app
    labels: { app: client }
    uid: 1234
  spec:
    nodeName: node-a
    containers: [{ name: c, image: busybox }]
  status:
    hostIP: 172.18.0.2
    podIP: 10.244.1.5
    podIPs:
    - ip: 10.244.1.5
    - ip: fd00:10:244:1::5
- apiVersion: v1
  kind: Service
  metadata: { name: ignored }
metadata:
  resourceVersion: \"\"
",
        );
        assert_eq!(c.namespaces.len(), 1);
        assert_eq!(
            c.namespaces[0].labels.get("team").map(String::as_str),
            Some("a")
        );
        assert_eq!(c.refs.len(), 1);
        assert_eq!(c.refs[0].line, 10);
        let pod = &c.pods[0];
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("app", "client")
        );
        assert_eq!(pod.node.as_deref(), Some("node-a"));
        assert_eq!(pod.host_ip, Some("172.18.0.2".parse().unwrap()));
        assert_eq!(
            pod.ip,
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00:10:244:1::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_stream_reports_true_line_numbers_in_the_second_document() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata:
  name: app
---
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: app
status:
  podIP: 10.244.1.300
";
        assert_eq!(
            errors(text),
            ["t.yaml:12: status.podIP: `10.244.1.300` is not an IP address"]
        );
        let ok = text.replace("1.300", "1.3");
        let c = parse_ok(&ok);
        assert_eq!((c.namespaces.len(), c.pods.len()), (1, 1));
    }

    #[test]
    fn wrong_types_are_errors_with_lines() {
        let e = errors("kind: Namespace\nmetadata:\n  name: a\n  labels: [x, y]\n");
        assert_eq!(
            e,
            ["t.yaml:4: metadata.labels: expected a mapping, found a list"]
        );
        let e = errors(&POLICY.replace("maxNextHops: 2", "maxNextHops: two"));
        assert_eq!(
            e,
            ["t.yaml:16: spec.rules[1].gateway.maxNextHops: `two` is not a whole number (0 or more)"]
        );
    }

    #[test]
    fn bad_cidrs_selectors_and_duplicates() {
        let e = errors(&POLICY.replace("192.0.2.0/24", "192.0.2.1/24"));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "t.yaml:12: spec.rules[1].destination.cidr: 192.0.2.1/24 has host bits set"
            ),
            "{e:?}"
        );
        let e = errors(&POLICY.replace("egress-code == 'red'", "egress-code = 'red'"));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("t.yaml:15: spec.rules[1].gateway.selector: invalid selector `egress-code = 'red'`: at "),
            "{e:?}"
        );
        assert!(e[0].contains("character 13"), "{e:?}");
        let e = errors(&POLICY.replace("192.0.2.0/24", "10.0.0.0/8"));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("t.yaml:12: EgressGatewayPolicy 'egw': rules 1 and 2"),
            "{e:?}"
        );
    }

    #[test]
    fn documents_without_kind_and_syntax_errors() {
        assert_eq!(
            errors("metadata: { name: a }\n"),
            ["t.yaml:1: the object has no `kind`; expected Namespace, Pod, EgressGatewayPolicy or List"]
        );
        let e = errors("kind: Namespace\nmetadata:\n  name: a\n---\nkind: Pod\nmetadata: [\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.yaml:6:"), "{e:?}");
    }

    #[test]
    fn bad_selector_annotations_are_recorded_not_fatal() {
        let c = parse_ok(
            "kind: Namespace\nmetadata:\n  name: a\n  annotations:\n    \
             egress.projectcalico.org/selector: \"x ==\"\n    egress.projectcalico.org/maxNextHops: \"2\"\n",
        );
        assert_eq!(c.namespaces.len(), 1);
        assert_eq!(c.bad_annotations.len(), 1, "{:?}", c.bad_annotations);
        assert_eq!(c.bad_annotations[0].0, 5);
        assert!(
            c.bad_annotations[0].1.starts_with(
                "metadata.annotations.egress.projectcalico.org/selector: invalid selector `x ==`"
            ),
            "{:?}",
            c.bad_annotations
        );
    }

    #[test]
    fn separators_with_comments_and_inline_documents() {
        let c = parse_ok("kind: Namespace\nmetadata: { name: a }\n--- # next\nkind: Namespace\nmetadata: { name: b }\n---   \n");
        assert_eq!(c.namespaces.len(), 2);
        assert_eq!(
            errors("kind: Namespace\nmetadata: { name: a }\n--- { kind: Namespace }\n"),
            ["t.yaml:3: a document starts on its `---` line; put `---` on a line of its own"]
        );
    }

    #[test]
    fn several_files_merge_into_one_inventory() {
        let a = parse_ok(POLICY);
        let b = parse_ok("kind: Namespace\nmetadata:\n  name: app\n");
        let inv = merge(&[a, b]);
        assert!(inv.policy("egw").is_some());
        assert!(inv.namespace("app").is_some());
    }

    #[test]
    fn detection_by_top_level_kind() {
        assert!(is_inventory(POLICY));
        assert!(!is_inventory("tunnel:\n  kind: x\n"));
    }
}
