//! No binary a user is told to build or run carries the end-to-end test hooks: the hooks live in
//! `kms-server-test-hooks` alone, which only the harness builds and which refuses to run
//! without it.

use std::path::Path;
use std::process::Command;

/// The names of the environment variables the hooks read: each is a string in a binary that
/// has them, and in no other.
const HOOK_VARIABLES: &[&str] = &[
    "KMS_TEST_CRASH_AT",
    "KMS_TEST_PAUSE_AT",
    "KMS_TEST_STORE_FAULTS",
    "KMS_TEST_HSM_FAULTS",
    "KMS_TEST_RETENTION_CLOCK_OFFSET",
    "KMS_TEST_SWEEP_CLOCK_OFFSET",
    "KMS_TEST_SESSION_COPY_IDLE_MS",
];

/// Which of them a binary holds (grep, since the binaries are hundreds of megabytes with their
/// debug information).
fn hook_variables_in(binary: &Path) -> Vec<&'static str> {
    let out = Command::new("grep").args(["-a", "-o", "-F"]).args(HOOK_VARIABLES.iter().flat_map(|v| ["-e", v])).arg(binary).output().unwrap();
    let found = String::from_utf8_lossy(&out.stdout);
    HOOK_VARIABLES.iter().copied().filter(|v| found.lines().any(|l| l == *v)).collect()
}

#[test]
fn the_binary_cargo_xtask_dev_runs_has_no_hooks_and_the_hooked_one_runs_only_under_the_harness() {
    // `cargo xtask dev` runs target/<profile>/kms-server, made by `cargo build --workspace --bins`.
    let plain = kms_tests::bin("kms-server");
    assert_eq!(hook_variables_in(&plain), Vec::<&str>::new(), "{} carries test hooks", plain.display());
    let version = Command::new(&plain).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("kms-server {}", env!("CARGO_PKG_VERSION")));

    // The harness's own binary has every hook (so the check above can fail), says so, and
    // refuses to start when the harness did not start it.
    let hooked = kms_tests::bin(kms_tests::HOOKED_SERVER);
    assert_eq!(hook_variables_in(&hooked), HOOK_VARIABLES);
    let version = kms_tests::hooked_server().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains("test hooks"), "{version:?}");
    let dir = tempfile::tempdir().unwrap();
    let refused = Command::new(&hooked).args(["dev", "--data-dir"]).arg(dir.path()).env_remove(kms_server::hooks::HARNESS).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("test hooks") && err.contains("KMS_TEST_HARNESS=1"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the refused binary wrote to its data directory");
}

#[test]
fn no_workspace_build_turns_the_test_hooks_on() {
    // Which features of kms-server `cargo build --workspace` (debug or --release: profiles do
    // not change feature resolution) enables on this platform. With the hooks turned
    // on by any crate, `kms-server feature "test-hooks"` is among them.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let features = |extra: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "--offline", "--workspace", "-e", "features", "-i", "kms-server", "--prefix", "none"])
            .args(extra)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let workspace = features(&[]);
    assert!(workspace.contains("kms-server v"), "{workspace}");
    assert!(!workspace.contains("feature \"test-hooks\""), "a workspace build turns the test hooks on:\n{workspace}");
    // The same query sees the feature when it is on.
    assert!(features(&["--features", "kms-server/test-hooks"]).contains("kms-server feature \"test-hooks\""));
}
