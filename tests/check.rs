//! `veil check`: the daemon's own loader as a command.

mod support;

use std::os::unix::fs::PermissionsExt;
use support::{is_root, policy_dir, veil};

fn check(dir: &std::path::Path) -> (i32, String, String) {
    let out = veil()
        .arg("check")
        .arg(dir)
        .output()
        .expect("run veil check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_policies_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let (code, out, err) = check(&dir);
    // When run as root, ownership is checked too; a CI clone is root-owned, a developer's may not be.
    if is_root()
        && std::fs::metadata(&dir)
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .ok()
            != Some(0)
    {
        assert_eq!(code, 64, "{err}");
        return;
    }
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok:") && out.contains("example-contractor") && out.contains("example-sales"),
        "{out}"
    );
}

#[test]
fn bad_policy_names_file_line_column_and_field_and_exits_64() {
    let dir = policy_dir(&[
        (
            "default.toml",
            "fallback = \"relay\"\n\n[[rule]]\nverdict = \"direct\"\nnetworks = [\"0.0.0.0/0\"]\n",
        ),
        (
            "users/alice.toml",
            "[[rule]]\nverdict = \"relay\"\nnetworks = [\"10.0.0.0/8\"]\nports = [\"9-x\"]\ncolour = \"red\"\n",
        ),
    ]);
    let (code, _, err) = check(dir.path());
    assert_eq!(code, 64, "{err}");
    let d = dir.path().display();
    assert!(
        err.contains(&format!("{d}/default.toml:5:12: rule[1].networks: sends UDP direct to public address space (0.0.0.0/0)")),
        "{err}"
    );
    // Serde stops at the first structural error in a file; the unknown field is reported.
    assert!(
        err.contains(&format!(
            "{d}/users/alice.toml:5:1: rule[1].colour: unknown field `colour`"
        )),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
}

#[test]
fn files_users_could_edit_are_refused_when_root() {
    assert!(
        is_root(),
        "ownership checks apply only to root; tests/run.sh runs this as root in CI"
    );
    let dir = policy_dir(&[
        ("default.toml", "fallback = \"relay\"\n"),
        ("users/nobody.toml", ""),
        ("groups/staff.toml", ""),
    ]);
    assert_eq!(check(dir.path()).0, 0);
    let users = dir.path().join("users/nobody.toml");
    nix::unistd::chown(&users, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let groups = dir.path().join("groups/staff.toml");
    std::fs::set_permissions(&groups, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let (code, _, err) = check(dir.path());
    assert_eq!(code, 64);
    assert!(
        err.contains(&format!(
            "{}: owned by uid 65534, must be owned by root",
            users.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}: mode 666 lets group or others write it, must not",
            groups.display()
        )),
        "{err}"
    );
}

#[test]
fn misplaced_and_missing_files_are_errors() {
    let dir = policy_dir(&[("alice.toml", "")]);
    let (code, _, err) = check(dir.path());
    assert_eq!(code, 64);
    assert!(err.contains("alice.toml: not a policy file"), "{err}");
    assert!(err.contains("default.toml: missing"), "{err}");
}
