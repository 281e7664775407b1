//! Walking the marked YAML tree: every value with its key path and line, every problem collected.
//!
//! The file is parsed by `marked-yaml` into a tree whose nodes carry their position. A [`Reader`] walks it
//! and records each problem as a [`ConfigError`] with the line of the offending key or value, and keeps going, so
//! that one run reports everything that is wrong.

use std::path::Path;

use marked_yaml::types::MarkedMappingNode;
use marked_yaml::{LoadError, LoaderOptions, Node};

use super::value;
use super::ConfigError;

/// Parses the text into a tree. YAML syntax errors, duplicate keys, anchors and tags are reported here.
pub(super) fn parse_yaml(text: &str, file: &Path) -> Result<Node, ConfigError> {
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let root = marked_yaml::parse_yaml_with_options(0, text, options).map_err(|e| {
        let (line, message) = load_error(&e, text.lines().count().max(1));
        ConfigError::new(file, Some(line), message)
    })?;
    if let Some(line) = second_document(text, line_of(&root)) {
        return Err(ConfigError::new(
            file,
            Some(line),
            "a second YAML document starts here; the gateway configuration is a single document, \
             so remove this `---` line or split the file",
        ));
    }
    Ok(root)
}

/// The line and message of a parse error; `last_line` is the file's last line.
fn load_error(e: &LoadError, last_line: usize) -> (usize, String) {
    match e {
        LoadError::TopLevelMustBeMapping(m) => (
            m.line(),
            "the file must be a YAML mapping of sections (tunnel:, uplinks:, ...)".into(),
        ),
        LoadError::TopLevelMustBeSequence(m) => (m.line(), "unexpected top level".into()),
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
        // The parser places an error found at the end of the file (an unclosed bracket) after the last line.
        LoadError::ScanError(m, e) if m.line() > last_line => (
            last_line,
            format!(
                "YAML syntax error at the end of the file: {}; check the brackets and quotes",
                e.info()
            ),
        ),
        LoadError::ScanError(m, e) => (
            m.line(),
            format!(
                "YAML syntax error at column {}: {}; check the indentation and quoting",
                m.column(),
                e.info()
            ),
        ),
        LoadError::DuplicateKey(d) => (
            d.key.span().start().map_or(0, |m| m.line()),
            format!(
                "key `{}` appears twice in this mapping (first on line {}); keep one",
                d.key.as_str(),
                d.prev_key.span().start().map_or(0, |m| m.line())
            ),
        ),
    }
}

/// The line of a `---` that starts another document after the first one (whose content starts on
/// `first_line`). `marked-yaml` reads only the first document; what follows must not be silently ignored.
fn second_document(text: &str, first_line: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(first_line)
        .find(|(_, l)| *l == "---" || l.starts_with("--- ") || l.starts_with("---\t"))
        .map(|(i, _)| i + 1)
}

/// Where a node starts (1-based line), or line 1 when the parser did not say.
pub(super) fn line_of(node: &Node) -> usize {
    node.span().start().map_or(1, |m| m.line())
}

/// Collects the problems found while reading one file.
#[derive(Debug)]
pub(super) struct Reader<'f> {
    file: &'f Path,
    errors: Vec<ConfigError>,
}

/// A value in the tree, with the path of its key (`uplinks[0].routes[1]`) and its line.
#[derive(Debug, Clone)]
pub(super) struct Value<'n> {
    node: &'n Node,
    path: String,
    line: usize,
}

/// A mapping (its unknown keys already reported), with its path and the line that introduced it.
#[derive(Debug, Clone)]
pub(super) struct Map<'n> {
    node: &'n MarkedMappingNode,
    path: String,
    line: usize,
}

