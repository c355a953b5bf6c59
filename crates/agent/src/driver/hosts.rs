//! Service names as host names for process instances: `http://api:8000`
//! in a Compose file works for plain processes as it does for containers.
//!
//! Each process instance whose environment carries `BERTH_HOSTS` (the
//! controller puts the stack's service names and their stable addresses
//! there) starts in its own mount namespace, where a per-stack hosts file is
//! bind-mounted over `/etc/hosts`: the host's own entries, then every
//! service of the stack as `name` and `name.stack`. The host's `/etc/hosts`
//! is never written, and nothing outside the instance sees the mount.
//!
//! The file lives in the agent's data dir (`hosts/<ns>/<stack>`) and is
//! rewritten in place (same inode) when the stack gains a service, so
//! instances already running see the new name without a restart.
//!
//! This needs `CAP_SYS_ADMIN` (berth running as root). Otherwise, or when
//! the kernel refuses the namespace, instances start without it and rely on
//! the `<NAME>_HOST`/`_URL` variables alone; the agent says why once.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::process::Command;

use super::LaunchSpec;
use super::command::{HOSTS_VAR, parse_hosts};

/// The system hosts file the namespace mount covers.
const SYSTEM_HOSTS: &str = "/etc/hosts";

/// Per-stack hosts files and whether mount namespaces can be used.
#[derive(Debug)]
pub struct HostsFiles {
    dir: PathBuf,
    /// `Some(reason)` once name injection is known not to work here.
    disabled: Mutex<Option<String>>,
    /// Serialises rewrites of the files.
    write: Mutex<()>,
}

/// What [`HostsFiles::prepare`] hands to [`enter_before_exec`]: the paths,
/// as C strings built before the fork (the child may not allocate).
#[derive(Debug, Clone)]
pub struct HostsMount {
    source: CString,
    target: CString,
}

impl HostsFiles {
    /// Hosts files under `dir`. Disabled from the start when not root.
    pub fn new(dir: PathBuf) -> Self {
        let disabled = (!nix::unistd::geteuid().is_root()).then(|| {
            "berth is not running as root (a mount namespace needs CAP_SYS_ADMIN)".to_owned()
        });
        if let Some(why) = &disabled {
            tracing::info!(
                "service names are not host names for processes: {why}; processes find services through their <NAME>_HOST/_URL variables"
            );
        }
        Self {
            dir,
            disabled: Mutex::new(disabled),
            write: Mutex::new(()),
        }
    }

    /// Whether name injection is off, and why.
    pub fn disabled(&self) -> Option<String> {
        self.disabled.lock().ok().and_then(|d| d.clone())
    }

    /// Turn name injection off for good (the kernel refused it), saying why
    /// once.
    pub fn disable(&self, why: String) {
        if let Ok(mut d) = self.disabled.lock()
            && d.is_none()
        {
            tracing::warn!(
                "service names are not host names for processes: {why}; processes find services through their <NAME>_HOST/_URL variables"
            );
            *d = Some(why);
        }
    }

    /// Write (if changed) the hosts file of `spec`'s stack and return the
    /// mount to make, or `None` when the instance has no names to map or
    /// injection is off. A file that cannot be written is logged and the
    /// instance starts without names rather than not at all.
    pub fn prepare(&self, spec: &LaunchSpec) -> Option<HostsMount> {
        let hosts = spec.env.get(HOSTS_VAR)?;
        if self.disabled().is_some() {
            return None;
        }
        let path = self.dir.join(&spec.key.namespace).join(&spec.key.stack);
        let system = fs::read_to_string(SYSTEM_HOSTS).unwrap_or_default();
        let content = render(&system, &spec.key.namespace, &spec.key.stack, hosts);
        let written = {
            let _one = self.write.lock().ok()?;
            write_in_place(&path, content.as_bytes())
        };
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the stack's hosts file; starting the instance without service names");
            return None;
        }
        Some(HostsMount {
            source: CString::new(path.as_os_str().as_bytes()).ok()?,
            target: CString::new(SYSTEM_HOSTS).ok()?,
        })
    }
}

/// The hosts file: the system's entries, then the stack's services, one
/// line per address with every name it carries.
pub fn render(system: &str, namespace: &str, stack: &str, hosts: &str) -> String {
    let mut by_addr: BTreeMap<std::net::IpAddr, Vec<String>> = BTreeMap::new();
    for (name, addr) in parse_hosts(hosts) {
        let names = by_addr.entry(addr).or_default();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut out = String::new();
    out.push_str(system);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "# services of stack {stack} (namespace {namespace}), added by berth\n"
    ));
    for (addr, names) in by_addr {
        out.push_str(&format!("{addr}\t{}\n", names.join(" ")));
    }
    out
}

/// Replace the file's content keeping its inode (bind mounts of it in
/// running instances see the change); no write when it is unchanged.
fn write_in_place(path: &Path, content: &[u8]) -> std::io::Result<()> {
    if fs::read(path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    f.write_all(content)?;
    f.set_len(content.len() as u64)?;
    Ok(())
}

/// Make the child enter its own mount namespace and see `mount.source` as
/// `/etc/hosts`, between fork and exec.
///
/// `pre_exec` runs in the forked child, where only async-signal-safe calls
/// are allowed: the closure makes three syscalls (`unshare`, `mount`,
/// `mount`) on C strings built before the fork, and allocates nothing.
/// Making `/` a recursive slave first keeps the bind mount from propagating
/// back to the host (on systemd hosts `/` is shared) while mounts the host
/// makes later still reach the instance.
#[allow(unsafe_code)]
pub fn enter_before_exec(cmd: &mut Command, mount: HostsMount) {
    let closure = move || -> std::io::Result<()> {
        // SAFETY: unshare(2) and mount(2) are plain syscalls; every pointer
        // is to a NUL-terminated string owned by the closure, or null where
        // mount(2) allows it.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                mount.source.as_ptr(),
                mount.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: see the function's documentation.
    unsafe {
        cmd.pre_exec(closure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_system_entries_then_services() {
        let out = render(
            "127.0.0.1 localhost",
            "default",
            "shop",
            "api=127.77.0.2 api.shop=127.77.0.2 db=127.77.0.3 bad noaddr=x",
        );
        assert_eq!(
            out,
            "127.0.0.1 localhost\n# services of stack shop (namespace default), added by berth\n127.77.0.2\tapi api.shop\n127.77.0.3\tdb\n"
        );
    }

    #[test]
    fn rewrites_keep_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns/stack");
        write_in_place(&p, b"a long first version\n").unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        write_in_place(&p, b"short\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"short\n");
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino);
    }
}
