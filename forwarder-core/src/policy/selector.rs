//! The Calico label-selector language: parser, matcher and canonical printer.
//!
//! Grammar (whitespace between tokens is free; precedence `!` > `&&` > `||`, binary operators associate to
//! the left):
//!
//! ```text
//! or      := and ( '||' and )*
//! and     := unary ( '&&' unary )*
//! unary   := '!' unary | primary
//! primary := '(' or ')' | 'all' '(' ')' | 'has' '(' label ')' | label op
//! op      := '==' str | '!=' str | 'in' set | 'not' 'in' set
//!          | 'contains' str | 'starts' 'with' str | 'ends' 'with' str
//! set     := '{' [ str ( ',' str )* ] '}'
//! str     := "'" chars "'" | '"' chars '"'          (no escapes, as in Calico)
//! label   := [A-Za-z0-9_./-]+                        (e.g. projectcalico.org/name)
//! ```
//!
//! An empty (or all-whitespace) selector matches everything, like `all()`: Calico treats an empty selector
//! string as "select all". Semantics follow Calico: `k != 'v'` and `k not in {…}` are true when `k` is absent;
//! `==`, `in`, `contains`, `starts with` and `ends with` are false when it is absent.
//!
//! [`Selector`]'s `Display` prints a canonical form that parses back to the same tree.

use core::fmt;
use std::collections::BTreeMap;

/// Labels of a Kubernetes object (or the synthetic labels of a namespace).
pub type Labels = BTreeMap<String, String>;

/// A node of a parsed selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `all()`: matches everything.
    All,
    /// `has(k)`: the label is present.
    Has(String),
    /// `k == 'v'`.
    Eq(String, String),
    /// `k != 'v'` (true when `k` is absent).
    Ne(String, String),
    /// `k in {'a', 'b'}`.
    In(String, Vec<String>),
    /// `k not in {'a', 'b'}` (true when `k` is absent).
    NotIn(String, Vec<String>),
    /// `k contains 's'`.
    Contains(String, String),
    /// `k starts with 's'`.
    StartsWith(String, String),
    /// `k ends with 's'`.
    EndsWith(String, String),
    /// `!e`.
    Not(Box<Expr>),
    /// `a && b`.
    And(Box<Expr>, Box<Expr>),
    /// `a || b`.
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    /// Whether `labels` satisfy this expression.
    pub fn matches(&self, labels: &Labels) -> bool {
        let get = |k: &str| labels.get(k).map(String::as_str);
        match self {
            Expr::All => true,
            Expr::Has(k) => labels.contains_key(k),
            Expr::Eq(k, v) => get(k) == Some(v.as_str()),
            Expr::Ne(k, v) => get(k) != Some(v.as_str()),
            Expr::In(k, set) => get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            Expr::NotIn(k, set) => !get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            Expr::Contains(k, v) => get(k).is_some_and(|x| x.contains(v.as_str())),
            Expr::StartsWith(k, v) => get(k).is_some_and(|x| x.starts_with(v.as_str())),
            Expr::EndsWith(k, v) => get(k).is_some_and(|x| x.ends_with(v.as_str())),
            Expr::Not(e) => !e.matches(labels),
            Expr::And(a, b) => a.matches(labels) && b.matches(labels),
            Expr::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }

    /// Binding strength for printing: `||` 1, `&&` 2, `!` 3, atoms 4.
    fn level(&self) -> u8 {
        match self {
            Expr::Or(..) => 1,
            Expr::And(..) => 2,
            Expr::Not(_) => 3,
            _ => 4,
        }
    }
}

/// A parsed Calico selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    root: Expr,
}

impl Selector {
    /// The selector that matches everything (`all()`).
    pub fn all() -> Self {
        Selector { root: Expr::All }
    }

    /// Parses a selector; an empty string means `all()`.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser {
            s: text.as_bytes(),
            text,
            pos: 0,
        };
        p.skip_ws();
        if p.pos == p.s.len() {
            return Ok(Selector::all());
        }
        let root = p.or()?;
        p.skip_ws();
        if p.pos != p.s.len() {
            return Err(p.error("'&&', '||' or the end of the selector"));
        }
        Ok(Selector { root })
    }

    /// Wraps an expression tree.
    pub fn from_expr(root: Expr) -> Self {
        Selector { root }
    }

    /// The expression tree.
    pub fn expr(&self) -> &Expr {
        &self.root
    }

    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.root.matches(labels)
    }
}

