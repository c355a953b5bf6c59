//! Reading Compose files into one merged YAML model: the only place that
//! touches the filesystem. Per file: parse, interpolate, resolve `include`
//! and `extends`; then the `-f` files are merged in order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use crate::LoadOptions;
use crate::diagnostics::{Diagnostic, Diags};
use crate::envfile;
use crate::interpolate::{InterpError, interpolate};
use crate::merge::{merge_maps, merge_value, strip_resets};
use crate::schema;
use crate::yaml::{self, Node, Value};

/// Variables for interpolation: the caller's environment over the `.env`.
pub type Vars = BTreeMap<String, String>;

/// Lexically normalises `path` (no filesystem access): drops `.`, folds `..`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `rel` resolved against `base`, normalised.
pub fn resolve(base: &Path, rel: &str) -> PathBuf {
    normalize(&base.join(rel))
}

/// True for references Compose would fetch from elsewhere (git, http, oci,
/// or any other `scheme:` prefix longer than a Windows drive letter).
pub fn is_remote(s: &str) -> bool {
    if s.contains("://") || s.starts_with("git@") {
        return true;
    }
    match s.split_once(':') {
        Some((scheme, _)) => {
            scheme.len() > 1
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// The service named by a dotted field path `services.NAME.…`.
pub fn service_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("services.")?;
    Some(rest.split('.').next().unwrap_or(rest).to_string())
}

/// The loader's state across the files of one load.
pub struct Loader<'a> {
    pub opts: &'a LoadOptions,
    pub diags: Diags,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
    /// Content given in memory (`load_str`), by path.
    pub in_memory: HashMap<PathBuf, String>,
    /// Parsed-and-interpolated files used as `extends` sources.
    extends_cache: HashMap<PathBuf, Option<Node>>,
    /// `extends` cycles already reported (by their members).
    extends_cycles: std::collections::BTreeSet<Vec<String>>,
}

impl<'a> Loader<'a> {
    pub fn new(opts: &'a LoadOptions) -> Self {
        Loader {
            opts,
            diags: Diags::default(),
            files: Vec::new(),
            in_memory: HashMap::new(),
            extends_cache: HashMap::new(),
            extends_cycles: std::collections::BTreeSet::new(),
        }
    }

    /// Reads a file; `at` is where it was referenced from, for the error.
    pub fn read(&mut self, path: &Path, at: Option<&Node>, what: &str) -> Option<String> {
        if let Some(s) = self.in_memory.get(path) {
            return Some(s.clone());
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                if !self.files.iter().any(|f| f == path) {
                    self.files.push(path.to_path_buf());
                }
                match String::from_utf8(bytes) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        self.diags.error(Diagnostic::file(
                            path,
                            format!("{what} is not valid UTF-8 text"),
                        ));
                        None
                    }
                }
            }
            Err(e) => {
                let msg = format!("cannot read {what} `{}`: {e}", path.display());
                let d = match at {
                    Some(n) => Diagnostic::at(&n.pos, msg),
                    None => Diagnostic::file(path, msg),
                };
                let d = match e.kind() {
                    std::io::ErrorKind::NotFound => d.hint(
                        "fix the path: a relative one is relative to the folder of the file \
                         that names it",
                    ),
                    std::io::ErrorKind::PermissionDenied => {
                        d.hint("make the file readable by the user running berth")
                    }
                    _ => d,
                };
                self.diags.error(d);
                None
            }
        }
    }

    /// Variables for a project in `dir`: the caller's environment over the
    /// given env files (default: `dir/.env` when it exists).
    pub fn project_vars(&mut self, dir: &Path, env_files: &[(PathBuf, Option<Node>)]) -> Vars {
        let mut vars = Vars::new();
        let default_env = [(dir.join(".env"), None)];
        let (files, optional) = if env_files.is_empty() {
            (&default_env[..], true)
        } else {
            (env_files, false)
        };
        for (path, at) in files {
            if optional && !self.in_memory.contains_key(path) && !path.is_file() {
                continue;
            }
            let Some(text) = self.read(path, at.as_ref(), "env file") else {
                continue;
            };
            match envfile::parse(path, &text) {
                Ok(entries) => {
                    // Earlier env files count as the environment for later
                    // ones; the caller's environment wins over them all.
                    let env = &self.opts.env;
                    let lookup = |name: &str| env.get(name).or_else(|| vars.get(name)).cloned();
                    let resolved = envfile::resolve(path, entries, &lookup, None, &mut self.diags);
                    for (k, v) in resolved {
                        if let Some(v) = v {
                            vars.insert(k, v);
                        }
                    }
                }
                Err(d) => self.diags.error(d),
            }
        }
        for (k, v) in &self.opts.env {
            vars.insert(k.clone(), v.clone());
        }
        vars
    }

    /// Reads, parses and interpolates one file; `None` after reporting why.
    pub fn parse_file(
        &mut self,
        path: &Path,
        base: &Path,
        vars: &Vars,
        at: Option<&Node>,
    ) -> Option<Node> {
        let text = self.read(path, at, "stack file")?;
        let root = match yaml::parse(path, base, &text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                self.diags.error(
                    Diagnostic::file(path, "the file is empty")
                        .hint("a Compose file needs at least a `services:` mapping"),
                );
                return None;
            }
            Err(d) => {
                self.diags.error(d);
                return None;
            }
        };
        if root.as_map().is_none() {
            self.diags.error(
                Diagnostic::at(
                    &root.pos,
                    format!(
                        "expected a mapping at the top of the file, found {}",
                        root.kind()
                    ),
                )
                .hint("a Compose file starts with keys such as `services:`"),
            );
            return None;
        }
        let mut root = root;
        interpolate_tree(&mut root, "", vars, &mut self.diags);
        Some(root)
    }

    /// Loads one Compose file as a model: includes and extends resolved,
    /// `version` dropped (with a warning).
    pub fn load_model(
        &mut self,
        path: &Path,
        base: &Path,
        vars: &Vars,
        include_stack: &mut Vec<PathBuf>,
        at: Option<&Node>,
    ) -> Option<Node> {
        let mut root = self.parse_file(path, base, vars, at)?;
        if let Some(k) = root.key_node("version") {
            self.diags.warn(
                Diagnostic::at(&k.pos, "`version` is obsolete and ignored")
                    .field("version")
                    .hint("remove it; the Compose Specification needs no version"),
            );
        }
        if let Value::Map(entries) = &mut root.value {
            entries.retain(|(k, _)| k.as_str() != Some("version"));
        }
        // Extends are resolved within the file, before includes are merged,
        // so a service extends only what its own file can see.
        self.resolve_all_extends(&mut root, path, vars);
        if let Some(inc) = root.get("include").cloned() {
            include_stack.push(path.to_path_buf());
            self.apply_includes(&mut root, &inc, include_stack);
            include_stack.pop();
            if let Value::Map(entries) = &mut root.value {
                entries.retain(|(k, _)| k.as_str() != Some("include"));
            }
        }
        Some(root)
    }

    fn resolve_all_extends(&mut self, root: &mut Node, path: &Path, vars: &Vars) {
        let Some(services) = root.get("services").cloned() else {
            return;
        };
        let Some(entries) = services.as_map() else {
            return;
        };
        let mut resolved = Vec::new();
        for (k, _) in entries {
            let name = k.as_str().unwrap_or_default();
            let mut stack = vec![(path.to_path_buf(), name.to_string())];
            let svc = self
                .resolve_extends(&services, name, path, vars, &mut stack)
                .unwrap_or_else(|| Node::new(k.pos.clone(), Value::Map(Vec::new())));
            resolved.push((k.clone(), svc));
        }
        if let Value::Map(top) = &mut root.value {
            for (k, v) in top.iter_mut() {
                if k.as_str() == Some("services") {
                    v.value = Value::Map(std::mem::take(&mut resolved));
                }
            }
        }
    }

    /// Service `name` of `services` (from file `path`) with its `extends`
    /// chain applied.
    fn resolve_extends(
        &mut self,
        services: &Node,
        name: &str,
        path: &Path,
        vars: &Vars,
        stack: &mut Vec<(PathBuf, String)>,
    ) -> Option<Node> {
        let svc = services.get(name)?.clone();
        let mut svc = match svc.value {
            Value::Null => Node::new(svc.pos, Value::Map(Vec::new())),
            _ => svc,
        };
        // `!reset` entries are kept until the last merge (a later -f file
        // may reset what an earlier one set) and dropped before conversion.
        let Some(ext) = svc.get("extends").cloned() else {
            return Some(svc);
        };
        let field = format!("services.{name}.extends");
        let (base_name, file) = match &ext.value {
            Value::Scalar { text, .. } => (text.clone(), None),
            Value::Map(_) => {
                schema::check_keys(
                    &ext,
                    &field,
                    Some(name),
                    schema::EXTENDS,
                    schema::EXTENDS,
                    &mut self.diags,
                );
                let Some(s) = ext.get("service").and_then(Node::as_str) else {
                    self.diags.error(
                        Diagnostic::at(&ext.pos, "`extends` needs a `service`")
                            .service(name)
                            .field(&field)
                            .hint("write `extends: { service: base }` or `extends: { file: other.yaml, service: base }`"),
                    );
                    return None;
                };
                let file = ext
                    .get("file")
                    .map(|f| (f.as_str().map(str::to_string), f.clone()));
                (s.to_string(), file)
            }
            _ => {
                self.diags.error(
                    Diagnostic::at(
                        &ext.pos,
                        format!(
                            "`extends` must be a service name or a mapping, found {}",
                            ext.kind()
                        ),
                    )
                    .service(name)
                    .field(&field),
                );
                return None;
            }
        };
        let (base_path, base_services) = match file {
            None => (path.to_path_buf(), services.clone()),
            Some((None, at)) => {
                self.diags.error(
                    Diagnostic::at(
                        &at.pos,
                        format!("`extends.file` must be a path, found {}", at.kind()),
                    )
                    .service(name)
                    .field(format!("{field}.file")),
                );
                return None;
            }
            Some((Some(f), at)) => {
                if is_remote(&f) {
                    self.diags.error(
                        Diagnostic::at(&at.pos, format!("remote extends are not supported: `{f}`"))
                            .service(name)
                            .field(format!("{field}.file"))
                            .hint("download the file and refer to it by a local path"),
                    );
                    return None;
                }
                let p = resolve(&at.pos.base, &f);
                if !self.in_memory.contains_key(&p) && !p.exists() {
                    self.diags.error(
                        Diagnostic::at(&at.pos, format!("`{}` does not exist", p.display()))
                            .service(name)
                            .field(format!("{field}.file"))
                            .hint(
                                "fix the path: a relative one is relative to the folder of \
                                 the file that names it",
                            ),
                    );
                    return None;
                }
                let loaded = match self.extends_cache.get(&p) {
                    Some(n) => n.clone(),
                    None => {
                        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
                        let n = self.parse_file(&p, &dir, vars, Some(&at));
                        self.extends_cache.insert(p.clone(), n.clone());
                        n
                    }
                };
                let svcs = loaded?.get("services").cloned()?;
                (p, svcs)
            }
        };
        if let Some(i) = stack
            .iter()
            .position(|(p, s)| *p == base_path && *s == base_name)
        {
            let mut chain: Vec<String> = stack[i..].iter().map(|(_, s)| s.clone()).collect();
            let mut members = chain.clone();
            members.sort();
            if !self.extends_cycles.insert(members) {
                return None;
            }
            chain.push(base_name.clone());
            self.diags.error(
                Diagnostic::at(&ext.pos, format!("`extends` cycle: {}", chain.join(" → ")))
                    .service(name)
                    .field(&field)
                    .hint("a service cannot extend itself, directly or through others"),
            );
            return None;
        }
        if base_services.get(&base_name).is_none() {
            let known: Vec<&str> = base_services
                .as_map()
                .unwrap_or_default()
                .iter()
                .filter_map(|(k, _)| k.as_str())
                .collect();
            let mut d = Diagnostic::at(
                &ext.pos,
                format!(
                    "`extends` refers to unknown service `{base_name}` in `{}`",
                    base_path.display()
                ),
            )
            .service(name)
            .field(&field);
            if let Some(s) = schema::did_you_mean(&base_name, &known) {
                d = d.hint(format!("did you mean `{s}`?"));
            }
            self.diags.error(d);
            return None;
        }
        stack.push((base_path.clone(), base_name.clone()));
        let base = self.resolve_extends(&base_services, &base_name, &base_path, vars, stack);
        stack.pop();
        let base = base?;
        if let Value::Map(entries) = &mut svc.value {
            entries.retain(|(k, _)| k.as_str() != Some("extends"));
        }
        let mut merged = merge_maps(&base, &svc);
        merged.pos = svc.pos.clone();
        strip_resets(&mut merged);
        Some(merged)
    }

    fn apply_includes(&mut self, root: &mut Node, inc: &Node, include_stack: &mut Vec<PathBuf>) {
        let entries: Vec<Node> = match &inc.value {
            Value::Seq(items) => items.clone(),
            Value::Null => Vec::new(),
            _ => {
                self.diags.error(
                    Diagnostic::at(
                        &inc.pos,
                        format!("`include` must be a list, found {}", inc.kind()),
                    )
                    .field("include")
                    .hint("write `include: [other/compose.yaml]`"),
                );
                return;
            }
        };
        for entry in entries {
            self.apply_include(root, &entry, include_stack);
        }
    }

    fn apply_include(&mut self, root: &mut Node, entry: &Node, include_stack: &mut Vec<PathBuf>) {
        let base = entry.pos.base.to_path_buf();
        let mut paths: Vec<Node> = Vec::new();
        let mut project_dir: Option<PathBuf> = None;
        let mut env_files: Vec<(PathBuf, Option<Node>)> = Vec::new();
        match &entry.value {
            Value::Scalar { .. } => paths.push(entry.clone()),
            Value::Map(_) => {
                schema::check_keys(
                    entry,
                    "include",
                    None,
                    schema::INCLUDE,
                    schema::INCLUDE,
                    &mut self.diags,
                );
                match entry.get("path") {
                    Some(p) => paths = string_or_list(p, "include.path", &mut self.diags),
                    None => {
                        self.diags.error(
                            Diagnostic::at(&entry.pos, "an `include` entry needs a `path`")
                                .field("include"),
                        );
                        return;
                    }
                }
                if let Some(pd) = entry.get("project_directory") {
                    match pd.as_str() {
                        Some(s) => project_dir = Some(resolve(&base, s)),
                        None => self.diags.error(
                            Diagnostic::at(
                                &pd.pos,
                                format!("expected a path, found {}", pd.kind()),
                            )
                            .field("include.project_directory"),
                        ),
                    }
                }
                if let Some(ef) = entry.get("env_file") {
                    for n in string_or_list(ef, "include.env_file", &mut self.diags) {
                        if let Some(s) = n.as_str() {
                            env_files.push((resolve(&base, s), Some(n.clone())));
                        }
                    }
                }
            }
            _ => {
                self.diags.error(
                    Diagnostic::at(
                        &entry.pos,
                        format!(
                            "an `include` entry must be a path or a mapping, found {}",
                            entry.kind()
                        ),
                    )
                    .field("include"),
                );
                return;
            }
        }
        let mut model: Option<Node> = None;
        for p in &paths {
            let Some(s) = p.as_str() else { continue };
            if is_remote(s) {
                self.diags.error(
                    Diagnostic::at(&p.pos, format!("remote includes are not supported: `{s}`"))
                        .field("include")
                        .hint("download the file and include it by a local path"),
                );
                continue;
            }
            let file = resolve(&base, s);
            if let Some(i) = include_stack.iter().position(|f| *f == file) {
                let mut chain: Vec<String> = include_stack[i..]
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect();
                chain.push(file.display().to_string());
                self.diags.error(
                    Diagnostic::at(&p.pos, format!("include cycle: {}", chain.join(" → ")))
                        .field("include")
                        .hint("a file cannot include itself, directly or through others"),
                );
                continue;
            }
            let file_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
            let pdir = project_dir.clone().unwrap_or(file_dir);
            let vars = self.project_vars(&pdir, &env_files);
            let Some(m) = self.load_model(&file, &pdir, &vars, include_stack, Some(p)) else {
                continue;
            };
            model = Some(match model {
                None => m,
                Some(prev) => merge_top(&prev, &m),
            });
        }
        let Some(model) = model else { return };
        // Included services must not collide with the includer's.
        let mut out = root.clone();
        if let Value::Map(top) = &mut out.value {
            for (ik, iv) in model.as_map().unwrap_or_default() {
                let key = ik.as_str().unwrap_or_default();
                match top.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
                    None => top.push((ik.clone(), iv.clone())),
                    Some((_, existing)) if key == "services" => {
                        let mut mine = existing.as_map().map(<[_]>::to_vec).unwrap_or_default();
                        for (sk, sv) in iv.as_map().unwrap_or_default() {
                            let sname = sk.as_str().unwrap_or_default();
                            if let Some((mk, _)) =
                                mine.iter().find(|(k, _)| k.as_str() == Some(sname))
                            {
                                self.diags.error(
                                    Diagnostic::at(&mk.pos, format!(
                                        "service `{sname}` is also defined by the included file `{}` (line {})",
                                        sk.pos.file.display(), sk.pos.line
                                    ))
                                    .service(sname)
                                    .hint("rename one of them, or extend the included service with `extends` instead"),
                                );
                            } else {
                                mine.push((sk.clone(), sv.clone()));
                            }
                        }
                        existing.value = Value::Map(mine);
                    }
                    Some((_, existing)) => {
                        if existing.as_map().is_some() && iv.as_map().is_some() {
                            let merged = merge_maps(iv, existing);
                            *existing = merged;
                        }
                    }
                }
            }
        }
        *root = out;
    }
}

