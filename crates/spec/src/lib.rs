//! Stack files → [`types::Stack`].
//!
//! berth-spec owns reading stack files: Compose files (with interpolation,
//! `.env`, `env_file`, `extends`, `include`, profiles, several `-f` files
//! merged) and Heroku-style Procfiles. It reports every problem as a
//! [`Diagnostic`] pinned to file:line:column, with the service, the field
//! and a hint. It does no I/O besides reading the files it is pointed at
//! (and those they include, extend or name as env files); it never reads the
//! process environment or the clock, so the same inputs give the same stack.
//!
//! ```no_run
//! use berth_spec::{LoadOptions, load};
//! let opts = LoadOptions { working_dir: ".".into(), ..Default::default() };
//! match load(&opts) {
//!     Ok(loaded) => println!("{}", berth_spec::to_yaml(&loaded.stack)),
//!     Err(e) => eprintln!("{e}"),
//! }
//! ```
//!
//! Layout: [`yaml`] (positions-carrying YAML tree), [`interpolate`],
//! `envfile`, `units` (durations, sizes, signals), `schema` (the Compose key
//! vocabulary), `merge` (Compose merge rules), `loader` (files, include,
//! extends), `compose` (nodes → services), `validate` (cross-service
//! checks), `procfile`, `emit` (YAML output) and [`diagnostics`].
#![forbid(unsafe_code)]
// `Diagnostic` (the public error shape) is large, and is returned by value
// on error paths that end a parse: boxing it would buy nothing measurable.
#![allow(clippy::result_large_err)]

pub mod constraint;
pub mod diagnostics;
pub mod interpolate;
pub mod types;
pub mod units;
pub mod yaml;

mod compose;
mod emit;
mod envfile;
mod loader;
mod merge;
mod procfile;
mod schema;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use compose::parse_port_spec;
pub use diagnostics::{Diagnostic, LoadError};
pub use validate::{MAX_NAME_LEN, normalize_stack_name, valid_service_name, valid_stack_name};

use diagnostics::Diags;
use loader::{Loader, merge_top, normalize};
use yaml::{Node, Value};

/// What to load and with which environment.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `-f FILE`, in order: later files override earlier ones (Compose merge
    /// rules). Empty: find the stack file in `working_dir`.
    pub files: Vec<PathBuf>,
    /// Where to look for the stack file; relative `files` resolve here.
    pub working_dir: PathBuf,
    /// `-p NAME`.
    pub project_name: Option<String>,
    /// `--profile`; when empty, `COMPOSE_PROFILES` (comma-separated) from
    /// `env` or the `.env` file.
    pub profiles: Vec<String>,
    /// The caller's process environment: wins over `.env` for interpolation.
    pub env: BTreeMap<String, String>,
}

/// A successfully loaded stack.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The resolved stack.
    pub stack: types::Stack,
    /// Warnings (ignored keys, obsolete `version`, unset variables…).
    pub warnings: Vec<Diagnostic>,
    /// Every file read (stack files, includes, extends, env files).
    pub files: Vec<PathBuf>,
}

/// File names looked for, in order, when no `-f` is given.
pub const STACK_FILE_NAMES: &[&str] = &[
    "compose.yaml",
    "compose.yml",
    "docker-compose.yaml",
    "docker-compose.yml",
    "berth.yaml",
    "berth.yml",
    "Procfile",
];

/// The stack file in `dir`, by [`STACK_FILE_NAMES`] order.
pub fn find_stack_file(dir: &Path) -> Option<PathBuf> {
    STACK_FILE_NAMES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

fn is_procfile(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "Procfile" || n.starts_with("Procfile."))
}

fn absolute(opts: &LoadOptions, p: &Path) -> PathBuf {
    normalize(&opts.working_dir.join(p))
}

