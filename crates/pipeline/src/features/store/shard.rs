//! The shard codec: one safetensors file per computed batch, written byte-for-byte
//! deterministically and validated field by field when read.
//!
//! A shard holds one tensor, `features` (`[rows, dim]`, the space's stored dtype, rows in the
//! order of `hashes`), and one metadata key, `pipeline`, whose value is the canonical JSON of
//! [`ShardMeta`]: the format, the space id, the content hash of each row and the SHA-256 of the
//! tensor's bytes. The header is serialised from fixed-order structs (never a map with several
//! keys), padded with spaces to a multiple of 8 as safetensors writers do, so equal inputs give
//! equal bytes. The file's name is `shard-<first 32 hex of SHA-256(space, hashes)>.safetensors`.
//!
//! Readers check, before allocating anything sized by the file: the header length against the
//! file length and a hard limit, the JSON shape (unknown fields refused), dtype and shape
//! against the space, offsets against the file length (checked arithmetic), every hash's
//! format, and on a full read the data checksum.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{is_hex, CacheKey, FORMAT_VERSION};
use crate::data::dataset::hex;
use crate::error::{Error, IoContext, Result};

/// The one metadata key of a shard.
pub const META_KEY: &str = "pipeline";
/// Most rows one shard may hold (the batch size is validated against it).
pub const MAX_SHARD_ROWS: usize = 1 << 16;
/// Largest header a reader accepts (a full shard of `MAX_SHARD_ROWS` hashes is ~4.5 MB).
pub const MAX_HEADER_BYTES: usize = 16 << 20;

/// The shard's metadata (the `pipeline` key's JSON). Field order is the serialised order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMeta {
    pub format: u32,
    /// The space id (16 hex).
    pub space: String,
    /// Number of rows.
    pub rows: usize,
    /// SHA-256 of each row's image bytes, in row order.
    pub hashes: Vec<String>,
    /// SHA-256 of the `features` tensor's bytes.
    pub features_sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaMap {
    pipeline: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The safetensors header with exactly the entries a shard has, in a fixed order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    #[serde(rename = "__metadata__")]
    metadata: MetaMap,
    features: TensorInfo,
}

/// A validated shard header.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHeader {
    /// Content hash of each row, in row order.
    pub hashes: Vec<String>,
    /// Offset of the tensor data in the file.
    pub data_start: usize,
    /// Length of the tensor data.
    pub data_len: usize,
    /// SHA-256 of the tensor data.
    pub features_sha256: String,
}

impl ShardHeader {
    /// Rows in the shard.
    pub fn rows(&self) -> usize {
        self.hashes.len()
    }

    /// Size of the whole file.
    pub fn file_len(&self) -> usize {
        self.data_start + self.data_len
    }
}

/// The safetensors spelling of a stored dtype.
fn st_dtype(dtype: &str) -> &'static str {
    match dtype {
        "f16" => "F16",
        "bf16" => "BF16",
        _ => "F32",
    }
}

/// The file name of the shard holding `hashes` (in this order) in `space`.
pub fn shard_name(space: &str, hashes: &[String]) -> String {
    let mut d = Sha256::new();
    d.update(space.as_bytes());
    for h in hashes {
        d.update(b"\n");
        d.update(h.as_bytes());
    }
    format!("shard-{}.safetensors", &hex(&d.finalize())[..32])
}

/// Whether `name` follows the shard naming pattern (the only shard files the store deletes).
pub fn is_shard_name(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|h| is_hex(h, 32))
}

/// Checks a list of content hashes: 1..=MAX rows, each 64 hex digits, no repeats.
fn check_hashes(hashes: &[String]) -> std::result::Result<(), String> {
    if hashes.is_empty() || hashes.len() > MAX_SHARD_ROWS {
        return Err(format!(
            "{} rows (a shard holds 1 to {MAX_SHARD_ROWS})",
            hashes.len()
        ));
    }
    if let Some(h) = hashes.iter().find(|h| !is_hex(h, 64)) {
        return Err(format!(
            "content hash `{}` is not 64 hex digits",
            h.chars().take(80).collect::<String>()
        ));
    }
    let mut sorted: Vec<&String> = hashes.iter().collect();
    sorted.sort();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err("a content hash appears twice".into());
    }
    Ok(())
}

