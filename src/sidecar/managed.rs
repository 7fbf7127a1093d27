//! Who the kernel intercepts: the `[transparent]` section's user, group and cgroup names
//! resolved to what the firewall matches, with the two rules that keep veil from managing
//! itself: root is never managed (veil runs as root, so its tunnel would be intercepted), and
//! no managed cgroup may contain veil's own.

use super::config::TransparentSettings;
use crate::confine::View;
use crate::firewall::{Interception, ManagedCgroup, ViewEnd};

/// Why the managed set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A managed user that the system does not know.
    #[error("managed user {0:?} does not exist")]
    NoUser(String),
    /// A managed group that the system does not know.
    #[error("managed group {0:?} does not exist")]
    NoGroup(String),
    /// The account database could not be read.
    #[error("looking up {name:?}: {message}")]
    Lookup {
        /// The user or group.
        name: String,
        /// What failed.
        message: String,
    },
    /// A managed cgroup that is not a valid path or does not exist.
    #[error("{0}")]
    Cgroup(String),
    /// A managed cgroup that veil runs in.
    #[error("cgroup {path:?} contains veil itself ({own}): its tunnel would be intercepted")]
    ContainsVeil {
        /// The configured cgroup.
        path: String,
        /// veil's own cgroup.
        own: String,
    },
    /// A confined view that cannot be named.
    #[error("{0}")]
    View(String),
    /// Root among the managed users (or a managed group's members), or the root group.
    #[error("root cannot be a managed user or group: veil itself runs as root")]
    Root,
}

/// A managed group: its id and its members' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The gid.
    pub gid: u32,
    /// The members listed in the group database.
    pub members: Vec<String>,
}

/// Where names are looked up: the system's databases, or a test's table.
pub trait Accounts {
    /// The uid of user `name`, if it exists.
    fn uid(&self, name: &str) -> Result<Option<u32>, String>;
    /// Group `name`, if it exists.
    fn group(&self, name: &str) -> Result<Option<Group>, String>;
    /// The cgroup at `path` below the cgroup v2 root, checked to exist.
    fn cgroup(&self, path: &str) -> Result<ManagedCgroup, String>;
}

/// This host's passwd and group databases and cgroup tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Accounts for System {
    fn uid(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::User::from_name(name)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| e.to_string())
    }

    fn group(&self, name: &str) -> Result<Option<Group>, String> {
        nix::unistd::Group::from_name(name)
            .map(|g| {
                g.map(|g| Group {
                    gid: g.gid.as_raw(),
                    members: g.mem,
                })
            })
            .map_err(|e| e.to_string())
    }

    fn cgroup(&self, path: &str) -> Result<ManagedCgroup, String> {
        ManagedCgroup::resolve(path)
    }
}

/// The cgroup v2 path this process runs in (`/` if unknown).
pub fn own_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .to_owned()
}

/// The interception of `t` on this host, veil running in cgroup `own`.
pub fn resolve(
    t: &TransparentSettings,
    accounts: &impl Accounts,
    own: &str,
) -> Result<Interception, Error> {
    fn lookup(name: &str) -> impl FnOnce(String) -> Error + '_ {
        move |message| Error::Lookup {
            name: name.to_owned(),
            message,
        }
    }
    let mut uids = Vec::new();
    for name in &t.users {
        let uid = accounts.uid(name).map_err(lookup(name))?;
        uids.push(uid.ok_or_else(|| Error::NoUser(name.clone()))?);
    }
    let mut gids = Vec::new();
    let mut routed_uids = uids.clone();
    for name in &t.groups {
        let group = accounts
            .group(name)
            .map_err(lookup(name))?
            .ok_or_else(|| Error::NoGroup(name.clone()))?;
        gids.push(group.gid);
        // A member the user database does not know has no sockets to route.
        for member in &group.members {
            if let Ok(Some(uid)) = accounts.uid(member) {
                routed_uids.push(uid);
            }
        }
    }
    let mut cgroups = Vec::new();
    for path in &t.cgroups {
        let cgroup = accounts.cgroup(path).map_err(Error::Cgroup)?;
        if cgroup.contains(own) {
            return Err(Error::ContainsVeil {
                path: path.clone(),
                own: own.to_owned(),
            });
        }
        cgroups.push(cgroup);
    }
    routed_uids.sort_unstable();
    routed_uids.dedup();
    if uids.contains(&0) || gids.contains(&0) || routed_uids.contains(&0) {
        return Err(Error::Root);
    }
    Ok(Interception {
        uids,
        gids,
        inbound_cgroups: crate::firewall::user_slices(&routed_uids),
        routed_uids,
        cgroups,
        port: t.port,
        mark: t.mark,
        views: views(t, accounts)?
            .into_iter()
            .map(|v| ViewEnd {
                device: v.device,
                port: v.port,
            })
            .collect(),
    })
}

/// The confined views of `t`'s users (never root's: a view is for apps, and veil itself must
/// not run in one).
pub fn views(t: &TransparentSettings, accounts: &impl Accounts) -> Result<Vec<View>, Error> {
    let mut out = Vec::new();
    for (index, name) in t.confined.iter().enumerate() {
        let uid = accounts
            .uid(name)
            .map_err(|message| Error::Lookup {
                name: name.clone(),
                message,
            })?
            .ok_or_else(|| Error::NoUser(name.clone()))?;
        if uid == 0 {
            return Err(Error::Root);
        }
        let port = t
            .view_port(index)
            .ok_or_else(|| Error::View(format!("no listener port left for {name:?}")))?;
        out.push(
            View::new(name, uid, &t.netns_prefix, port).map_err(|e| Error::View(e.to_string()))?,
        );
    }
    Ok(out)
}