/// Merges two whole models (`-f a.yaml -f b.yaml`): services merge per
/// service with Compose rules, other top-level mappings key by key, and
/// scalars (`name`) are replaced.
pub fn merge_top(base: &Node, over: &Node) -> Node {
    let mut entries: Vec<(Node, Node)> = base.as_map().map(<[_]>::to_vec).unwrap_or_default();
    for (k, v) in over.as_map().unwrap_or_default() {
        let key = k.as_str().unwrap_or_default();
        match entries.iter_mut().find(|(k2, _)| k2.as_str() == Some(key)) {
            None => entries.push((k.clone(), v.clone())),
            Some((_, existing)) if key == "services" => {
                let mut svcs = existing.as_map().map(<[_]>::to_vec).unwrap_or_default();
                for (sk, sv) in v.as_map().unwrap_or_default() {
                    let sname = sk.as_str().unwrap_or_default();
                    match svcs.iter_mut().find(|(k2, _)| k2.as_str() == Some(sname)) {
                        None => svcs.push((sk.clone(), sv.clone())),
                        Some((_, e)) => {
                            let mut m = merge_maps(e, sv);
                            strip_resets(&mut m);
                            *e = m;
                        }
                    }
                }
                existing.value = Value::Map(svcs);
            }
            Some((_, existing)) => {
                *existing = merge_value(key, existing, v);
            }
        }
    }
    Node {
        pos: base.pos.clone(),
        tag: None,
        value: Value::Map(entries),
    }
}

