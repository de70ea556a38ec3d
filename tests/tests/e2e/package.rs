//! The Debian package (`packaging/build-deb.sh`, which `cargo xtask deb` runs on release
//! binaries): built here from the binaries under test, then its contents, its control data, its
//! conffile, the hardening of its systemd unit, and `systemd-analyze verify` on the unit where
//! systemd is there to run it.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

#[test]
fn the_debian_package_holds_the_binaries_a_hardened_unit_the_config_completions_and_man_page() {
    let bins = kms_tests::bin("kms-server").parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let deb = run(Command::new("bash").arg(root.join("packaging/build-deb.sh")).arg(&bins).arg(out.path()).env("KMS_DEB_COMPRESSION", "none"));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb") && Path::new(deb).exists(), "{deb}");

    let listing = run(Command::new("dpkg-deb").args(["-c", deb]));
    let entries: Vec<(&str, &str)> = listing.lines().map(|l| (l.split_whitespace().next().unwrap(), l.split_whitespace().last().unwrap())).collect();
    for (path, mode) in [
        ("./usr/bin/kms-server", "-rwxr-xr-x"),
        ("./usr/bin/kmsctl", "-rwxr-xr-x"),
        ("./lib/systemd/system/kms-server.service", "-rw-r--r--"),
        ("./etc/kms/kms.toml", "-rw-r-----"),
        ("./usr/share/doc/kms/operations.md", "-rw-r--r--"),
        ("./usr/share/doc/kms/kms.example.toml", "-rw-r--r--"),
        ("./usr/share/bash-completion/completions/kmsctl", "-rw-r--r--"),
        ("./usr/share/zsh/vendor-completions/_kmsctl", "-rw-r--r--"),
        ("./usr/share/fish/vendor_completions.d/kmsctl.fish", "-rw-r--r--"),
        ("./usr/share/man/man1/kmsctl.1.gz", "-rw-r--r--"),
    ] {
        assert!(entries.contains(&(mode, path)), "{path} ({mode}) is not in the package:\n{listing}");
    }
    assert!(listing.lines().all(|l| l.contains("root/root")), "every file belongs to root:\n{listing}");

    let control = run(Command::new("dpkg-deb").args(["-f", deb, "Package", "Version", "Depends"]));
    assert!(control.contains("Package: kms") && control.contains("Version: 0.1.0") && control.contains("adduser"), "{control}");
    let x = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").args(["-x", deb]).arg(x.path()));
    run(Command::new("dpkg-deb").args(["-e", deb]).arg(x.path().join("DEBIAN")));
    assert_eq!(std::fs::read_to_string(x.path().join("DEBIAN/conffiles")).unwrap().trim(), "/etc/kms/kms.toml");
    let postinst = std::fs::read_to_string(x.path().join("DEBIAN/postinst")).unwrap();
    assert!(postinst.contains("adduser --system") && postinst.contains("install -d -m 0700 -o kms -g kms /var/lib/kms"), "{postinst}");

    let unit_path = x.path().join("lib/systemd/system/kms-server.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in [
        "User=kms",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/kms",
        "PrivateTmp=yes",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/bin/kms-server --log-format json run --config /etc/kms/kms.toml",
        "ExecStartPre=/usr/bin/kms-server check-config /etc/kms/kms.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }

    let man = run(Command::new("sh").arg("-c").arg(format!("gzip -dc {}", x.path().join("usr/share/man/man1/kmsctl.1.gz").display())));
    assert!(man.contains(".TH kmsctl 1") && man.contains("backup"), "the man page:\n{man}");
    let bash = std::fs::read_to_string(x.path().join("usr/share/bash-completion/completions/kmsctl")).unwrap();
    assert!(bash.contains("_kmsctl") && bash.contains("backup"));
    // The packaged binaries run.
    let version = run(Command::new(x.path().join("usr/bin/kmsctl")).arg("--version"));
    assert_eq!(version.trim(), "kmsctl 0.1.0");

    if on_path("systemd-analyze") {
        // Verified as installed, with the packaged binaries where the unit will find them:
        // the unit's paths point into the extracted package.
        let local = x.path().join("kms-server.service");
        std::fs::write(&local, unit.replace("/usr/bin/", &format!("{}/usr/bin/", x.path().display()))).unwrap();
        let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&local).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    }
}