/// Loads the stack named by `opts` (reads the files).
pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let files: Vec<PathBuf> = if opts.files.is_empty() {
        match find_stack_file(&opts.working_dir) {
            Some(f) => vec![normalize(&f)],
            None => {
                return Err(LoadError {
                    errors: vec![
                        Diagnostic::file(&opts.working_dir, "no stack file found").hint(format!(
                            "create one of {} here, or pass -f FILE",
                            STACK_FILE_NAMES.join(", ")
                        )),
                    ],
                });
            }
        }
    } else {
        opts.files.iter().map(|f| absolute(opts, f)).collect()
    };
    run(opts, &files, HashMapOpt::None)
}

/// Loads a stack from `content` as if it were the file `file_name` (files
/// it includes or extends are still read from disk, relative to its folder).
pub fn load_str(file_name: &Path, content: &str, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let path = absolute(opts, file_name);
    run(
        opts,
        std::slice::from_ref(&path),
        HashMapOpt::Some(path.clone(), content.to_string()),
    )
}

enum HashMapOpt {
    None,
    Some(PathBuf, String),
}

fn run(opts: &LoadOptions, files: &[PathBuf], mem: HashMapOpt) -> Result<Loaded, LoadError> {
    let mut loader = Loader::new(opts);
    if let HashMapOpt::Some(p, c) = mem {
        loader.in_memory.insert(p, c);
    }
    let first = files.first().cloned().unwrap_or_default();
    let project_dir = first.parent().map(Path::to_path_buf).unwrap_or_default();
    let result = if files.len() > 1
        && let Some(p) = files.iter().find(|f| is_procfile(f))
    {
        // Compose merge rules mean nothing for a Procfile: refuse rather
        // than ignore the other files.
        loader.diags.error(
            Diagnostic::file(p, "a Procfile cannot be combined with other stack files").hint(
                "pass the Procfile alone (`-f Procfile`), or describe the stack in a compose.yaml",
            ),
        );
        None
    } else if is_procfile(&first) {
        load_procfile(&mut loader, &first, &project_dir)
    } else {
        load_compose(&mut loader, files, &project_dir)
    };
    let Loader {
        diags, files: read, ..
    } = loader;
    match result {
        Some(stack) if !diags.has_errors() => Ok(Loaded {
            stack,
            warnings: diags.warnings,
            files: read,
        }),
        _ => {
            let mut errors = diags.errors;
            if errors.is_empty() {
                errors.push(Diagnostic::file(&first, "the stack could not be loaded"));
            }
            Err(LoadError { errors })
        }
    }
}

fn stack_name(
    loader: &mut Loader<'_>,
    vars: &BTreeMap<String, String>,
    top_name: Option<&Node>,
    project_dir: &Path,
    file: &Path,
) -> Option<String> {
    let opts = loader.opts;
    let explicit: Option<(String, Option<&Node>, &str)> = if let Some(p) = &opts.project_name {
        Some((p.clone(), None, "-p"))
    } else if let Some(p) = vars.get("COMPOSE_PROJECT_NAME").filter(|s| !s.is_empty()) {
        Some((p.clone(), None, "COMPOSE_PROJECT_NAME"))
    } else {
        top_name.and_then(|n| n.as_str().map(|s| (s.to_string(), Some(n), "name")))
    };
    if let Some((name, node, origin)) = explicit {
        if valid_stack_name(&name) {
            return Some(name);
        }
        let msg = format!("invalid stack name `{name}` (from {origin})");
        let d = match node {
            Some(n) => Diagnostic::at(&n.pos, msg).field("name"),
            None => Diagnostic::file(file, msg),
        };
        loader.diags.error(d.hint(format!(
            "use at most 63 lowercase letters, digits, `_` and `-`, starting with a letter or digit (e.g. `{}`)",
            normalize_stack_name(&name)
        )));
        return None;
    }
    let folder = project_dir
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let name = normalize_stack_name(folder);
    if name.is_empty() {
        loader.diags.error(
            Diagnostic::file(
                file,
                format!("cannot derive a stack name from the folder `{folder}`"),
            )
            .hint("set `name:` at the top of the stack file, or pass -p NAME"),
        );
        return None;
    }
    Some(name)
}