/// The bytes of a shard of `hashes` with `data` (raw little-endian values of `key.dtype`,
/// `[hashes.len(), key.dim]`): (file name, bytes, header).
pub fn encode(
    key: &CacheKey,
    space: &str,
    hashes: Vec<String>,
    data: &[u8],
) -> std::result::Result<(String, Vec<u8>, ShardHeader), String> {
    check_hashes(&hashes)?;
    let n = hashes.len();
    let expected = n
        .checked_mul(key.dim)
        .and_then(|v| v.checked_mul(key.value_bytes()))
        .ok_or("shard size overflows")?;
    if data.len() != expected {
        return Err(format!(
            "{} bytes of features for {n} rows of {} {} values",
            data.len(),
            key.dim,
            key.dtype
        ));
    }
    let features_sha256 = hex(&Sha256::digest(data));
    let name = shard_name(space, &hashes);
    let meta = ShardMeta {
        format: FORMAT_VERSION,
        space: space.to_string(),
        rows: n,
        hashes,
        features_sha256: features_sha256.clone(),
    };
    let header = RawHeader {
        metadata: MetaMap {
            pipeline: serde_json::to_string(&meta).map_err(|e| e.to_string())?,
        },
        features: TensorInfo {
            dtype: st_dtype(&key.dtype).into(),
            shape: vec![n as u64, key.dim as u64],
            data_offsets: [0, data.len() as u64],
        },
    };
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // Pad with spaces so the data starts 8-byte aligned (what safetensors' own writer does).
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + json.len() + data.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    let header = ShardHeader {
        hashes: meta.hashes,
        data_start: 8 + json.len(),
        data_len: data.len(),
        features_sha256,
    };
    Ok((name, bytes, header))
}

/// The header length a shard's first 8 bytes declare, checked against the file length and
/// [`MAX_HEADER_BYTES`] before anything is allocated.
pub fn header_len(first8: &[u8], file_len: u64) -> std::result::Result<usize, String> {
    let arr: [u8; 8] = first8
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("shorter than 8 bytes")?;
    let n = u64::from_le_bytes(arr);
    if n > MAX_HEADER_BYTES as u64 || n > file_len.saturating_sub(8) {
        return Err(format!(
            "header length {n} does not fit the file ({file_len} bytes, limit {MAX_HEADER_BYTES})"
        ));
    }
    Ok(n as usize)
}