impl<'f> Reader<'f> {
    pub(super) fn new(file: &'f Path) -> Reader<'f> {
        Reader {
            file,
            errors: Vec::new(),
        }
    }

    /// Records a problem on `line`.
    pub(super) fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.file, Some(line), message.into()));
    }

    /// The problems found so far.
    pub(super) fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }

    /// `value` as a mapping whose keys are all in `known`; each other key is reported on its own line.
    pub(super) fn mapping<'n>(&mut self, value: &Value<'n>, known: &[&str]) -> Option<Map<'n>> {
        let Node::Mapping(node) = value.node else {
            self.error(
                value.line,
                format!(
                    "{}: expected a mapping of keys ({}), found {}",
                    value.path,
                    known.join(", "),
                    kind(value.node)
                ),
            );
            return None;
        };
        for key in node.keys() {
            let name = key.as_str();
            if known.contains(&name) {
                continue;
            }
            let line = key.span().start().map_or(value.line, |m| m.line());
            let at = if value.path.is_empty() {
                "at the top level".to_owned()
            } else {
                format!("in {}", value.path)
            };
            let hint = match known
                .iter()
                .map(|k| (value::edit_distance(name, k), k))
                .min()
            {
                // Close enough to be a typo: one edit per three characters.
                Some((d, k)) if d <= (name.len() / 3).max(1) => format!("did you mean `{k}`?"),
                _ => format!("known keys are {}", known.join(", ")),
            };
            self.error(line, format!("unknown key `{name}` {at}; {hint}"));
        }
        Some(Map {
            node,
            path: value.path.clone(),
            line: value.line,
        })
    }

    /// `value` as a list, each item with its path (`key[i]`) and line.
    pub(super) fn list<'n>(&mut self, value: &Value<'n>) -> Option<Vec<Value<'n>>> {
        let Node::Sequence(items) = value.node else {
            self.error(
                value.line,
                format!(
                    "{}: expected a list (`[a, b]` or one `- item` per line), found {}",
                    value.path,
                    kind(value.node)
                ),
            );
            return None;
        };
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, node)| Value {
                    node,
                    path: format!("{}[{i}]", value.path),
                    line: line_of(node),
                })
                .collect(),
        )
    }

    /// `value` as the text of a scalar.
    pub(super) fn scalar<'n>(&mut self, value: &Value<'n>) -> Option<&'n str> {
        match value.node {
            Node::Scalar(s) => Some(s.as_str()),
            other => {
                self.error(
                    value.line,
                    format!(
                        "{}: expected a single value, found {}",
                        value.path,
                        kind(other)
                    ),
                );
                None
            }
        }
    }

    /// `value` parsed by `parse`; its message is reported with the key path and line.
    pub(super) fn parse<T>(
        &mut self,
        value: &Value<'_>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.scalar(value)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(value.line, format!("{}: {message}", value.path));
                None
            }
        }
    }

    /// `value` as a list whose items are parsed by `parse`, each with its line; `None` if any item is bad
    /// (every bad item is reported).
    pub(super) fn parse_list<T>(
        &mut self,
        value: &Value<'_>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<(T, usize)>> {
        let items = self.list(value)?;
        let parsed: Vec<Option<(T, usize)>> = items
            .iter()
            .map(|item| self.parse(item, &parse).map(|v| (v, item.line)))
            .collect();
        parsed.into_iter().collect()
    }

    /// `value` as a whole number in `range`, or `None` after reporting `what must be ...`.
    pub(super) fn integer<T: TryFrom<u64>>(
        &mut self,
        value: &Value<'_>,
        range: std::ops::RangeInclusive<u64>,
        hint: &str,
    ) -> Option<T> {
        let n = self.parse(value, value::integer)?;
        match T::try_from(n) {
            Ok(v) if range.contains(&n) => Some(v),
            _ => {
                self.error(
                    value.line,
                    format!(
                        "{}: {n} is out of range; use {}..={}{hint}",
                        value.path,
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        }
    }
}

impl<'n> Value<'n> {
    /// The scalar's text, if the value is a scalar (no error otherwise).
    pub(super) fn as_scalar(&self) -> Option<&'n str> {
        match self.node {
            Node::Scalar(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// The whole file, for the top-level mapping.
    pub(super) fn root(node: &'n Node) -> Value<'n> {
        Value {
            node,
            path: String::new(),
            line: line_of(node),
        }
    }

    /// The key path, e.g. `uplinks[0].routes[1]`.
    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// The line the value starts on (for an empty value, the line of its key).
    pub(super) fn line(&self) -> usize {
        self.line
    }
}

impl<'n> Map<'n> {
    /// The value of `key`; `None` when it is absent or empty (`key:`, `key: ~`, `key: null`).
    pub(super) fn get(&self, key: &str) -> Option<Value<'n>> {
        let (k, node) = self.node.iter().find(|(k, _)| k.as_str() == key)?;
        if is_null(node) {
            return None;
        }
        let key_line = k.span().start().map_or(self.line, |m| m.line());
        Some(Value {
            node,
            path: self.child_path(key),
            // A block mapping or list under a key starts on the next line; a missing key inside it is best
            // reported on the line of the key that opened it.
            line: match node {
                Node::Scalar(_) => line_of(node),
                _ => key_line,
            },
        })
    }

    /// The value of `key`, reported as missing (on the line of this mapping) when absent, or as empty (on
    /// its own line) when it has no value.
    pub(super) fn require(&self, reader: &mut Reader<'_>, key: &str) -> Option<Value<'n>> {
        let value = self.get(key);
        if value.is_some() {
            return value;
        }
        let path = self.child_path(key);
        match self.node.keys().find(|k| k.as_str() == key) {
            Some(k) => reader.error(
                k.span().start().map_or(self.line, |m| m.line()),
                format!("`{path}` has no value; give it one (see docs/configuration.md)"),
            ),
            None => {
                let place = if self.path.is_empty() {
                    "the file".to_owned()
                } else {
                    format!("`{}`", self.path)
                };
                reader.error(
                    self.line,
                    format!(
                        "{place} is missing the required key `{path}`; add it (see docs/configuration.md)"
                    ),
                );
            }
        }
        None
    }

    /// The key path of this mapping, e.g. `uplinks[0]`.
    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// The line of the key that introduced this mapping.
    pub(super) fn line(&self) -> usize {
        self.line
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

/// An empty value: `key:`, `key: ~` or `key: null` (not a quoted `""`).
fn is_null(node: &Node) -> bool {
    let Node::Scalar(s) = node else {
        return false;
    };
    s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
}

fn kind(node: &Node) -> String {
    match node {
        Node::Scalar(s) => format!("the value `{}`", s.as_str()),
        Node::Sequence(_) => "a list".into(),
        Node::Mapping(_) => "a mapping".into(),
    }
}
