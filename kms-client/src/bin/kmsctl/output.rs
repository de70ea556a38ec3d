//! What several command groups share: printing an answer, the files kmsctl writes (only their
//! owner can read them), and reading and showing times, periods and pairs.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use kms_client::Error;
use serde_json::{Value, json};

use crate::admin::DryRun;

/// How to print a command's answer: JSON (`--json`) or text, or for a dry run what the server
/// said it would change.
pub(crate) struct Out {
    pub(crate) json: bool,
    pub(crate) dry_run: DryRun,
}

impl Out {
    /// Prints a command's answer; for a dry run, what the server said it would change instead.
    pub(crate) fn print(&self, json: Value, text: impl FnOnce() -> String) {
        if let Some(would) = self.dry_run.answer() {
            if self.json {
                println!("{}", json!({"dry_run": true, "would": would}));
            } else {
                println!("dry run: would {would}; nothing was changed");
            }
        } else if self.json {
            println!("{json}");
        } else {
            println!("{}", text());
        }
    }
}

/// Creates (or truncates) a file only its owner can read or write, whatever the umask: every
/// file kmsctl writes (sessions, backups, audit exports, plaintext) holds something sensitive.
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// A new file only its owner can read (a session, or a temporary file beside an output): whatever
/// stood at that name (one left by a crash, or a link someone planted) is removed first, never
/// followed.
pub(crate) fn create_fresh(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

/// Writes a file only its owner can read (the session token), in a directory only its owner can
/// enter when kmsctl makes it.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |e: std::io::Error| Error::Config(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    create_fresh(path).and_then(|mut f| f.write_all(contents)).map_err(io)
}

/// Writes to `path` through a temporary file renamed into place only on success, so a failed
/// decryption never leaves partial plaintext under the requested name.
pub(crate) async fn write_atomically(path: &Path, f: impl AsyncFnOnce(&mut BufWriter<File>) -> Result<u64, Error>) -> Result<u64, Error> {
    let io = |e: std::io::Error| Error::Envelope(e.into());
    let tmp = path.with_extension("kmsctl-partial");
    let mut w = BufWriter::new(create_fresh(&tmp).map_err(io)?);
    let result = f(&mut w).await.and_then(|n| w.flush().map(|()| n).map_err(io));
    match result {
        Ok(n) => std::fs::rename(&tmp, path).map(|()| n).map_err(io),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

pub(crate) fn open_input(path: &Path) -> Result<BufReader<File>, Error> {
    File::open(path).map(BufReader::new).map_err(|e| Error::Envelope(e.into()))
}

pub(crate) fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE with a non-empty KEY")),
    }
}

/// A point in time, as Unix seconds: `YYYY-MM-DD` (midnight UTC), `YYYY-MM-DDTHH:MM:SSZ`, or
/// plain seconds.
pub(crate) fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || format!("{s:?} is not YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let num = |p: &str, lo: i64, hi: i64| p.parse::<i64>().ok().filter(|n| (lo..=hi).contains(n));
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d.as_slice() else { return Err(bad()) };
    let (y, m, day) = (num(y, 1970, 9999).ok_or_else(bad)?, num(m, 1, 12).ok_or_else(bad)?, num(day, 1, 31).ok_or_else(bad)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = match time {
        None => 0,
        Some(t) => {
            let parts: Vec<&str> = t.split(':').collect();
            let [h, mi, se] = parts.as_slice() else { return Err(bad()) };
            num(h, 0, 23).ok_or_else(bad)? * 3600 + num(mi, 0, 59).ok_or_else(bad)? * 60 + num(se, 0, 60).ok_or_else(bad)?
        }
    };
    Ok(days * 86_400 + secs)
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A Unix time as the officer reads times: in the local time zone (`TZ`, or the system's), in
/// the date and time form of their locale (`LC_ALL`, `LC_TIME` or `LANG`, e.g. `fr_MA.UTF-8`;
/// POSIX's when unset or unknown). `--json` keeps the number.
pub(crate) fn local_time(unix: i64) -> String {
    use chrono::TimeZone;
    let locale = ["LC_ALL", "LC_TIME", "LANG"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty())
        .and_then(|v| chrono::Locale::try_from(v.split(['.', '@']).next().unwrap_or_default()).ok())
        .unwrap_or(chrono::Locale::POSIX);
    match chrono::Local.timestamp_opt(unix, 0).single() {
        Some(at) => at.format_localized("%c", locale).to_string(),
        None => unix.to_string(),
    }
}

/// "365d", "12h", "30m", "90s" or plain seconds.
pub(crate) fn parse_period(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a period like 365d, 12h, 30m or 90s"))?;
    let unit = match unit {
        'd' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return Err(format!("{s:?}: the unit must be d, h, m or s")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too long"))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods() {
        assert_eq!(parse_period("365d"), Ok(365 * 86_400));
        assert_eq!(parse_period("12h"), Ok(12 * 3600));
        assert_eq!(parse_period("90"), Ok(90));
        assert!(parse_period("1y").is_err());
        assert!(parse_period("d").is_err());
        assert!(parse_period("").is_err());
        assert!(parse_period("99999999999999999999d").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("2026-11-25"), Ok(1_795_564_800));
        assert_eq!(parse_time("2000-03-01T12:30:05Z"), Ok(951_913_805));
        assert_eq!(parse_time("1700000000"), Ok(1_700_000_000));
        for bad in ["2026-13-01", "2026-11", "2026-11-25T10:00:00", "yesterday", "2026-11-25T25:00:00Z"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pairs() {
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_pair("=b").is_err());
        assert!(parse_pair("ab").is_err());
    }
}