/// Parses and validates a shard header from the file's first bytes (at least 8 + the header
/// length), given the whole file's length and the space it must belong to.
pub fn decode_header(
    prefix: &[u8],
    file_len: u64,
    key: &CacheKey,
    space: &str,
) -> std::result::Result<ShardHeader, String> {
    let n = header_len(prefix, file_len)?;
    let json = prefix.get(8..8 + n).ok_or("truncated header")?;
    if json.first() != Some(&b'{') {
        return Err("header is not a JSON object".into());
    }
    let raw: RawHeader = serde_json::from_slice(json).map_err(|e| format!("header: {e}"))?;
    let meta: ShardMeta = serde_json::from_str(&raw.metadata.pipeline)
        .map_err(|e| format!("`{META_KEY}` metadata: {e}"))?;
    if meta.format != FORMAT_VERSION {
        return Err(format!(
            "format {} (expected {FORMAT_VERSION})",
            meta.format
        ));
    }
    if meta.space != space {
        return Err(format!("belongs to space `{}`, not {space}", meta.space));
    }
    check_hashes(&meta.hashes)?;
    if meta.rows != meta.hashes.len() {
        return Err(format!(
            "says {} rows but lists {} hashes",
            meta.rows,
            meta.hashes.len()
        ));
    }
    if !is_hex(&meta.features_sha256, 64) {
        return Err("`features_sha256` is not 64 hex digits".into());
    }
    let t = &raw.features;
    if t.dtype != st_dtype(&key.dtype) {
        return Err(format!(
            "features are {}, the space stores {}",
            t.dtype, key.dtype
        ));
    }
    if t.shape != [meta.rows as u64, key.dim as u64] {
        return Err(format!(
            "features shape {:?}, expected [{}, {}]",
            t.shape, meta.rows, key.dim
        ));
    }
    let data_len = (meta.rows as u64)
        .checked_mul(key.dim as u64)
        .and_then(|v| v.checked_mul(key.value_bytes() as u64))
        .ok_or("features size overflows")?;
    if t.data_offsets != [0, data_len] {
        return Err(format!(
            "data offsets {:?}, expected [0, {data_len}]",
            t.data_offsets
        ));
    }
    let data_start = 8 + n as u64;
    if data_start.checked_add(data_len) != Some(file_len) {
        return Err(format!(
            "{file_len} bytes, expected {} (truncated or padded)",
            data_start.saturating_add(data_len)
        ));
    }
    Ok(ShardHeader {
        hashes: meta.hashes,
        data_start: data_start as usize,
        data_len: data_len as usize,
        features_sha256: meta.features_sha256,
    })
}

/// Validates a whole shard file's bytes, the data checksum included; returns the header and
/// the raw feature bytes.
pub fn decode<'a>(
    bytes: &'a [u8],
    key: &CacheKey,
    space: &str,
) -> std::result::Result<(ShardHeader, &'a [u8]), String> {
    let header = decode_header(bytes, bytes.len() as u64, key, space)?;
    let data = bytes
        .get(header.data_start..header.file_len())
        .ok_or("truncated data")?;
    if hex(&Sha256::digest(data)) != header.features_sha256 {
        return Err("features checksum mismatch (the file is corrupt)".into());
    }
    Ok((header, data))
}

/// Reads only the header bytes of the shard at `path`; `Err(message)` for an invalid shard,
/// `Err(Error::Io)` only for I/O failures other than "it is invalid".
pub fn read_header(
    path: &Path,
    key: &CacheKey,
    space: &str,
) -> Result<std::result::Result<ShardHeader, String>> {
    let mut f = std::fs::File::open(path).at(path)?;
    let file_len = f.metadata().at(path)?.len();
    let mut first8 = [0u8; 8];
    if file_len < 8 {
        return Ok(Err(format!("{file_len} bytes: truncated")));
    }
    f.read_exact(&mut first8).at(path)?;
    let n = match header_len(&first8, file_len) {
        Ok(n) => n,
        Err(m) => return Ok(Err(m)),
    };
    let mut prefix = vec![0u8; 8 + n];
    prefix[..8].copy_from_slice(&first8);
    f.read_exact(&mut prefix[8..]).at(path)?;
    Ok(decode_header(&prefix, file_len, key, space))
}

/// Reads a whole shard, checksum verified, as f32 feature rows (`[rows * dim]`).
pub fn read(path: &Path, key: &CacheKey, space: &str) -> Result<(ShardHeader, Vec<f32>)> {
    let bytes = std::fs::read(path).at(path)?;
    let bad = |m: String| Error::Cache {
        path: path.to_owned(),
        message: m,
    };
    let (header, data) = decode(&bytes, key, space).map_err(bad)?;
    let values = to_f32(data, &key.dtype);
    Ok((header, values))
}

/// Little-endian raw values of a stored dtype to f32 (`data.len()` a multiple of the value
/// size; a trailing partial value is ignored).
pub fn to_f32(data: &[u8], dtype: &str) -> Vec<f32> {
    match dtype {
        "f16" => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "bf16" => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}
