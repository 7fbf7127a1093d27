//! Cgroups for the transparent tests: one made per test and removed after it, and commands run
//! in a test namespace that still see the host's cgroup tree.

use super::netns::Topology;
use std::time::Duration;

/// A cgroup v2 made for one test, removed on drop (after its processes have exited), with any
/// parent the test had to create.
pub struct TestCgroup {
    /// The path below the cgroup v2 root.
    pub name: String,
    dir: std::path::PathBuf,
    /// Directories this test created, innermost first.
    created: Vec<std::path::PathBuf>,
}

impl TestCgroup {
    /// A fresh cgroup below the root, named after this process.
    pub fn new() -> Self {
        Self::at(&format!(
            "veil-test-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ))
    }

    /// The cgroup at `name` below the root, made with whatever parents are missing.
    pub fn at(name: &str) -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
        let root = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
            })
            .expect("a cgroup v2 hierarchy is mounted (CI must provide one)");
        let dir = std::path::Path::new(&root).join(name);
        let mut created: Vec<std::path::PathBuf> = dir
            .ancestors()
            .take_while(|p| !p.exists())
            .map(std::path::Path::to_path_buf)
            .collect();
        created.reverse();
        for d in &created {
            std::fs::create_dir(d).expect("create cgroup");
        }
        created.reverse();
        Self {
            name: name.to_owned(),
            dir,
            created,
        }
    }

    /// A shell line that moves itself into the cgroup and then runs `program`.
    pub fn enter(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && exec", self.dir.display())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in &self.created {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `program` in `role`'s network namespace with the host's mounts (so /sys/fs/cgroup is the
/// real one; `ip netns exec` remounts /sys).
pub fn in_ns_keeping_mounts(t: &Topology, role: &str, program: &str) -> std::process::Command {
    let mut c = std::process::Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{}", t.ns(role)))
        .arg(program);
    c
}