fn load_procfile(loader: &mut Loader<'_>, file: &Path, project_dir: &Path) -> Option<types::Stack> {
    let text = loader.read(file, None, "Procfile")?;
    let vars = loader.project_vars(project_dir, &[]);
    let services = procfile::parse(file, &text, project_dir, &mut loader.diags);
    let name = stack_name(loader, &vars, None, project_dir, file)?;
    Some(types::Stack {
        name,
        project_dir: project_dir.to_path_buf(),
        source: types::SourceKind::Procfile,
        services,
        volumes: BTreeMap::new(),
        networks: BTreeMap::new(),
        extensions: BTreeMap::new(),
    })
}

fn load_compose(
    loader: &mut Loader<'_>,
    files: &[PathBuf],
    project_dir: &Path,
) -> Option<types::Stack> {
    let vars = loader.project_vars(project_dir, &[]);
    let mut model: Option<Node> = None;
    for (i, f) in files.iter().enumerate() {
        // Relative paths in override files resolve against the project
        // directory (the first file's folder), as in Compose.
        let base = if i == 0 {
            f.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            project_dir.to_path_buf()
        };
        let Some(m) = loader.load_model(f, &base, &vars, &mut Vec::new(), None) else {
            continue;
        };
        model = Some(match model {
            None => m,
            Some(prev) => merge_top(&prev, &m),
        });
    }
    let model = model?;
    let first = files.first().cloned().unwrap_or_default();
    schema::check_keys(
        &model,
        "",
        None,
        schema::TOP,
        schema::TOP_SUPPORTED,
        &mut loader.diags,
    );

    let mut stack = types::Stack {
        name: String::new(),
        project_dir: project_dir.to_path_buf(),
        source: types::SourceKind::Compose,
        services: BTreeMap::new(),
        volumes: BTreeMap::new(),
        networks: BTreeMap::new(),
        extensions: BTreeMap::new(),
    };
    let top_name = model.get("name").cloned();
    if let Some(n) = &top_name
        && n.as_str().is_none()
    {
        loader.diags.error(
            Diagnostic::at(&n.pos, format!("expected a string, found {}", n.kind())).field("name"),
        );
    }
    let name = stack_name(loader, &vars, top_name.as_ref(), project_dir, &first);

    for (k, v) in model.as_map().unwrap_or_default() {
        let key = k.as_str().unwrap_or_default();
        if key.starts_with("x-") {
            stack.extensions.insert(key.to_string(), v.to_json());
        }
    }
    if let Some(vols) = model.get("volumes") {
        top_volumes(loader, vols, &mut stack);
    }
    if let Some(nets) = model.get("networks") {
        match &nets.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    stack
                        .networks
                        .insert(k.as_str().unwrap_or_default().to_string(), v.to_json());
                }
            }
            Value::Null => {}
            _ => loader.diags.error(
                Diagnostic::at(
                    &nets.pos,
                    format!("expected a mapping, found {}", nets.kind()),
                )
                .field("networks"),
            ),
        }
    }

    let mut converted: BTreeMap<String, (types::Service, compose::ServiceMeta)> = BTreeMap::new();
    match model.get("services") {
        Some(svcs) => match &svcs.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    let sname = k.as_str().unwrap_or_default().to_string();
                    let mut v = v.clone();
                    merge::strip_resets(&mut v);
                    let v = &v;
                    let mut conv = compose::Conv {
                        loader,
                        service: sname.clone(),
                        vars: &vars,
                    };
                    let (svc, meta) = compose::service(&mut conv, k, v, project_dir);
                    converted.insert(sname, (svc, meta));
                }
            }
            Value::Null => {}
            _ => loader.diags.error(
                Diagnostic::at(
                    &svcs.pos,
                    format!("expected a mapping of services, found {}", svcs.kind()),
                )
                .field("services")
                .hint("write each service as `name:` with its fields indented below"),
            ),
        },
        None => {
            if model.as_map().is_some_and(<[_]>::is_empty) || model.get("include").is_none() {
                loader.diags.warn(
                    Diagnostic::at(&model.pos, "no services defined")
                        .hint("add a `services:` mapping"),
                );
            }
        }
    }

    validate::check_names(&converted, &mut loader.diags);
    let all: BTreeSet<String> = converted.keys().cloned().collect();
    let enabled: Vec<String> = if loader.opts.profiles.is_empty() {
        vars.get("COMPOSE_PROFILES")
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        loader.opts.profiles.clone()
    };
    let mut active: BTreeMap<String, (types::Service, compose::ServiceMeta)> = converted
        .into_iter()
        .filter(|(_, (s, _))| validate::profile_enabled(&s.profiles, &enabled))
        .collect();
    let vol_names: BTreeSet<String> = stack.volumes.keys().cloned().collect();
    let net_names: BTreeSet<String> = stack.networks.keys().cloned().collect();
    validate::check_references(&mut active, &all, &vol_names, &net_names, &mut loader.diags);
    validate::check_cycles(&active, &mut loader.diags);
    stack.services = active.into_iter().map(|(k, (s, _))| (k, s)).collect();
    stack.name = name?;
    Some(stack)
}