/// A string or a list of strings, as nodes.
pub fn string_or_list(node: &Node, field: &str, diags: &mut Diags) -> Vec<Node> {
    match &node.value {
        Value::Scalar { .. } => vec![node.clone()],
        Value::Seq(items) => {
            let mut out = Vec::new();
            for it in items {
                if it.as_str().is_some() {
                    out.push(it.clone());
                } else {
                    diags.error(
                        Diagnostic::at(&it.pos, format!("expected a string, found {}", it.kind()))
                            .field(field),
                    );
                }
            }
            out
        }
        _ => {
            diags.error(
                Diagnostic::at(
                    &node.pos,
                    format!(
                        "expected a string or a list of strings, found {}",
                        node.kind()
                    ),
                )
                .field(field),
            );
            Vec::new()
        }
    }
}

/// Interpolates every scalar value (not keys) in place.
pub fn interpolate_tree(node: &mut Node, path: &str, vars: &Vars, diags: &mut Diags) {
    interpolate_node(node, path, vars, diags, None);
}

/// Whether berth itself sets `var` when it starts an instance (`PORT`,
/// `BERTH_*`, or the service's `x-berth.port_env`): such a variable is unset
/// when the file is read and meant to be expanded by the process's shell.
fn set_at_run_time(var: &str, port_env: Option<&str>) -> bool {
    var == "PORT" || var.starts_with("BERTH_") || port_env == Some(var)
}

