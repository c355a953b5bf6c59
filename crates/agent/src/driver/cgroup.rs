//! Per-instance cgroups carrying `deploy.resources.limits` (cpus, memory,
//! pids), on cgroup v2 (unified) or v1 (one hierarchy per controller).
//!
//! Layout: every instance gets `<own cgroup>/berth-<agent id>/<instance>`
//! in each hierarchy it needs, nested under the agent's own cgroup so
//! that limits the agent is already under (a container, a systemd slice)
//! still apply. Cgroups are only made for services that have limits; the
//! child joins them before it execs (see [`InstanceCgroup::procs_fds`]).
//! Everything here is best effort: when a hierarchy is missing or not
//! writable the caller gets a [`CgroupError`] to show as a warning.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_spec::types::ResourceSpec;

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period used for `cpus` quotas (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Why limits could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable cgroup hierarchy for a controller the limits need.
    #[error("cgroups unavailable: {0}")]
    Unavailable(String),
    /// A cgroup file could not be written or a directory made.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
enum Layout {
    /// Unified hierarchy; `base` is the agent's own cgroup directory.
    V2 { base: PathBuf },
    /// Legacy: controller name → the agent's own directory in that hierarchy.
    V1 { bases: Vec<(&'static str, PathBuf)> },
    /// Nothing usable.
    None(String),
}

/// This machine's cgroup layout, detected once per agent.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    agent_dir_name: String,
}

/// The cgroup directories of one instance.
#[derive(Debug)]
pub struct InstanceCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
    v2: bool,
}

fn own_paths() -> Vec<(String, String)> {
    let Ok(text) = fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            Some((ctrls.to_owned(), path.trim_start_matches('/').to_owned()))
        })
        .collect()
}

impl Cgroups {
    /// Detect the layout from `/proc/self/cgroup` and `/sys/fs/cgroup`.
    pub fn detect(agent_id: &str) -> Self {
        let paths = own_paths();
        let root = Path::new(ROOT);
        let layout = if root.join("cgroup.controllers").exists() {
            match paths.iter().find(|(c, _)| c.is_empty()) {
                Some((_, p)) => Layout::V2 { base: root.join(p) },
                None => Layout::None("no cgroup v2 entry in /proc/self/cgroup".into()),
            }
        } else {
            let mut bases = Vec::new();
            for ctrl in ["cpu", "memory", "pids"] {
                let own = paths
                    .iter()
                    .find(|(c, _)| c.split(',').any(|x| x == ctrl))
                    .map(|(_, p)| p.clone());
                let dir = root.join(ctrl);
                if let Some(own) = own
                    && dir.join("cgroup.procs").exists()
                {
                    bases.push((ctrl, dir.join(own)));
                }
            }
            if bases.is_empty() {
                Layout::None("no cgroup v1 cpu/memory/pids hierarchy is mounted".into())
            } else {
                Layout::V1 { bases }
            }
        };
        Self {
            layout,
            agent_dir_name: format!("berth-{agent_id}"),
        }
    }

    /// Whether any hierarchy looks usable.
    pub fn available(&self) -> bool {
        !matches!(self.layout, Layout::None(_))
    }