/// How the managed set is named in `veil status`: users, `group NAME`, `cgroup PATH`.
pub fn names(t: &TransparentSettings) -> Vec<String> {
    t.users
        .iter()
        .cloned()
        .chain(t.groups.iter().map(|g| format!("group {g}")))
        .chain(t.cgroups.iter().map(|c| format!("cgroup {c}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// alice 1000, bob 1001, root 0; group callers {alice, ghost}, wheel {root}, root gid 0.
    struct Table;

    impl Accounts for Table {
        fn uid(&self, name: &str) -> Result<Option<u32>, String> {
            Ok(match name {
                "root" => Some(0),
                "alice" => Some(1000),
                "bob" => Some(1001),
                "broken" => return Err("database unreadable".into()),
                _ => None,
            })
        }

        fn group(&self, name: &str) -> Result<Option<Group>, String> {
            let group = |gid, members: &[&str]| {
                Some(Group {
                    gid,
                    members: members.iter().map(|m| (*m).to_owned()).collect(),
                })
            };
            Ok(match name {
                "callers" => group(2000, &["alice", "ghost"]),
                "wheel" => group(10, &["bob", "root"]),
                "root" => group(0, &[]),
                _ => None,
            })
        }

        fn cgroup(&self, path: &str) -> Result<ManagedCgroup, String> {
            ManagedCgroup::from_mounts(path, "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
        }
    }

    fn settings(users: &[&str], groups: &[&str], cgroups: &[&str]) -> TransparentSettings {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        TransparentSettings {
            users: owned(users),
            groups: owned(groups),
            cgroups: owned(cgroups),
            ports_file: None,
            port: 15_353,
            mark: 0x1e11,
            confined: vec![],
            netns_prefix: "veil-".into(),
            confined_dns: None,
            launch: "/run/veil/launch".into(),
        }
    }

    const OWN: &str = "/system.slice/veil-sidecar.service";

    #[test]
    fn users_groups_and_their_members_are_resolved() {
        let i = resolve(
            &settings(&["bob"], &["callers"], &["veil.slice"]),
            &Table,
            OWN,
        )
        .expect("valid");
        assert_eq!(i.uids, vec![1001]);
        assert_eq!(i.gids, vec![2000]);
        assert_eq!(
            i.routed_uids,
            vec![1000, 1001],
            "members too, unknown ones skipped"
        );
        assert_eq!(i.cgroups.len(), 1);
        assert_eq!((i.port, i.mark), (15_353, 0x1e11));
    }

    #[test]
    fn confined_users_get_a_view_each_on_the_ports_after_the_listener() {
        let mut s = settings(&[], &[], &[]);
        s.confined = vec!["alice".into(), "bob".into()];
        let i = resolve(&s, &Table, OWN).expect("valid");
        assert_eq!(
            i.views,
            vec![
                ViewEnd {
                    device: "vc-1000".into(),
                    port: 15_354
                },
                ViewEnd {
                    device: "vc-1001".into(),
                    port: 15_355
                }
            ]
        );
        let v = views(&s, &Table).expect("views");
        assert_eq!(v[1].netns, "veil-bob");
        s.confined = vec!["root".into()];
        assert_eq!(resolve(&s, &Table, OWN), Err(Error::Root));
        s.confined = vec!["mallory".into()];
        assert_eq!(views(&s, &Table), Err(Error::NoUser("mallory".into())));
    }

    #[test]
    fn root_is_never_managed_as_a_user_a_group_or_a_member() {
        for s in [
            settings(&["root"], &[], &[]),
            settings(&[], &["root"], &[]),
            settings(&["alice"], &["wheel"], &[]),
        ] {
            assert_eq!(resolve(&s, &Table, OWN), Err(Error::Root), "{s:?}");
        }
    }

    #[test]
    fn a_cgroup_that_holds_veil_is_refused_one_beside_it_is_not() {
        for path in [
            "system.slice",
            "/system.slice/",
            "system.slice/veil-sidecar.service",
        ] {
            assert!(
                matches!(
                    resolve(&settings(&[], &[], &[path]), &Table, OWN),
                    Err(Error::ContainsVeil { .. })
                ),
                "{path}"
            );
        }
        // A prefix of the name is not an ancestor.
        let beside = resolve(&settings(&[], &[], &["system.slice/veil"]), &Table, OWN);
        assert!(beside.is_ok(), "{beside:?}");
        // veil in the root cgroup: any managed cgroup is below it, none contains it.
        assert!(resolve(&settings(&[], &[], &["veil.slice"]), &Table, "/").is_ok());
    }

    #[test]
    fn unknown_names_and_lookup_failures_are_named() {
        let err = |s| resolve(&s, &Table, OWN).expect_err("refused").to_string();
        assert_eq!(
            err(settings(&["mallory"], &[], &[])),
            "managed user \"mallory\" does not exist"
        );
        assert_eq!(
            err(settings(&[], &["nobody-group"], &[])),
            "managed group \"nobody-group\" does not exist"
        );
        assert_eq!(
            err(settings(&["broken"], &[], &[])),
            "looking up \"broken\": database unreadable"
        );
        assert!(err(settings(&[], &[], &["../etc"])).contains("expected a path below"));
    }

    #[test]
    fn status_names_users_groups_and_cgroups() {
        assert_eq!(
            names(&settings(&["alice"], &["callers"], &["veil.slice"])),
            vec!["alice", "group callers", "cgroup veil.slice"]
        );
    }
}
