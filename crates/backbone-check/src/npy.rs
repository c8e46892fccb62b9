//! Reading `.npy` files of little-endian float32 in C order (what NumPy writes for
//! `np.save(path, array.astype(np.float32))`), with every header field checked.

use std::path::Path;

/// An n-dimensional f32 array.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Reads `path`; the error names the file and what is wrong with it.
pub fn read(path: &Path) -> Result<Array, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses the bytes of a version 1, 2 or 3 `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<Array, String> {
    let magic = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != magic {
        return Err("not a .npy file (bad magic)".into());
    }
    // Version 1 stores the header length in 2 bytes, versions 2 and 3 in 4.
    let (len, offset): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or("header runs past the end of the file")?;
    let header = std::str::from_utf8(&bytes[offset..end]).map_err(|_| "header is not text")?;
    let descr = field(header, "descr")?;
    if descr.trim_matches(['\'', '"']) != "<f4" {
        return Err(format!(
            "dtype {descr}: only little-endian float32 (<f4) is read"
        ));
    }
    if field(header, "fortran_order")? != "False" {
        return Err("Fortran-ordered arrays are not read".into());
    }
    let shape = parse_shape(&field(header, "shape")?)?;
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("shape overflows")?;
    let body = &bytes[end..];
    if body.len() != count * 4 {
        return Err(format!(
            "shape {shape:?} needs {} bytes of data, the file has {}",
            count * 4,
            body.len()
        ));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Array { shape, data })
}

/// The raw text of `'key': value` in the header's Python dict literal.
fn field(header: &str, key: &str) -> Result<String, String> {
    let quoted = format!("'{key}':");
    let start = header
        .find(&quoted)
        .ok_or_else(|| format!("header has no `{key}`"))?
        + quoted.len();
    let rest = header[start..].trim_start();
    let value = if rest.starts_with('(') {
        rest.find(')').map(|i| &rest[..=i])
    } else {
        rest.find([',', '}']).map(|i| &rest[..i])
    };
    value
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("header's `{key}` is not terminated"))
}

/// `(1, 3, 224, 224)` or `(5,)` or `()`.
fn parse_shape(text: &str) -> Result<Vec<usize>, String> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("shape {text} is not a tuple"))?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse()
                .map_err(|_| format!("shape {text}: `{d}` is not a size"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 file as NumPy writes it (header padded with spaces to 64 bytes, newline).
    fn npy(shape: &str, values: &[f32]) -> Vec<u8> {
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    }

    #[test]
    fn reads_what_numpy_writes() {
        let a = parse(&npy("(2, 3)", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5])).expect("valid");
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
        let a = parse(&npy("(3,)", &[1.0, 2.0, 3.0])).expect("1-d");
        assert_eq!(a.shape, vec![3]);
    }

    #[test]
    fn rejects_what_it_cannot_read_with_a_reason() {
        let mut short = npy("(2, 3)", &[1.0; 6]);
        short.truncate(short.len() - 4);
        assert!(parse(&short)
            .expect_err("must be refused")
            .contains("needs 24 bytes"));
        let mut f8 = npy("(1,)", &[0.0]);
        let at = f8.windows(3).position(|w| w == b"<f4").expect("descr");
        f8[at + 2] = b'8';
        assert!(parse(&f8).expect_err("must be refused").contains("<f8"));
        assert!(parse(b"GIF89a....")
            .expect_err("must be refused")
            .contains("magic"));
        assert!(parse(&npy("(2, x)", &[]))
            .expect_err("must be refused")
            .contains("`x`"));
        // Every truncation of a valid file is an error, never a panic.
        let good = npy("(2, 2)", &[1.0; 4]);
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err(), "truncated to {n}");
        }
    }
}