    /// The agent's directories (one per hierarchy).
    fn agent_dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { base } => vec![base.join(&self.agent_dir_name)],
            Layout::V1 { bases } => bases
                .iter()
                .map(|(_, b)| b.join(&self.agent_dir_name))
                .collect(),
            Layout::None(_) => Vec::new(),
        }
    }

    /// Make the cgroup of one instance and write its limits (none: a cgroup
    /// that only tracks the instance's processes).
    pub fn create(&self, name: &str, limits: &ResourceSpec) -> Result<InstanceCgroup, CgroupError> {
        match &self.layout {
            Layout::None(reason) => Err(CgroupError::Unavailable(reason.clone())),
            Layout::V2 { base } => self.create_v2(base, name, limits),
            Layout::V1 { bases } => self.create_v1(bases, name, limits),
        }
    }

    fn create_v2(
        &self,
        base: &Path,
        name: &str,
        limits: &ResourceSpec,
    ) -> Result<InstanceCgroup, CgroupError> {
        let mut ctrls = Vec::new();
        if limits.cpus.is_some() {
            ctrls.push("cpu");
        }
        if limits.memory_bytes.is_some() {
            ctrls.push("memory");
        }
        if limits.pids.is_some() {
            ctrls.push("pids");
        }
        let available = fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        for c in &ctrls {
            if !available.split_whitespace().any(|a| a == *c) {
                return Err(CgroupError::Unavailable(format!(
                    "controller {c} is not delegated to {}",
                    base.display()
                )));
            }
        }
        let agent_dir = base.join(&self.agent_dir_name);
        let dir = agent_dir.join(name);
        mkdir(&agent_dir)?;
        let enable: String = ctrls.iter().map(|c| format!("+{c} ")).collect();
        // Controllers must be enabled top-down; a base cgroup that also holds
        // processes (the agent) refuses this, which is reported as is. With
        // no limits there is nothing to enable: the cgroup only tracks.
        for parent in [base, agent_dir.as_path()] {
            let current =
                fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
            if ctrls
                .iter()
                .all(|c| current.split_whitespace().any(|x| x == *c))
            {
                continue;
            }
            let f = parent.join("cgroup.subtree_control");
            fs::write(&f, enable.trim()).map_err(io_err(&f))?;
        }
        mkdir(&dir)?;
        let cg = InstanceCgroup {
            procs: vec![open_procs(&dir)?],
            dirs: vec![dir.clone()],
            v2: true,
        };
        if let Some(cpus) = limits.cpus {
            write(
                &dir,
                "cpu.max",
                &format!("{} {CPU_PERIOD_US}", quota_us(cpus)),
            )?;
        }
        if let Some(m) = limits.memory_bytes {
            write(&dir, "memory.max", &m.to_string())?;
        }
        if let Some(p) = limits.pids {
            write(&dir, "pids.max", &p.to_string())?;
        }
        Ok(cg)
    }

    fn create_v1(
        &self,
        bases: &[(&'static str, PathBuf)],
        name: &str,
        limits: &ResourceSpec,
    ) -> Result<InstanceCgroup, CgroupError> {
        let find = |ctrl: &str| {
            bases
                .iter()
                .find(|(c, _)| *c == ctrl)
                .map(|(_, b)| b.join(&self.agent_dir_name).join(name))
                .ok_or_else(|| CgroupError::Unavailable(format!("no cgroup v1 {ctrl} hierarchy")))
        };
        let mut cg = InstanceCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            v2: false,
        };
        let add = |dir: PathBuf, cg: &mut InstanceCgroup| -> Result<PathBuf, CgroupError> {
            mkdir(&dir)?;
            cg.procs.push(open_procs(&dir)?);
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        if let Some(cpus) = limits.cpus {
            let dir = add(find("cpu")?, &mut cg)?;
            write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            write(&dir, "cpu.cfs_quota_us", &quota_us(cpus).to_string())?;
        }
        if let Some(m) = limits.memory_bytes {
            let dir = add(find("memory")?, &mut cg)?;
            write(&dir, "memory.limit_in_bytes", &m.to_string())?;
        }
        if let Some(p) = limits.pids {
            let dir = add(find("pids")?, &mut cg)?;
            write(&dir, "pids.max", &p.to_string())?;
        }
        if cg.dirs.is_empty() {
            // No limits: one hierarchy is enough to track every process of
            // the instance, so that a stop kills what left the group.
            let (_, base) = bases
                .iter()
                .find(|(c, _)| *c == "pids")
                .or_else(|| bases.first())
                .ok_or_else(|| CgroupError::Unavailable("no cgroup v1 hierarchy".into()))?;
            add(base.join(&self.agent_dir_name).join(name), &mut cg)?;
        }
        Ok(cg)
    }

    /// Kill every process left in any cgroup of this agent and remove the
    /// cgroups: what a previous incarnation of the agent left behind.
    /// Returns how many cgroups were removed.
    pub fn remove_leftovers(&self) -> usize {
        let mut removed = 0;
        for agent_dir in self.agent_dirs() {
            let Ok(entries) = fs::read_dir(&agent_dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.is_dir() {
                    let cg = InstanceCgroup {
                        dirs: vec![path],
                        procs: Vec::new(),
                        v2: matches!(self.layout, Layout::V2 { .. }),
                    };
                    cg.kill_all();
                    if cg.remove() {
                        removed += 1;
                    }
                }
            }
            let _ = fs::remove_dir(&agent_dir);
        }
        removed
    }
}

fn quota_us(cpus: f64) -> u64 {
    // The kernel refuses quotas under 1 ms.
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1_000)
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(io_err(&path))
}

fn open_procs(dir: &Path) -> Result<File, CgroupError> {
    let path = dir.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err(&path))
}

fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl InstanceCgroup {
    /// Open `cgroup.procs` descriptors the child writes `0` to before exec
    /// (`0` means "the writing process" on v1 and v2). They are close-on-exec.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Whether any process is still in the cgroup.
    pub fn is_empty(&self) -> bool {
        self.dirs.iter().all(|d| pids_in(d).is_empty())
    }

    /// SIGKILL every process in the cgroup (catches processes that left the
    /// process group with `setsid`) and wait briefly until it is empty.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let mut any = false;
            for dir in &self.dirs {
                if self.v2 && dir.join("cgroup.kill").exists() {
                    let _ = fs::write(dir.join("cgroup.kill"), "1");
                }
                for pid in pids_in(dir) {
                    any = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if !any || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Remove the directories; true if all are gone.
    pub fn remove(&self) -> bool {
        let mut ok = true;
        for dir in &self.dirs {
            // rmdir fails with EBUSY for a moment after the last process died.
            let mut done = false;
            for _ in 0..50 {
                match fs::remove_dir(dir) {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        done = true;
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            ok &= done;
        }
        ok
    }
}
