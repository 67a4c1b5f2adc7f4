//! No import cycles between source files, in any crate of the workspace.
//!
//! Layers only stay layers if the dependencies between files go one way.
//! This test reads every workspace member's `src/` (each crate root —
//! `lib.rs`, `main.rs`, `bin/*` — is its own module tree), maps each file
//! to its module path, and collects the references one file makes to
//! another:
//!
//! * `use` declarations (`use crate::a::{b::C, d}`, `use super::*`,
//!   `use self::child::X`, and a bare child module: `use child::X`), and
//! * paths in code (`crate::a::f(..)`, `super::T`, `child::f(..)`).
//!
//! A `mod.rs` (or `foo.rs` with a `foo/` directory) and its child files
//! are separate nodes: a child naming its parent's items (`super::X`) is an
//! edge to the parent's file, the parent calling `child::f` is an edge to
//! the child's. A `pub use` is a facade, not a dependency of the file that
//! holds it: a path that goes through one (`crate::Peer`, re-exported by
//! `lib.rs` from `phase.rs`) is followed to the file that defines the item.
//! A reference into the file itself (an inline `mod tests { use super::*; }`)
//! is no edge.
//!
//! The parsing is token-based, not a Rust parser: comments, strings and
//! char literals are skipped; macro bodies are read like code (`$crate::x`
//! counts as `crate::x`). It fails listing every elementary cycle as
//! `a.rs → b.rs → a.rs`, and where each of its edges comes from.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// At most this many cycles are listed (a tangle can have very many).
const MAX_CYCLES: usize = 500;

#[test]
fn no_import_cycles_between_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let graph = Graph::of_workspace(&root);
    // A broken walk must not pass by seeing nothing.
    assert!(
        graph.nodes.len() > 50,
        "only {} source files found under {}",
        graph.nodes.len(),
        root.display()
    );
    assert!(
        graph.edge_count() > 50,
        "only {} edges found",
        graph.edge_count()
    );
    let report = graph.cycle_report();
    assert!(report.is_empty(), "import cycles between files:\n{report}");
}

// ---------------------------------------------------------------- lexing

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Ident,
    Str,
    Punct,
}

#[derive(Debug, Clone)]
struct Tok {
    kind: Kind,
    text: String,
    line: usize,
}

