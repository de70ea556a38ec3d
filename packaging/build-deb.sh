#!/usr/bin/env bash
# Builds the Debian package `kms` from binaries already built.
#   packaging/build-deb.sh BIN_DIR OUT_DIR
# BIN_DIR holds kms-server and kmsctl (`cargo xtask deb` builds them in release mode, without
# the test hooks, and calls this). Needs dpkg-deb (Debian and Ubuntu have it).
# KMS_DEB_COMPRESSION picks dpkg-deb's compressor (xz by default; the test suite, which packages
# its large debug binaries, uses none).
set -euo pipefail
bin=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 "$bin/kms-server" "$stage/usr/bin/kms-server"
install -D -m 0755 "$bin/kmsctl" "$stage/usr/bin/kmsctl"
install -D -m 0644 "$root/packaging/kms-server.service" "$stage/lib/systemd/system/kms-server.service"
install -D -m 0640 "$root/kms.example.toml" "$stage/etc/kms/kms.toml"
install -d -m 0755 "$stage/usr/share/doc/kms"
install -m 0644 "$root/README.md" "$root/kms.example.toml" "$root/docs/"*.md "$root/docs/alerts.yml" "$stage/usr/share/doc/kms/"
install -d -m 0755 "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
    "$stage/usr/share/fish/vendor_completions.d" "$stage/usr/share/man/man1"
"$bin/kmsctl" completions bash > "$stage/usr/share/bash-completion/completions/kmsctl"
"$bin/kmsctl" completions zsh > "$stage/usr/share/zsh/vendor-completions/_kmsctl"
"$bin/kmsctl" completions fish > "$stage/usr/share/fish/vendor_completions.d/kmsctl.fish"
"$bin/kmsctl" manpage | gzip -9n > "$stage/usr/share/man/man1/kmsctl.1.gz"

install -d -m 0755 "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: kms
Version: $version
Architecture: $arch
Maintainer: KMS maintainers <kms@example.org>
Installed-Size: $size
Depends: libc6 (>= 2.31), adduser
Recommends: softhsm2
Section: admin
Priority: optional
Homepage: https://example.org/kms
Description: client-held key management service in front of a PKCS#11 HSM
 kms-server is a gRPC key management service that runs on the customer's premises in front
 of their HSM and handles the whole key lifecycle, so that cloud providers only ever see
 wrapped data keys. kmsctl is the security officer's command line.
CONTROL
echo /etc/kms/kms.toml > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd kms >/dev/null; then
        adduser --system --group --home /var/lib/kms --no-create-home --shell /usr/sbin/nologin kms
    fi
    chown root:kms /etc/kms/kms.toml
    chmod 0640 /etc/kms/kms.toml
    install -d -m 0700 -o kms -g kms /var/lib/kms
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    echo "kms: edit /etc/kms/kms.toml (see /usr/share/doc/kms/operations.md), then: systemctl enable --now kms-server"
fi
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop kms-server.service || true
fi
PRERM
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
# The database (/var/lib/kms) is kept even on purge: it holds the audit trail and the metadata
# of keys whose material is in the HSM. Remove it by hand once it is no longer needed.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
deb="$out/kms_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z${KMS_DEB_COMPRESSION:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
