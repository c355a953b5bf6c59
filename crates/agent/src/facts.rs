//! Node facts: what the scheduler can read about a machine as
//! `node.facts.<name>` (e.g. `node.facts.load_15m < 0.25`).
//!
//! Gathered from `/proc`, `/sys` and the data dir's file system, without
//! running any program, so a refresh is cheap enough to do every few
//! seconds. A fact that cannot be read is left out rather than guessed:
//! a constraint on a missing fact does not hold, which is the safe answer.
//!
//! | fact            | type   | meaning                                                  |
//! |-----------------|--------|----------------------------------------------------------|
//! | `cpus`          | number | CPUs this process may use                                |
//! | `memory_total`  | number | bytes of RAM (`MemTotal`)                                |
//! | `memory_free`   | number | bytes available without swapping (`MemAvailable`)        |
//! | `load_1m`, `load_5m`, `load_15m` | number | load averages                       |
//! | `disk_free`     | number | bytes free to unprivileged users in the data dir          |
//! | `arch`, `os`    | string | `x86_64`, `linux`                                        |
//! | `kernel`        | string | kernel release (`6.1.0-18-amd64`)                        |
//! | `hostname`      | string | the host name                                            |
//! | `virtualized`   | bool   | runs in a VM or a container                              |
//! | `virtualization`| string | `kvm`, `xen`, `vmware`, `hyperv`, `docker`, `lxc`, … or `none` |
//! | `docker`        | bool   | a Docker engine answers on its socket                    |

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// Every fact that can be read now. `data_dir` is where disk space counts.
pub fn collect(data_dir: &Path) -> BTreeMap<String, Value> {
    let mut f = BTreeMap::new();
    f.insert("arch".to_owned(), std::env::consts::ARCH.into());
    f.insert("os".to_owned(), std::env::consts::OS.into());
    if let Ok(n) = std::thread::available_parallelism() {
        f.insert("cpus".to_owned(), n.get().into());
    }
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        let (total, avail) = parse_meminfo(&meminfo);
        if let Some(t) = total {
            f.insert("memory_total".to_owned(), t.into());
        }
        if let Some(a) = avail {
            f.insert("memory_free".to_owned(), a.into());
        }
    }
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg")
        && let Some(loads) = parse_loadavg(&load)
    {
        for (name, v) in ["load_1m", "load_5m", "load_15m"].iter().zip(loads) {
            f.insert((*name).to_owned(), v.into());
        }
    }
    if let Some(free) = disk_free(data_dir) {
        f.insert("disk_free".to_owned(), free.into());
    }
    if let Some(k) = read_trimmed("/proc/sys/kernel/osrelease") {
        f.insert("kernel".to_owned(), k.into());
    }
    if let Some(h) = read_trimmed("/proc/sys/kernel/hostname") {
        f.insert("hostname".to_owned(), h.into());
    }
    let virt = virtualization();
    f.insert("virtualized".to_owned(), (virt != "none").into());
    f.insert("virtualization".to_owned(), virt.into());
    f.insert("docker".to_owned(), docker_present().into());
    f
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// `MemTotal` and `MemAvailable` in bytes.
fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn disk_free(dir: &Path) -> Option<u64> {
    // The data dir may not exist yet at the first collection: its parent's
    // file system is the one it will be created on.
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// The kind of VM or container this runs in, `none` on bare metal.
///
/// Containers first (a container in a VM is reported as the container):
/// Docker's `/.dockerenv`, Podman's `/run/.containerenv`, or the
/// `container=` variable of PID 1 that systemd-nspawn and LXC set. Then
/// VMs: the CPU's `hypervisor` flag, named by the DMI vendor strings.
fn virtualization() -> String {
    if Path::new("/.dockerenv").exists() {
        return "docker".to_owned();
    }
    if Path::new("/run/.containerenv").exists() {
        return "podman".to_owned();
    }
    if let Ok(env) = std::fs::read("/proc/1/environ")
        && let Some(kind) = env
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(b"container="))
            .filter(|v| !v.is_empty())
    {
        return String::from_utf8_lossy(kind).into_owned();
    }
    let dmi: String = ["sys_vendor", "product_name", "bios_vendor"]
        .iter()
        .filter_map(|f| read_trimmed(&format!("/sys/class/dmi/id/{f}")))
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let hypervisor_flag = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == "hypervisor"))
    });
    vm_kind(&dmi, hypervisor_flag).to_owned()
}

fn vm_kind(dmi: &str, hypervisor_flag: bool) -> &'static str {
    const KNOWN: [(&str, &str); 9] = [
        ("kvm", "kvm"),
        ("qemu", "qemu"),
        ("vmware", "vmware"),
        ("virtualbox", "oracle"),
        ("xen", "xen"),
        ("microsoft corporation virtual", "hyperv"),
        ("amazon ec2", "amazon"),
        ("google compute engine", "google"),
        ("bochs", "bochs"),
    ];
    if let Some((_, kind)) = KNOWN.iter().find(|(needle, _)| dmi.contains(needle)) {
        return kind;
    }
    if hypervisor_flag { "vm" } else { "none" }
}

/// Whether a Docker engine answers on `DOCKER_HOST`'s Unix socket (or the
/// default one). Connecting is enough: a socket file left by a stopped
/// daemon refuses the connection.
fn docker_present() -> bool {
    let path = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_loadavg_parse() {
        let (t, a) = parse_meminfo(
            "MemTotal:       16316412 kB\nMemFree: 1 kB\nMemAvailable:    8000000 kB\n",
        );
        assert_eq!(t, Some(16_316_412 * 1024));
        assert_eq!(a, Some(8_000_000 * 1024));
        assert_eq!(
            parse_loadavg("0.52 0.31 0.20 1/345 12345\n"),
            Some([0.52, 0.31, 0.20])
        );
        assert_eq!(parse_loadavg("garbage"), None);
    }

    #[test]
    fn vm_kinds() {
        assert_eq!(vm_kind("qemu standard pc (q35 + ich9, 2009)", true), "qemu");
        assert_eq!(vm_kind("dell inc. poweredge r640", false), "none");
        assert_eq!(vm_kind("", true), "vm");
    }

    #[test]
    fn collects_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let f = collect(&dir.path().join("not-yet"));
        assert!(f["cpus"].as_u64().unwrap() >= 1);
        assert!(f["memory_total"].as_u64().unwrap() > f["memory_free"].as_u64().unwrap());
        assert!(f["load_15m"].as_f64().is_some());
        assert!(f["disk_free"].as_u64().unwrap() > 0);
        assert_eq!(f["arch"], std::env::consts::ARCH);
        assert!(f["kernel"].as_str().is_some());
        assert!(f["virtualized"].is_boolean() && f["docker"].is_boolean());
        // The stack file loader warns about facts outside this list.
        for name in f.keys() {
            assert!(
                berth_spec::constraint::KNOWN_FACTS.contains(&name.as_str()),
                "fact {name} is missing from berth_spec::constraint::KNOWN_FACTS"
            );
        }
    }
}