impl Tok {
    fn is(&self, s: &str) -> bool {
        self.kind != Kind::Str && self.text == s
    }
    fn ident(&self) -> Option<&str> {
        (self.kind == Kind::Ident).then_some(self.text.as_str())
    }
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Tokens of a Rust source file: identifiers, string literals (with their
/// raw contents, for `#[path = "…"]`) and punctuation (`::` as one token).
/// Comments, char literals, lifetimes and numbers are dropped.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    // Skips a string body starting after its opening quote; returns its text.
    let string = |i: &mut usize, line: &mut usize, hashes: Option<usize>| -> String {
        let mut s = String::new();
        while *i < c.len() {
            let ch = c[*i];
            if ch == '\n' {
                *line += 1;
            }
            match hashes {
                None if ch == '\\' => {
                    if at(*i + 1) == '\n' {
                        *line += 1;
                    }
                    s.push(ch);
                    s.push(at(*i + 1));
                    *i += 2;
                    continue;
                }
                None if ch == '"' => {
                    *i += 1;
                    return s;
                }
                Some(n) if ch == '"' && (1..=n).all(|k| at(*i + k) == '#') => {
                    *i += 1 + n;
                    return s;
                }
                _ => {}
            }
            s.push(ch);
            *i += 1;
        }
        s
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            let l = line;
            i += 1;
            let s = string(&mut i, &mut line, None);
            out.push(Tok {
                kind: Kind::Str,
                text: s,
                line: l,
            });
        } else if ch == '\'' {
            // 'x', '\n', '\u{..}' are chars; 'a (no closing quote) a lifetime.
            if at(i + 1) == '\\' {
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && is_ident_char(c[i]) {
                    i += 1;
                }
            }
        } else if is_ident_start(ch) {
            // String prefixes: r"", r#""#, b"", br"", c"", cr""; b'x'.
            let raw_at = match (ch, at(i + 1)) {
                ('r', _) => Some(i + 1),
                ('b' | 'c', 'r') => Some(i + 2),
                _ => None,
            };
            if let Some(j) = raw_at {
                let hashes = (j..).take_while(|&k| at(k) == '#').count();
                if at(j + hashes) == '"' {
                    let l = line;
                    i = j + hashes + 1;
                    let s = string(&mut i, &mut line, Some(hashes));
                    out.push(Tok {
                        kind: Kind::Str,
                        text: s,
                        line: l,
                    });
                    continue;
                }
                if ch == 'r' && hashes == 1 && is_ident_start(at(j + 1)) {
                    // A raw identifier: r#type.
                    i = j + 1;
                    continue;
                }
            }
            if matches!(ch, 'b' | 'c') && at(i + 1) == '"' {
                let l = line;
                i += 2;
                let s = string(&mut i, &mut line, None);
                out.push(Tok {
                    kind: Kind::Str,
                    text: s,
                    line: l,
                });
                continue;
            }
            if ch == 'b' && at(i + 1) == '\'' {
                i += 1; // the char literal is skipped next round
                continue;
            }
            let start = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            let text: String = c[start..i].iter().collect();
            out.push(Tok {
                kind: Kind::Ident,
                text,
                line,
            });
        } else if ch.is_ascii_digit() {
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
        } else if ch == '$' && at(i + 1) == 'c' {
            // `$crate::x` in a macro body is `crate::x` of the defining crate.
            i += 1;
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Tok {
                kind: Kind::Punct,
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            out.push(Tok {
                kind: Kind::Punct,
                text: ch.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}

// --------------------------------------------------------------- parsing

/// A path one file names, in the module it is written in (`ctx`: the
/// file's module path plus any inline `mod x { … }` around it).
#[derive(Debug, Clone)]
struct Ref {
    ctx: Vec<String>,
    path: Vec<String>,
    line: usize,
}

/// `pub use path as name;`: `name` in this module stands for `path`.
#[derive(Debug, Clone)]
struct ReExport {
    ctx: Vec<String>,
    path: Vec<String>,
    name: String,
}

/// `mod name;` (with its `#[path]`, if any), declared in module `ctx`.
#[derive(Debug, Clone)]
struct ModDecl {
    ctx: Vec<String>,
    name: String,
    path_attr: Option<String>,
}

#[derive(Debug, Default)]
struct Parsed {
    refs: Vec<Ref>,
    reexports: Vec<ReExport>,
    mods: Vec<ModDecl>,
}

/// Expands one use tree (`a::{b::C, d::{self, E as F}, *}`) into its
/// paths, each with the name it binds (None for a glob).
fn expand_use(
    t: &[Tok],
    pos: &mut usize,
    prefix: &[String],
    out: &mut Vec<(Vec<String>, Option<String>)>,
) {
    let mut path = prefix.to_vec();
    loop {
        let Some(tok) = t.get(*pos) else {
            if path.len() > prefix.len() {
                let name = path.last().cloned();
                out.push((path, name));
            }
            return;
        };
        if tok.is("{") {
            *pos += 1;
            while *pos < t.len() && !t[*pos].is("}") {
                let before = *pos;
                expand_use(t, pos, &path, out);
                if t.get(*pos).is_some_and(|t| t.is(",")) {
                    *pos += 1;
                }
                if *pos == before {
                    *pos += 1; // something unexpected: never loop
                }
            }
            *pos += 1;
            return;
        } else if tok.is("*") {
            *pos += 1;
            out.push((path, None));
            return;
        } else if tok.is("::") {
            if path.is_empty() {
                path.push("::".into()); // `::name`: an extern crate
            }
            *pos += 1;
        } else if let Some(id) = tok.ident() {
            *pos += 1;
            let mut name = id.to_string();
            let segment = name.clone();
            if t.get(*pos).is_some_and(|t| t.is("as")) {
                name = t.get(*pos + 1).map_or(name, |t| t.text.clone());
                *pos += 2;
            }
            if t.get(*pos).is_some_and(|t| t.is("::")) {
                path.push(segment);
                continue;
            }
            if segment == "self" {
                // `a::{self, ..}` names the module `a` itself.
                let name = if name == "self" {
                    path.last().cloned()
                } else {
                    Some(name)
                };
                out.push((path, name));
            } else {
                path.push(segment);
                out.push((path, Some(name)));
            }
            return;
        } else {
            return;
        }
    }
}

fn parse(src: &str, module: &[String]) -> Parsed {
    let t = lex(src);
    let mut p = Parsed::default();
    let mut depth = 0usize;
    // Inline modules around the current token: (name, depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let ctx_of = |inline: &[(String, usize)]| {
        let mut ctx = module.to_vec();
        ctx.extend(inline.iter().map(|(n, _)| n.clone()));
        ctx
    };
    let mut i = 0;
    while i < t.len() {
        let tok = &t[i];
        if tok.is("{") {
            depth += 1;
        } else if tok.is("}") {
            if inline.last().is_some_and(|&(_, d)| d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
        } else if tok.is("mod") && t.get(i + 1).is_some_and(|t| t.kind == Kind::Ident) {
            let name = t[i + 1].text.clone();
            if t.get(i + 2).is_some_and(|t| t.is("{")) {
                depth += 1;
                inline.push((name, depth));
                i += 3;
                continue;
            }
            if t.get(i + 2).is_some_and(|t| t.is(";")) {
                let path_attr = path_attribute(&t[..i]);
                p.mods.push(ModDecl {
                    ctx: ctx_of(&inline),
                    name,
                    path_attr,
                });
                i += 3;
                continue;
            }
        } else if tok.is("use") && !t.get(i + 1).is_some_and(|t| t.is("<")) {
            let public = is_pub(&t[..i]);
            let mut end = i + 1;
            while end < t.len() && !t[end].is(";") {
                end += 1;
            }
            let mut paths = Vec::new();
            let mut pos = 0;
            expand_use(&t[i + 1..end], &mut pos, &[], &mut paths);
            let ctx = ctx_of(&inline);
            for (path, name) in paths {
                match name {
                    Some(name) if public => p.reexports.push(ReExport {
                        ctx: ctx.clone(),
                        path,
                        name,
                    }),
                    // A public glob re-export is a facade of a whole
                    // module: kept as a reference, it is the file's tie.
                    _ => p.refs.push(Ref {
                        ctx: ctx.clone(),
                        path,
                        line: tok.line,
                    }),
                }
            }
            i = end + 1;
            continue;
        } else if let Some(id) = tok.ident() {
            let starts_path = t.get(i + 1).is_some_and(|t| t.is("::"))
                && !(i > 0 && (t[i - 1].is("::") || t[i - 1].is("in")));
            if starts_path && id != "Self" {
                let mut path = vec![id.to_string()];
                let mut j = i + 1;
                while t.get(j).is_some_and(|t| t.is("::")) {
                    match t.get(j + 1).and_then(Tok::ident) {
                        Some(seg) => path.push(seg.to_string()),
                        None => break,
                    }
                    j += 2;
                }
                p.refs.push(Ref {
                    ctx: ctx_of(&inline),
                    path,
                    line: tok.line,
                });
                i = j;
                continue;
            }
        }
        i += 1;
    }
    p
}

/// Whether the item ending just before here is `pub` / `pub(…)`.
fn is_pub(before: &[Tok]) -> bool {
    match before.last() {
        Some(t) if t.is("pub") => true,
        Some(t) if t.is(")") => {
            let open = before.iter().rposition(|t| t.is("("));
            open.is_some_and(|o| o > 0 && before[o - 1].is("pub"))
        }
        _ => false,
    }
}

/// The `#[path = "…"]` among the attributes just before a `mod`.
fn path_attribute(before: &[Tok]) -> Option<String> {
    let mut end = before.len();
    // Walk back over `#[…]` attributes (and a `pub`/`pub(crate)`).
    loop {
        if end > 0 && before[end - 1].is("pub") {
            end -= 1;
            continue;
        }
        if end == 0 || !before[end - 1].is("]") {
            return None;
        }
        let open = before[..end].iter().rposition(|t| t.is("["))?;
        if open == 0 || !before[open - 1].is("#") {
            return None;
        }
        let attr = &before[open + 1..end - 1];
        if attr.len() == 3 && attr[0].is("path") && attr[1].is("=") && attr[2].kind == Kind::Str {
            return Some(attr[2].text.clone());
        }
        end = open - 1;
    }
}

// ----------------------------------------------------------------- graph

#[derive(Debug)]
struct Node {
    /// Shown in reports: `crates/handoff/src/error.rs`.
    label: String,
    /// Which module tree (crate root file) the file belongs to.
    tree: usize,
    parsed: Parsed,
}

#[derive(Debug, Default)]
struct Graph {
    nodes: Vec<Node>,
    /// Per tree: module path -> node.
    modules: Vec<BTreeMap<Vec<String>, usize>>,
    /// from -> to -> (line, path as written) of the first reference.
    edges: BTreeMap<usize, BTreeMap<usize, (usize, String)>>,
}

impl Graph {
    fn of_workspace(root: &Path) -> Graph {
        let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("workspace Cargo.toml");
        let mut g = Graph::default();
        let mut seen = HashSet::new();
        for member in workspace_members(&manifest) {
            let src = root.join(&member).join("src");
            if !src.is_dir() {
                continue;
            }
            let mut roots = vec![src.join("lib.rs"), src.join("main.rs")];
            if let Ok(bins) = fs::read_dir(src.join("bin")) {
                let mut bins: Vec<PathBuf> = bins.flatten().map(|e| e.path()).collect();
                bins.sort();
                for bin in bins {
                    roots.push(if bin.is_dir() {
                        bin.join("main.rs")
                    } else {
                        bin
                    });
                }
            }
            let mut lib_tree = None;
            for file in roots.into_iter().filter(|f| f.is_file()) {
                let tree = g.modules.len();
                g.modules.push(BTreeMap::new());
                if file == src.join("lib.rs") {
                    lib_tree = Some(tree);
                }
                g.walk(root, &file, tree, Vec::new(), &mut seen);
            }
            // Files no `mod x;` reaches (declared by a macro, as lib.rs's
            // `supervisor_side!` does) belong to the library by their path.
            let Some(tree) = lib_tree else { continue };
            let mut rest = Vec::new();
            rust_files(&src, &mut rest);
            rest.retain(|f| !f.starts_with(src.join("bin")));
            rest.sort_by_key(|f| (f.components().count(), f.clone()));
            for file in rest {
                if seen.contains(&file) {
                    continue;
                }
                let rel = file.strip_prefix(&src).unwrap();
                let mut module: Vec<String> = rel
                    .iter()
                    .map(|c| c.to_string_lossy().into_owned())
                    .collect();
                let last = module.pop().unwrap();
                if last != "mod.rs" {
                    module.push(last.trim_end_matches(".rs").to_string());
                }
                g.walk(root, &file, tree, module, &mut seen);
            }
        }
        g.link();
        g
    }

    /// Adds `file` as `module` of `tree`, then the files its `mod x;` name.
    fn walk(
        &mut self,
        root: &Path,
        file: &Path,
        tree: usize,
        module: Vec<String>,
        seen: &mut HashSet<PathBuf>,
    ) {
        if !seen.insert(file.to_path_buf()) {
            return;
        }
        let src = fs::read_to_string(file).unwrap_or_default();
        let parsed = parse(&src, &module);
        let dir = file.parent().unwrap().to_path_buf();
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        // Where `mod x;` looks for x: beside a mod.rs / crate root, else in
        // the directory named after the file.
        let is_root = module.is_empty() || stem == "mod";
        let mod_dir = if is_root {
            dir.clone()
        } else {
            dir.join(&stem)
        };
        let label = file
            .strip_prefix(root)
            .unwrap_or(file)
            .to_string_lossy()
            .replace("/./", "/")
            .trim_start_matches("./")
            .to_string();
        let decls = parsed.mods.clone();
        let id = self.nodes.len();
        self.modules[tree].insert(module.clone(), id);
        self.nodes.push(Node {
            label,
            tree,
            parsed,
        });
        for decl in decls {
            let inline_dirs = &decl.ctx[module.len()..];
            let child_file = match &decl.path_attr {
                Some(p) if inline_dirs.is_empty() => dir.join(p),
                Some(p) => inline_dirs
                    .iter()
                    .fold(mod_dir.clone(), |d, c| d.join(c))
                    .join(p),
                None => {
                    let base = inline_dirs.iter().fold(mod_dir.clone(), |d, c| d.join(c));
                    let flat = base.join(format!("{}.rs", decl.name));
                    if flat.is_file() {
                        flat
                    } else {
                        base.join(&decl.name).join("mod.rs")
                    }
                }
            };
            if child_file.is_file() {
                let mut child = decl.ctx.clone();
                child.push(decl.name.clone());
                self.walk(root, &child_file, tree, child, seen);
            }
        }
    }

    /// The absolute module path a reference names, if it is one of ours.
    fn absolute(&self, tree: usize, ctx: &[String], path: &[String]) -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let mut abs = match first.as_str() {
            "crate" => Vec::new(),
            "self" => ctx.to_vec(),
            "super" => {
                let mut base = ctx.to_vec();
                base.pop()?;
                let mut rest = rest;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
                base.extend(rest.iter().cloned());
                return Some(base);
            }
            // A bare name is ours only if it is a child module's file.
            child => {
                let mut abs = ctx.to_vec();
                abs.push(child.to_string());
                if !self.modules[tree].contains_key(&abs) {
                    return None;
                }
                abs.extend(rest.iter().cloned());
                return Some(abs);
            }
        };
        abs.extend(rest.iter().cloned());
        Some(abs)
    }

    /// The file an absolute path leads to, through `pub use` facades.
    fn target(&self, tree: usize, abs: &[String], hops: usize) -> Option<usize> {
        let (len, &node) = (0..=abs.len())
            .rev()
            .find_map(|n| self.modules[tree].get(&abs[..n]).map(|id| (n, id)))?;
        let Some(item) = abs.get(len) else {
            return Some(node);
        };
        if hops < 8 {
            for re in self.nodes[node]
                .parsed
                .reexports
                .iter()
                .filter(|r| &r.name == item)
            {
                if let Some(mut to) = self.absolute(tree, &re.ctx, &re.path) {
                    to.extend(abs[len + 1..].iter().cloned());
                    if let Some(file) = self.target(tree, &to, hops + 1) {
                        return Some(file);
                    }
                }
            }
        }
        Some(node)
    }

    fn link(&mut self) {
        for (from, node) in self.nodes.iter().enumerate() {
            for r in &node.parsed.refs {
                let path: Vec<String> = r.path.iter().filter(|s| *s != "*").cloned().collect();
                let Some(abs) = self.absolute(node.tree, &r.ctx, &path) else {
                    continue;
                };
                let Some(to) = self.target(node.tree, &abs, 0) else {
                    continue;
                };
                if to != from {
                    self.edges
                        .entry(from)
                        .or_default()
                        .entry(to)
                        .or_insert_with(|| (r.line, r.path.join("::")));
                }
            }
        }
    }

    fn edge_count(&self) -> usize {
        self.edges.values().map(BTreeMap::len).sum()
    }

    fn succ(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        self.edges
            .get(&n)
            .into_iter()
            .flat_map(|m| m.keys().copied())
    }

    /// Strongly connected components of more than one file (Tarjan).
    fn tangles(&self) -> Vec<Vec<usize>> {
        struct St {
            index: Vec<Option<usize>>,
            low: Vec<usize>,
            on: Vec<bool>,
            stack: Vec<usize>,
            next: usize,
            out: Vec<Vec<usize>>,
        }
        fn visit(g: &Graph, v: usize, s: &mut St) {
            s.index[v] = Some(s.next);
            s.low[v] = s.next;
            s.next += 1;
            s.stack.push(v);
            s.on[v] = true;
            for w in g.succ(v) {
                match s.index[w] {
                    None => {
                        visit(g, w, s);
                        s.low[v] = s.low[v].min(s.low[w]);
                    }
                    Some(i) if s.on[w] => s.low[v] = s.low[v].min(i),
                    _ => {}
                }
            }
            if Some(s.low[v]) == s.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = s.stack.pop() {
                    s.on[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    s.out.push(comp);
                }
            }
        }
        let n = self.nodes.len();
        let mut s = St {
            index: vec![None; n],
            low: vec![0; n],
            on: vec![false; n],
            stack: Vec::new(),
            next: 0,
            out: Vec::new(),
        };
        for v in 0..n {
            if s.index[v].is_none() {
                visit(self, v, &mut s);
            }
        }
        s.out.sort();
        s.out
    }

    /// Every elementary cycle within each tangle (up to MAX_CYCLES), each
    /// starting at its smallest node.
    fn cycles(&self) -> Vec<Vec<usize>> {
        fn from(
            g: &Graph,
            start: usize,
            v: usize,
            comp: &BTreeSet<usize>,
            path: &mut Vec<usize>,
            out: &mut Vec<Vec<usize>>,
        ) {
            for w in g.succ(v) {
                if out.len() >= MAX_CYCLES {
                    return;
                }
                if w == start {
                    out.push(path.clone());
                } else if w > start && comp.contains(&w) && !path.contains(&w) {
                    path.push(w);
                    from(g, start, w, comp, path, out);
                    path.pop();
                }
            }
        }
        let mut out = Vec::new();
        for comp in self.tangles() {
            let set: BTreeSet<usize> = comp.iter().copied().collect();
            for &start in &comp {
                from(self, start, start, &set, &mut vec![start], &mut out);
            }
        }
        out
    }

    /// Empty when there is no cycle; else every cycle and its edges' origin.
    fn cycle_report(&self) -> String {
        let cycles = self.cycles();
        self.report(&cycles.iter().collect::<Vec<_>>())
    }

    /// `a.rs → b.rs → a.rs`.
    fn cycle_line(&self, c: &[usize]) -> String {
        let mut names: Vec<&str> = c.iter().map(|&n| self.nodes[n].label.as_str()).collect();
        names.push(&self.nodes[c[0]].label);
        names.join(" → ")
    }

    /// Empty for no cycles; else each cycle and where its edges come from.
    fn report(&self, cycles: &[&Vec<usize>]) -> String {
        if cycles.is_empty() {
            return String::new();
        }
        let mut s = String::new();
        let mut used = BTreeSet::new();
        for c in cycles {
            let _ = writeln!(s, "  {}", self.cycle_line(c));
            for (k, &a) in c.iter().enumerate() {
                used.insert((a, c[(k + 1) % c.len()]));
            }
        }
        if cycles.len() >= MAX_CYCLES {
            let _ = writeln!(s, "  … (listing stopped at {MAX_CYCLES})");
        }
        let _ = writeln!(s, "edges on those cycles (first reference):");
        for (a, b) in used {
            let (line, path) = &self.edges[&a][&b];
            let _ = writeln!(
                s,
                "  {}:{line} → {} ({path})",
                self.nodes[a].label, self.nodes[b].label
            );
        }
        s
    }
}

/// `members = ["crates/a", …]` from the workspace manifest.
fn workspace_members(manifest: &str) -> Vec<String> {
    let start = manifest.find("members").expect("workspace members");
    let list = &manifest[start..];
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

// ------------------------------------------------------ the checker itself

/// A tiny crate in a temporary directory, as (path under src, text).
fn graph_of(files: &[(&str, &str)]) -> Graph {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("Cargo.toml"),
        "[workspace]\nmembers = [\"c\"]\n",
    )
    .unwrap();
    for (path, text) in files {
        let p = dir.path().join("c/src").join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    Graph::of_workspace(dir.path())
}

#[test]
fn checker_sees_use_code_paths_parents_and_children() {
    let g = graph_of(&[
        ("lib.rs", "mod a; mod b; mod m; pub use a::Thing;"),
        // `use` with a nested tree, and a path in a string/comment (ignored).
        (
            "a.rs",
            "use crate::{b::{self, X as Y}};\n// crate::m::x\nconst S: &str = \"crate::m\";",
        ),
        // a path in code, through lib.rs's facade
        ("b.rs", "fn f() { let _ = crate::Thing::new(); }"),
        ("m/mod.rs", "mod child; fn g() { child::h() }"),
        ("m/child.rs", "use super::*; pub fn h() {}"),
    ]);
    let report = g.cycle_report();
    assert!(
        report.contains("c/src/a.rs → c/src/b.rs → c/src/a.rs"),
        "{report}"
    );
    assert!(
        report.contains("c/src/m/mod.rs → c/src/m/child.rs → c/src/m/mod.rs"),
        "{report}"
    );
    assert!(
        !report.contains("lib.rs"),
        "a pub use is a facade: {report}"
    );
}

#[test]
fn checker_passes_one_way_dependencies() {
    let g = graph_of(&[
        (
            "lib.rs",
            "mod a; mod b; mod m;\n macro_rules! x { () => { $crate::a::f() } }",
        ),
        (
            "a.rs",
            "pub fn f() {} #[cfg(test)] mod tests { use super::*; }",
        ),
        (
            "b.rs",
            "pub fn g() { crate::a::f(); let _ = 'a'; let _ = b\"crate::b\"; }",
        ),
        ("m/mod.rs", "mod child; pub use child::h; pub struct T;"),
        (
            "m/child.rs",
            "pub fn h(_: &super::T) { let _ = r#\"crate::m\"#; }",
        ),
    ]);
    assert_eq!(g.cycle_report(), "");
    // lib.rs → a.rs ($crate), b.rs → a.rs, child.rs → mod.rs; the facade
    // `pub use child::h` and the inline tests module are no edges.
    assert_eq!(g.edge_count(), 3, "{:?}", g.edges);
}