impl Default for Selector {
    fn default() -> Self {
        Selector::all()
    }
}

impl core::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// A selector that does not parse: where, what the parser expected and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    /// Byte offset into the selector text.
    pub position: usize,
    /// What would have been valid there.
    pub expected: &'static str,
    /// What was there instead (a short excerpt, or "end of input").
    pub found: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at {}: expected {}, found {}",
            self.position, self.expected, self.found
        )
    }
}

impl std::error::Error for SelectorError {}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn error(&self, expected: &'static str) -> SelectorError {
        let rest = self.text.get(self.pos..).unwrap_or("");
        let found = if rest.is_empty() {
            "end of input".to_string()
        } else {
            let excerpt: String = rest.chars().take(12).collect();
            let more = if rest.chars().nth(12).is_some() {
                "…"
            } else {
                ""
            };
            format!("'{excerpt}{more}'")
        };
        SelectorError {
            position: self.pos,
            expected,
            found,
        }
    }

    /// Consumes `tok` (after whitespace) if it is next.
    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        if self.s[self.pos..].starts_with(tok.as_bytes()) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str, expected: &'static str) -> Result<(), SelectorError> {
        if self.eat(tok) {
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    /// Reads a label-shaped word (after whitespace) without consuming it.
    fn peek_word(&mut self) -> &str {
        self.skip_ws();
        let end = self.s[self.pos..]
            .iter()
            .position(|&b| !is_label_byte(b))
            .map_or(self.s.len(), |n| self.pos + n);
        // Label bytes are ASCII, so `pos..end` lies on character boundaries.
        self.text.get(self.pos..end).unwrap_or("")
    }

    fn or(&mut self) -> Result<Expr, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, SelectorError> {
        self.skip_ws();
        // `!` but not `!=` (which cannot start an expression anyway; let primary report it).
        if self.peek() == Some(b'!') && self.s.get(self.pos + 1) != Some(&b'=') {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, SelectorError> {
        if self.eat("(") {
            let e = self.or()?;
            self.expect(")", "')'")?;
            return Ok(e);
        }
        let start = self.pos;
        let word = self.peek_word().to_string();
        if word.is_empty() {
            return Err(self.error("a label, '!', '(', 'has(', or 'all()'"));
        }
        self.pos += word.len();
        // `all` and `has` are functions only when a '(' follows; otherwise they are label names.
        let save = self.pos;
        if (word == "all" || word == "has") && self.eat("(") {
            if word == "all" {
                self.expect(")", "')' after 'all('")?;
                return Ok(Expr::All);
            }
            let key = self.label("a label inside 'has(…)'")?;
            self.expect(")", "')' after the label in 'has(…)'")?;
            return Ok(Expr::Has(key));
        }
        self.pos = save;
        debug_assert!(self.pos > start);
        self.operator(word)
    }

    fn label(&mut self, expected: &'static str) -> Result<String, SelectorError> {
        let word = self.peek_word().to_string();
        if word.is_empty() {
            return Err(self.error(expected));
        }
        self.pos += word.len();
        Ok(word)
    }

    /// Consumes the keyword `kw` when it is a whole word.
    fn eat_word(&mut self, kw: &str) -> bool {
        if self.peek_word() == kw {
            self.pos += kw.len();
            true
        } else {
            false
        }
    }

    fn operator(&mut self, key: String) -> Result<Expr, SelectorError> {
        const OPS: &str =
            "an operator ('==', '!=', 'in', 'not in', 'contains', 'starts with', 'ends with')";
        if self.eat("==") {
            return Ok(Expr::Eq(key, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Expr::Ne(key, self.string()?));
        }
        if self.eat_word("in") {
            return Ok(Expr::In(key, self.set()?));
        }
        if self.eat_word("not") {
            if !self.eat_word("in") {
                return Err(self.error("'in' after 'not'"));
            }
            return Ok(Expr::NotIn(key, self.set()?));
        }
        if self.eat_word("contains") {
            return Ok(Expr::Contains(key, self.string()?));
        }
        if self.eat_word("starts") {
            if !self.eat_word("with") {
                return Err(self.error("'with' after 'starts'"));
            }
            return Ok(Expr::StartsWith(key, self.string()?));
        }
        if self.eat_word("ends") {
            if !self.eat_word("with") {
                return Err(self.error("'with' after 'ends'"));
            }
            return Ok(Expr::EndsWith(key, self.string()?));
        }
        Err(self.error(OPS))
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(self.error("a quoted string")),
        };
        let open = self.pos;
        let body = open + 1;
        let Some(len) = self.s[body..].iter().position(|&b| b == quote) else {
            self.pos = open;
            return Err(SelectorError {
                position: open,
                expected: if quote == b'\'' {
                    "a closing \"'\""
                } else {
                    "a closing '\"'"
                },
                found: "end of input".to_string(),
            });
        };
        // Quotes are ASCII, so both ends lie on character boundaries.
        let value = self.text.get(body..body + len).unwrap_or("").to_string();
        self.pos = body + len + 1;
        Ok(value)
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{", "'{'")?;
        let mut values = Vec::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.push(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            self.expect(",", "',' or '}'")?;
        }
    }
}

/// Prints a string with a quote character it does not contain (single quotes preferred).
fn quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    if s.contains('\'') {
        write!(f, "\"{s}\"")
    } else {
        write!(f, "'{s}'")
    }
}

fn write_set(f: &mut fmt::Formatter<'_>, set: &[String]) -> fmt::Result {
    f.write_str("{")?;
    for (i, v) in set.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        quoted(f, v)?;
    }
    f.write_str("}")
}

/// Prints `e`, parenthesised when it binds less tightly than `min`.
fn write_at(f: &mut fmt::Formatter<'_>, e: &Expr, min: u8) -> fmt::Result {
    if e.level() < min {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Has(k) => write!(f, "has({k})"),
            Expr::Eq(k, v) => {
                write!(f, "{k} == ")?;
                quoted(f, v)
            }
            Expr::Ne(k, v) => {
                write!(f, "{k} != ")?;
                quoted(f, v)
            }
            Expr::In(k, set) => {
                write!(f, "{k} in ")?;
                write_set(f, set)
            }
            Expr::NotIn(k, set) => {
                write!(f, "{k} not in ")?;
                write_set(f, set)
            }
            Expr::Contains(k, v) => {
                write!(f, "{k} contains ")?;
                quoted(f, v)
            }
            Expr::StartsWith(k, v) => {
                write!(f, "{k} starts with ")?;
                quoted(f, v)
            }
            Expr::EndsWith(k, v) => {
                write!(f, "{k} ends with ")?;
                quoted(f, v)
            }
            Expr::Not(e) => {
                f.write_str("!")?;
                write_at(f, e, 3)
            }
            // Left-associative: the right operand of the same operator needs parentheses.
            Expr::And(a, b) => {
                write_at(f, a, 2)?;
                f.write_str(" && ")?;
                write_at(f, b, 3)
            }
            Expr::Or(a, b) => {
                write_at(f, a, 1)?;
                f.write_str(" || ")?;
                write_at(f, b, 2)
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn m(sel: &str, pairs: &[(&str, &str)]) -> bool {
        Selector::parse(sel)
            .unwrap_or_else(|e| panic!("{sel}: {e}"))
            .matches(&labels(pairs))
    }

    #[test]
    fn equality_and_inequality() {
        assert!(m("egress-code == 'red'", &[("egress-code", "red")]));
        assert!(!m("egress-code == 'red'", &[("egress-code", "blue")]));
        assert!(!m("egress-code == 'red'", &[]));
        assert!(m("egress-code != 'red'", &[("egress-code", "blue")]));
        assert!(!m("egress-code != 'red'", &[("egress-code", "red")]));
        assert!(
            m("egress-code != 'red'", &[]),
            "!= is true when the label is absent"
        );
    }

    #[test]
    fn sets() {
        assert!(m("k in {'a','b'}", &[("k", "b")]));
        assert!(!m("k in {'a','b'}", &[("k", "c")]));
        assert!(!m("k in {'a','b'}", &[]));
        assert!(!m("k in {}", &[("k", "")]));
        assert!(m("k not in {'a', 'b'}", &[("k", "c")]));
        assert!(!m("k not in {'a', 'b'}", &[("k", "a")]));
        assert!(
            m("k not in {'a', 'b'}", &[]),
            "not in is true when the label is absent"
        );
        assert!(Selector::parse("k notin {'a'}").is_err());
    }

    #[test]
    fn has_all_and_negation() {
        assert!(m("has(k)", &[("k", "")]));
        assert!(!m("has(k)", &[]));
        assert!(m("!has(k)", &[]));
        assert!(m("! has ( k )", &[]));
        assert!(!m("!has(k)", &[("k", "v")]));
        assert!(m("all()", &[]));
        assert!(m("all( )", &[("x", "y")]));
        assert!(m("", &[]));
        assert!(m("   ", &[("a", "b")]));
        assert!(!m("!all()", &[]));
        assert!(m("!(a == 'x')", &[("a", "y")]));
        assert!(m("!!has(a)", &[("a", "y")]));
    }

    #[test]
    fn string_operators() {
        assert!(m("k contains 'ell'", &[("k", "hello")]));
        assert!(m("k starts with 'he'", &[("k", "hello")]));
        assert!(m("k ends with 'lo'", &[("k", "hello")]));
        assert!(!m("k ends with 'he'", &[("k", "hello")]));
        assert!(!m("k contains ''", &[]));
    }

    #[test]
    fn label_keys_with_punctuation_and_keyword_names() {
        assert!(m(
            "projectcalico.org/name == 'default'",
            &[("projectcalico.org/name", "default")]
        ));
        assert!(m("a_b-c.d/e-f == 'x'", &[("a_b-c.d/e-f", "x")]));
        assert!(m(
            "has(projectcalico.org/name)",
            &[("projectcalico.org/name", "x")]
        ));
        // Words that are keywords elsewhere are fine as label names.
        assert!(m("all == 'x'", &[("all", "x")]));
        assert!(m("has == 'x'", &[("has", "x")]));
        assert!(m("in in {'x'}", &[("in", "x")]));
        assert!(m("not not in {'x'}", &[("not", "y")]));
    }

    #[test]
    fn quoting() {
        assert!(m("k == \"v\"", &[("k", "v")]));
        assert!(m("k == \"it's\"", &[("k", "it's")]));
        assert!(m("k == 'say \"hi\"'", &[("k", "say \"hi\"")]));
        assert!(m("k in {\"a\", 'b'}", &[("k", "a")]));
        assert!(m("k == ''", &[("k", "")]));
        assert!(m("k == 'a && b || c'", &[("k", "a && b || c")]));
    }

    #[test]
    fn precedence() {
        let p = |s: &str| Selector::parse(s).unwrap().root;
        let eq = |k: &str| Expr::Eq(k.into(), "1".into());
        let b = Box::new;
        // && binds tighter than ||.
        assert_eq!(
            p("a == '1' || b == '1' && c == '1'"),
            Expr::Or(b(eq("a")), b(Expr::And(b(eq("b")), b(eq("c")))))
        );
        assert_eq!(
            p("a == '1' && b == '1' || c == '1'"),
            Expr::Or(b(Expr::And(b(eq("a")), b(eq("b")))), b(eq("c")))
        );
        // ! binds tighter than &&.
        assert_eq!(
            p("!a == '1' && b == '1'"),
            Expr::And(b(Expr::Not(b(eq("a")))), b(eq("b")))
        );
        // Parentheses override.
        assert_eq!(
            p("(a == '1' || b == '1') && c == '1'"),
            Expr::And(b(Expr::Or(b(eq("a")), b(eq("b")))), b(eq("c")))
        );
        // Left associativity.
        assert_eq!(
            p("a == '1' || b == '1' || c == '1'"),
            Expr::Or(b(Expr::Or(b(eq("a")), b(eq("b")))), b(eq("c")))
        );
        // Semantics: x matches "a || b && c" with only a true.
        assert!(m("a == '1' || b == '1' && c == '1'", &[("a", "1")]));
        assert!(!m("(a == '1' || b == '1') && c == '1'", &[("a", "1")]));
    }

    fn err(sel: &str) -> SelectorError {
        match Selector::parse(sel) {
            Ok(s) => panic!("{sel:?} parsed as {s}"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = err("(a == 'x' && b == 'y'");
        assert_eq!(e.position, 21);
        assert_eq!(e.to_string(), "at 21: expected ')', found end of input");

        let e = err("a == 'x' b == 'y'");
        assert_eq!(e.position, 9);
        assert!(
            e.to_string().starts_with(
                "at 9: expected '&&', '||' or the end of the selector, found 'b == 'y''"
            ),
            "{e}"
        );

        let e = err("a = 'x'");
        assert_eq!(
            (e.position, e.expected.starts_with("an operator")),
            (2, true),
            "{e}"
        );

        let e = err("a == x");
        assert_eq!((e.position, e.expected), (5, "a quoted string"));

        let e = err("a == 'x");
        assert_eq!((e.position, e.expected), (5, "a closing \"'\""));

        let e = err("a in {'x' 'y'}");
        assert_eq!((e.position, e.expected), (10, "',' or '}'"));

        let e = err("a not {'x'}");
        assert_eq!((e.position, e.expected), (6, "'in' after 'not'"));

        let e = err("has()");
        assert_eq!((e.position, e.expected), (4, "a label inside 'has(…)'"));

        let e = err("all(x)");
        assert_eq!((e.position, e.expected), (4, "')' after 'all('"));

        let e = err("a == 'x' &&");
        assert_eq!(e.position, 11);
        assert!(e.to_string().ends_with("found end of input"));

        let e = err("&& a == 'x'");
        assert_eq!(e.position, 0);

        let e = err("a == 'é' && ü");
        assert_eq!(e.position, 13);
        assert_eq!(e.found, "'ü'");
    }

    #[test]
    fn display_is_canonical() {
        let s = Selector::parse("!(a=='1'||b!=\"2\")&&c in{'x',\"y\"}&&!has(d)||all()").unwrap();
        assert_eq!(
            s.to_string(),
            "!(a == '1' || b != '2') && c in {'x', 'y'} && !has(d) || all()"
        );
        assert_eq!(Selector::parse("").unwrap().to_string(), "all()");
        assert_eq!(
            Selector::parse("k == \"it's\"").unwrap().to_string(),
            "k == \"it's\""
        );
        let right = Selector::parse("a == '1' && (b == '1' && c == '1')").unwrap();
        assert_eq!(right.to_string(), "a == '1' && (b == '1' && c == '1')");
    }

    fn label_strategy() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_./-]{0,6}"
    }

    fn value_strategy() -> impl Strategy<Value = String> {
        // Either quote may appear, but not both (Calico strings have no escapes).
        prop_oneof![
            "[a-zA-Z0-9 ._&|(){}!=-]{0,6}",
            "[a-z']{0,4}",
            "[a-z\"]{0,4}"
        ]
    }

    fn expr_strategy() -> impl Strategy<Value = Expr> {
        let leaf = prop_oneof![
            Just(Expr::All),
            label_strategy().prop_map(Expr::Has),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Expr::Eq(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Expr::Ne(k, v)),
            (
                label_strategy(),
                prop::collection::vec(value_strategy(), 0..3)
            )
                .prop_map(|(k, v)| Expr::In(k, v)),
            (
                label_strategy(),
                prop::collection::vec(value_strategy(), 0..3)
            )
                .prop_map(|(k, v)| Expr::NotIn(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Expr::Contains(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Expr::StartsWith(k, v)),
            (label_strategy(), value_strategy()).prop_map(|(k, v)| Expr::EndsWith(k, v)),
        ];
        leaf.prop_recursive(5, 32, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
            ]
        })
    }

    proptest! {
        #[test]
        fn parse_display_round_trips(e in expr_strategy()) {
            let sel = Selector::from_expr(e);
            let text = sel.to_string();
            let back = Selector::parse(&text).map_err(|err| TestCaseError::fail(format!("{text}: {err}")))?;
            prop_assert_eq!(back, sel, "{}", text);
        }

        #[test]
        fn parse_never_panics(text in "[ a-z'\"(){}!=&|,.]{0,24}") {
            let _ = Selector::parse(&text);
        }
    }
}
