//! Unpacking a fetched `.zip` archive and the content digest that identifies what it holds.
//!
//! The digest is over the files, not the archive: GitHub generates its archives on request and
//! their bytes (timestamps, compression) are not stable over time, while the files in them are.
//! It is the SHA-256 of the sorted lines `<sha256 of file>  <path>\n` of every regular file,
//! paths relative to the archive's top folder with `/` separators, the same as
//! `find . -type f -printf '%P\0' | xargs -0 sha256sum | LC_ALL=C sort | sha256sum`
//! run in the unpacked top folder.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::data::dataset::hex;
use crate::error::{Error, IoContext, Result};

/// Unpacks the zip `archive` into the existing empty folder `into`. When every entry sits in
/// one top folder (GitHub's `<repo>-<commit>/`), that folder is left out, so `into` holds its
/// contents. Entries with absolute paths or `..`, links and encrypted entries are refused.
/// Returns the number of files written.
pub fn unzip(archive: &Path, into: &Path) -> Result<usize> {
    let err = |message: String| Error::Archive {
        path: archive.to_owned(),
        message,
    };
    let file = File::open(archive).at(archive)?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| err(format!("not a readable zip file: {e}")))?;
    let names: Vec<String> = (0..zip.len())
        .map(|i| {
            let entry = zip
                .by_index_raw(i)
                .map_err(|e| err(format!("entry {i}: {e}")))?;
            let name = entry
                .name()
                .map_err(|e| err(format!("entry {i}: {e}")))?
                .to_string();
            check_entry_name(&name).map_err(err)?;
            Ok(name)
        })
        .collect::<Result<_>>()?;
    let strip = common_top_folder(&names);
    let mut files = 0;
    for (i, name) in names.iter().enumerate() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| err(format!("entry `{name}`: {e}")))?;
        if entry.is_symlink() {
            return Err(err(format!("entry `{name}` is a link: refused")));
        }
        if entry.encrypted() {
            return Err(err(format!("entry `{name}` is encrypted")));
        }
        let relative = strip_top(name, strip.as_deref());
        if relative.as_os_str().is_empty() {
            continue;
        }
        let dest = into.join(&relative);
        if entry.is_dir() {
            fs::create_dir_all(&dest).at(&dest)?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).at(parent)?;
        }
        // create_new: a second entry of the same name is an error, not a silent overwrite.
        let mut out = File::create_new(&dest).at(&dest)?;
        std::io::copy(&mut entry, &mut out).map_err(|e| {
            err(format!(
                "entry `{name}`: {e} (truncated or corrupt download?)"
            ))
        })?;
        out.flush().at(&dest)?;
        files += 1;
    }
    Ok(files)
}

/// Refuses names that could land outside the unpack folder.
fn check_entry_name(name: &str) -> std::result::Result<(), String> {
    let path = Path::new(name);
    let escapes = name.starts_with('/')
        || name.starts_with('\\')
        || name.contains('\0')
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    // Windows-style names too: `..\x` or `C:\x` are not components on Unix.
    let windows = name.split(['/', '\\']).any(|part| part == "..") || name.contains(':');
    if escapes || windows {
        Err(format!(
            "entry `{name}` has an absolute path or `..`: refused (it could write outside the \
             unpack folder)"
        ))
    } else {
        Ok(())
    }
}

/// The one folder every entry sits in, if there is one.
fn common_top_folder(names: &[String]) -> Option<String> {
    let first = names.first()?.split('/').next()?.to_string();
    let all_inside = names
        .iter()
        .all(|n| n == &first || n.starts_with(&format!("{first}/")));
    let any_nested = names.iter().any(|n| n.len() > first.len() + 1);
    (all_inside && any_nested).then_some(first)
}

fn strip_top(name: &str, top: Option<&str>) -> PathBuf {
    let rest = match top {
        Some(t) => name
            .strip_prefix(t)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(name),
        None => name,
    };
    PathBuf::from(rest.trim_end_matches('/'))
}

/// The content digest of the folder `dir` (see the module docs) and the number of files.
pub fn content_digest(dir: &Path) -> Result<(String, usize)> {
    let mut files = Vec::new();
    list_files(dir, dir, &mut files)?;
    let mut lines: Vec<String> = files
        .par_iter()
        .map(|(path, rel)| Ok(format!("{}  {rel}\n", super::sha256_file(path)?)))
        .collect::<Result<_>>()?;
    lines.sort();
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    Ok((hex(&hasher.finalize()), lines.len()))
}

/// Every regular file under `dir` as (path, path relative to `root` with `/` separators).
fn list_files(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    for entry in fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        let kind = fs::symlink_metadata(&path).at(&path)?.file_type();
        if kind.is_dir() {
            list_files(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((path, rel));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_entry_names_are_refused() {
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/../b",
            "..\\x",
            "C:\\x",
            "\\\\server\\x",
        ] {
            assert!(check_entry_name(bad).is_err(), "{bad}");
        }
        for good in [
            "a/b.jpg",
            "top/",
            "top/Emergency_Vehicles/train.csv",
            "x y.ipynb",
        ] {
            assert!(check_entry_name(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn content_digest_matches_sha256sum_sort_sha256sum() {
        let dir = testkit::temp_dir("content-digest");
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("a.txt"), "hello\n").expect("write");
        std::fs::write(dir.join("sub/b.bin"), "world").expect("write");
        std::fs::write(dir.join("sub/c d.csv"), "x").expect("write");
        // `find . -type f -printf '%P\0' | xargs -0 sha256sum | LC_ALL=C sort | sha256sum`
        // in that folder printed this.
        let (digest, files) = content_digest(&dir).expect("digest");
        assert_eq!(
            digest,
            "9804fa8ef208766d9987dea590489dd80270cea2d65c094b786ef98e55aacd1e"
        );
        assert_eq!(files, 3);
    }

    #[test]
    fn one_top_folder_is_stripped() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let gh = names(&["repo-abc/", "repo-abc/E/train.csv", "repo-abc/E/t/1.jpg"]);
        assert_eq!(common_top_folder(&gh).as_deref(), Some("repo-abc"));
        assert_eq!(
            strip_top("repo-abc/E/train.csv", Some("repo-abc")),
            PathBuf::from("E/train.csv")
        );
        assert_eq!(strip_top("repo-abc/", Some("repo-abc")), PathBuf::new());
        // Two top-level entries, or a single file: nothing to strip.
        assert_eq!(common_top_folder(&names(&["a/x", "b/y"])), None);
        assert_eq!(common_top_folder(&names(&["x.csv"])), None);
        assert_eq!(common_top_folder(&names(&["ab/x", "abc/y"])), None);
    }
}
