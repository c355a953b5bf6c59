//! Orphan cleanup after a `kill -9` of the agent.

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::common::{gone, wait_gone};

#[tokio::test]
async fn processes_carrying_the_marker_are_killed_others_are_not() {
    let id = format!("orphan-test-{}", std::process::id());
    let spawn = |marker: &str| {
        Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 1000; echo never"])
            .env("BERTH_AGENT_ID", marker)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut ours = spawn(&id);
    let mut theirs = spawn(&format!("{id}-other"));
    // Wait for the shell to have started its sleep (both carry the marker).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let marked = berth_agent::orphans::find_marked(&id);
        if marked.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sh and sleep not both marked within 30 s: {marked:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let found = tokio::task::spawn_blocking({
        let id = id.clone();
        move || berth_agent::orphans::kill_orphans(&id)
    })
    .await
    .unwrap();
    assert_eq!(found, 2);
    ours.wait().unwrap();
    assert!(wait_gone(ours.id()).await);
    // kill_orphans returns once they are gone (it waits for the SIGKILL to
    // take effect).
    assert!(berth_agent::orphans::find_marked(&id).is_empty());
    assert!(!gone(theirs.id()), "another agent's process survives");
    theirs.kill().unwrap();
    theirs.wait().unwrap();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(theirs.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .ok();
}

#[tokio::test]
async fn leftover_cgroups_are_emptied_and_removed() {
    use berth_agent::driver::cgroup::Cgroups;
    let id = format!("cgtest-{}", std::process::id());
    let cgroups = Cgroups::detect(&id);
    let limits = berth_spec::types::ResourceSpec {
        pids: Some(20),
        ..Default::default()
    };
    let cg = match cgroups.create("default.demo.web.1-x", &limits) {
        Ok(cg) => cg,
        // No writable cgroups on this machine: nothing can be left over.
        Err(_) => {
            assert_eq!(cgroups.remove_leftovers(), 0);
            return;
        }
    };
    let mut child = Command::new("sleep").arg("1000").spawn().unwrap();
    // Put the process in like a previous agent would have.
    let fd = cg.procs_fds()[0];
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    std::fs::write(&path, child.id().to_string()).unwrap();
    assert!(!cg.is_empty());
    drop(cg);
    // A new agent with the same id cleans up.
    let removed = tokio::task::spawn_blocking(move || Cgroups::detect(&id).remove_leftovers())
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed");
    assert!(!path.parent().unwrap().exists());
}