fn interpolate_node(
    node: &mut Node,
    path: &str,
    vars: &Vars,
    diags: &mut Diags,
    port_env: Option<&str>,
) {
    match &mut node.value {
        Value::Scalar { text, .. } => {
            let lookup = |name: &str| vars.get(name).cloned();
            let mut unset = Vec::new();
            match interpolate(text, &lookup, &mut unset) {
                Ok(s) => *text = s,
                Err(e) => {
                    let mut d = Diagnostic::at(&node.pos, e.to_string()).field(path);
                    if let Some(s) = service_of(path) {
                        d = d.service(s);
                    }
                    d.hint = Some(match e {
                        InterpError::Required { var, .. } => {
                            format!(
                                "set `{var}` in the environment or in the `.env` file next to the stack file"
                            )
                        }
                        InterpError::Invalid { .. } => "write `$$` for a literal `$`".into(),
                    });
                    diags.error(d);
                }
            }
            for var in unset {
                let mut d = Diagnostic::at(
                    &node.pos,
                    format!("variable `{var}` is not set; using an empty string"),
                )
                .field(path)
                .hint(if set_at_run_time(&var, port_env) {
                    format!(
                        "berth sets `{var}` when it starts the process: write `$${var}` so the \
                         variable is expanded when the process starts, not when the file is read"
                    )
                } else {
                    format!("set `{var}`, or give a default with `${{{var}:-default}}`")
                });
                if let Some(s) = service_of(path) {
                    d = d.service(s);
                }
                diags.warn(d);
            }
        }
        Value::Seq(items) => {
            for it in items {
                interpolate_node(it, path, vars, diags, port_env);
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries {
                let key = k.as_str().unwrap_or_default();
                let p = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                // Entering a service: note its port variable's name first.
                let own_port_env: Option<String> = if path == "services" {
                    v.get("x-berth")
                        .and_then(|b| b.get("port_env"))
                        .and_then(|n| n.as_str())
                        .map(str::to_owned)
                } else {
                    None
                };
                let port_env = own_port_env.as_deref().or(port_env);
                interpolate_node(v, &p, vars, diags, port_env);
            }
        }
        Value::Null => {}
    }
}