fn top_volumes(loader: &mut Loader<'_>, vols: &Node, stack: &mut types::Stack) {
    let Some(entries) = vols.as_map() else {
        if !vols.is_null() {
            loader.diags.error(
                Diagnostic::at(
                    &vols.pos,
                    format!("expected a mapping, found {}", vols.kind()),
                )
                .field("volumes"),
            );
        }
        return;
    };
    let mut diags = Diags::default();
    for (k, v) in entries {
        let name = k.as_str().unwrap_or_default().to_string();
        let field = format!("volumes.{name}");
        let mut vol = types::Volume::default();
        match &v.value {
            Value::Null => {}
            Value::Map(_) => {
                schema::check_keys(
                    v,
                    &field,
                    None,
                    schema::VOLUME,
                    schema::VOLUME_SUPPORTED,
                    &mut diags,
                );
                if let Some(e) = v.get("external") {
                    match e.as_str() {
                        Some("true") => vol.external = true,
                        Some("false") => {}
                        _ => diags.error(
                            Diagnostic::at(
                                &e.pos,
                                format!("expected a boolean, found {}", e.kind()),
                            )
                            .field(format!("{field}.external")),
                        ),
                    }
                }
                if let Some(n) = v.get("name") {
                    vol.name = n.as_str().map(str::to_string);
                }
            }
            _ => diags.error(
                Diagnostic::at(&v.pos, format!("expected a mapping, found {}", v.kind()))
                    .field(field),
            ),
        }
        stack.volumes.insert(name, vol);
    }
    loader.diags.errors.extend(diags.errors);
    loader.diags.warnings.extend(diags.warnings);
}

/// Renders a resolved stack as YAML (for `berth config`). The output reads
/// back (as YAML → JSON → `Stack`) to the same stack.
pub fn to_yaml(stack: &types::Stack) -> String {
    match serde_json::to_value(stack) {
        Ok(v) => emit::to_yaml(&v),
        // Serialising plain data cannot fail short of a non-finite float,
        // which the loader never produces; say so rather than panic.
        Err(e) => format!("# cannot render the stack: {e}\n"),
    }
}

/// Parses YAML text into JSON (the inverse of [`to_yaml`] for tests and
/// tools): anchors and merge keys applied, plain scalars typed as YAML does.
pub fn yaml_to_json(file: &Path, text: &str) -> Result<serde_json::Value, Diagnostic> {
    let dir = file.parent().unwrap_or(Path::new("/"));
    Ok(yaml::parse(file, dir, text)?.map_or(serde_json::Value::Null, |n| n.to_json()))
}
