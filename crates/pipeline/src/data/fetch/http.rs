//! HTTP(S) downloads into a file, as a browser's download manager does them: the bytes go to
//! `<dest>.part`, a transfer that breaks off is resumed from where it stopped (`Range`), the
//! finished file is checked against its SHA-256 when one is known, and only then renamed to
//! `dest`. So `dest` is either absent or complete; a killed run leaves a `.part` that the next
//! run continues.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;

/// How often a broken transfer is resumed before the download gives up.
pub const RETRIES: u32 = 5;
/// Wait before retry n: n times this.
const RETRY_WAIT: Duration = Duration::from_millis(300);
const MIB: u64 = 1 << 20;

/// Why one attempt stopped.
enum Stop {
    /// Worth another attempt (connection dropped, 5xx): the message says what happened.
    Retry(String),
    /// Another attempt would get the same answer (404, a local I/O error).
    Fatal(Error),
}

/// The `.part` file a download of `dest` is written to.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads `url` to `dest` (see the module docs). `expected_sha256` (hex), when given, must
/// match the whole file; a mismatch deletes the download and says so.
pub fn download(url: &str, dest: &Path, expected_sha256: Option<&str>) -> Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).at(dir)?;
    }
    let part = part_path(dest);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut retry = 0;
    loop {
        match attempt(&agent, url, &part) {
            Ok(()) => break,
            Err(Stop::Fatal(e)) => return Err(e),
            Err(Stop::Retry(why)) => {
                retry += 1;
                if retry > RETRIES {
                    let kept = match file_len(&part) {
                        0 => String::new(),
                        n => format!(
                            " (the {n} bytes received are kept in {}: run again to resume)",
                            part.display()
                        ),
                    };
                    return Err(Error::Download {
                        url: url.into(),
                        message: format!("{why}; gave up after {RETRIES} retries{kept}"),
                    });
                }
                eprintln!("fetch: {url}: {why}; retrying ({retry} of {RETRIES})");
                std::thread::sleep(RETRY_WAIT * retry);
            }
        }
    }
    if let Some(expected) = expected_sha256 {
        let found = super::sha256_file(&part)?;
        if !found.eq_ignore_ascii_case(expected) {
            fs::remove_file(&part).at(&part)?;
            return Err(Error::Checksum {
                what: url.into(),
                expected: expected.into(),
                found,
                action: format!("the download {} was deleted", part.display()),
            });
        }
    }
    fs::rename(&part, dest).at(dest)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// One GET, resuming from the bytes already in `part`; `Ok` once `part` holds the whole body.
fn attempt(agent: &ureq::Agent, url: &str, part: &Path) -> std::result::Result<(), Stop> {
    let fatal = |message: String| {
        Stop::Fatal(Error::Download {
            url: url.into(),
            message,
        })
    };
    let have = file_len(part);
    // Raw bytes: a transparently decompressed body could not be resumed by byte offset.
    let mut request = agent.get(url).set("Accept-Encoding", "identity");
    if have > 0 {
        request = request.set("Range", &format!("bytes={have}-"));
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, r)) if have > 0 => {
            // Nothing left after byte `have`: complete if the server's total says so, else
            // the partial file is not a prefix of what the server has now.
            if content_range(&r).is_some_and(|(_, total)| total == Some(have)) {
                return Ok(());
            }
            fs::remove_file(part).map_err(|e| io_stop(part, e))?;
            return Err(Stop::Retry(format!(
                "the server cannot continue the {have} bytes received earlier; starting over"
            )));
        }
        Err(ureq::Error::Status(code, r)) => {
            let status = format!("HTTP {code} {}", r.status_text());
            return Err(if code >= 500 || code == 429 {
                Stop::Retry(status)
            } else {
                fatal(status)
            });
        }
        // The transport error's text starts with the URL, which the caller's messages name.
        Err(ureq::Error::Transport(t)) => {
            let text = t.to_string();
            let text = text.strip_prefix(&format!("{url}: ")).unwrap_or(&text);
            return Err(Stop::Retry(text.to_string()));
        }
    };
    let (offset, total) = match (response.status(), content_range(&response)) {
        (206, Some((start, total))) => (start, total),
        (206, None) => return Err(fatal("206 response without Content-Range".into())),
        _ => {
            if have > 0 {
                eprintln!("fetch: {url}: the server does not resume downloads; starting over");
            }
            let len = response
                .header("Content-Length")
                .and_then(|v| v.trim().parse().ok());
            (0, len)
        }
    };
    if offset != 0 && offset != have {
        fs::remove_file(part).map_err(|e| io_stop(part, e))?;
        return Err(Stop::Retry(format!(
            "the server resumed at byte {offset}, not {have}; starting over"
        )));
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(|e| io_stop(part, e))?;
    if offset == 0 {
        file.set_len(0).map_err(|e| io_stop(part, e))?;
    }
    let received = copy_body(response.into_reader(), &mut file, offset, total, url, part)?;
    file.sync_all().map_err(|e| io_stop(part, e))?;
    match total {
        Some(t) if received != t => Err(Stop::Retry(format!(
            "connection closed after {received} of {t} bytes"
        ))),
        _ => Ok(()),
    }
}

/// Appends the body to `file`, showing progress; returns the file's length afterwards.
fn copy_body(
    mut body: impl Read,
    file: &mut File,
    offset: u64,
    total: Option<u64>,
    url: &str,
    part: &Path,
) -> std::result::Result<u64, Stop> {
    let name = url.rsplit('/').next().unwrap_or(url);
    // The bar counts this transfer's bytes, so its rate is true after a resume.
    let todo_mib = total.map_or(0, |t| t.saturating_sub(offset).div_ceil(MIB));
    let mut progress = Progress::new(&format!("download {name}"), "MiB", todo_mib);
    // At most ~20 log lines when not on a terminal.
    let step = todo_mib.div_ceil(20).max(1);
    let mut reported = 0;
    let mut received = offset;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                progress.finish();
                return Err(Stop::Retry(match total {
                    Some(t) => format!("connection broke off after {received} of {t} bytes ({e})"),
                    None => format!("connection broke off after {received} bytes ({e})"),
                }));
            }
        };
        file.write_all(&buf[..n]).map_err(|e| io_stop(part, e))?;
        received += n as u64;
        let mib = (received - offset) / MIB;
        if mib >= reported + step {
            progress.inc(mib - reported);
            reported = mib;
        }
    }
    if todo_mib > reported {
        progress.inc(todo_mib - reported);
    }
    progress.finish();
    Ok(received)
}

/// `Content-Range: bytes START-END/TOTAL` (or `bytes */TOTAL`) as (START, TOTAL).
fn content_range(response: &ureq::Response) -> Option<(u64, Option<u64>)> {
    parse_content_range(response.header("Content-Range")?)
}

fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok();
    let start = match range.trim() {
        "*" => 0,
        r => r.split_once('-')?.0.trim().parse().ok()?,
    };
    Some((start, total))
}

fn io_stop(path: &Path, source: std::io::Error) -> Stop {
    Stop::Fatal(Error::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes */500"), Some((0, Some(500))));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes x-2/3"), None);
    }

    #[test]
    fn part_file_sits_beside_the_destination() {
        assert_eq!(
            part_path(Path::new("/c/downloads/a.zip")),
            PathBuf::from("/c/downloads/a.zip.part")
        );
    }
}
