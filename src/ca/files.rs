//! Reading and writing the CA's and a node's PEM files.
//!
//! Writes go through [`crate::util::fsutil::write_atomic`] with mode 0600, so a crash leaves
//! the old file or the new one, never a torn one. Reads are bounded in size and, for files that
//! hold a private key, refuse a file that group or others may read: such a key must be treated
//! as leaked, and silently using it would hide that (the same rule ssh applies to its keys).
//! Must never log or put key material in an error.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::util::fsutil::{MODE_PRIVATE, write_atomic};

/// Largest identity or CA file we read. A bundle is a certificate and a P-256 key (about
/// 1.2 KiB); the bound only stops a wrong path (a log, a disk image) from being slurped.
pub const PEM_FILE_BYTES_MAX: u64 = 64 * 1024;

/// PEM label of certificates.
pub(crate) const PEM_CERTIFICATE: &str = "CERTIFICATE";
/// PEM label of PKCS#8 private keys.
pub(crate) const PEM_PRIVATE_KEY: &str = "PRIVATE KEY";

/// Problems reading or writing the CA's or a node's files.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The file is absent.
    #[error("{} does not exist; initialize the cluster or join it first", path.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// An IO error other than absence.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file holding a private key is readable by group or others.
    #[error(
        "{} holds a private key but has mode {mode:o} (group or others may read it); \
         consider the key leaked, then `chmod 600` the file if you are sure it was not copied",
        path.display()
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than [`PEM_FILE_BYTES_MAX`].
    #[error("{} is larger than {bytes_max} bytes; it is not a flotilla PEM file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        bytes_max: u64,
    },
    /// The file's content is not what flotilla wrote.
    #[error("{} is corrupt: {reason}; restore it from a backup or re-create it", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Whether a file may be readable by others.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrecy {
    /// Holds a private key: refuse group/other permission bits.
    PrivateKey,
    /// Holds only public data (a root certificate).
    Public,
}

/// Reads a whole PEM file (bounded), checking permissions for key files.
pub(crate) fn read_pem_file(path: &Path, secrecy: Secrecy) -> Result<Vec<pem::Pem>, StorageError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound => StorageError::Missing {
            path: path.to_owned(),
        },
        _ => StorageError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let file = File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if secrecy == Secrecy::PrivateKey && mode & 0o077 != 0 {
        return Err(StorageError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(StorageError::TooLarge {
            path: path.to_owned(),
            bytes_max: PEM_FILE_BYTES_MAX,
        });
    }
    let blocks = pem::parse_many(&bytes).map_err(|e| StorageError::Corrupt {
        path: path.to_owned(),
        reason: format!("not PEM ({e})"),
    })?;
    if blocks.is_empty() {
        return Err(StorageError::Corrupt {
            path: path.to_owned(),
            reason: "no complete PEM block".to_owned(),
        });
    }
    Ok(blocks)
}

/// Writes PEM blocks to `path` atomically with mode 0600.
pub(crate) fn write_pem_file(path: &Path, blocks: &[pem::Pem]) -> Result<(), StorageError> {
    let text = pem::encode_many(blocks);
    write_atomic(path, text.as_bytes(), MODE_PRIVATE).map_err(|source| StorageError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Takes the blocks out of a parsed file, checking their labels are exactly `labels`.
pub(crate) fn expect_blocks<const N: usize>(
    path: &Path,
    blocks: Vec<pem::Pem>,
    labels: [&str; N],
) -> Result<[Vec<u8>; N], StorageError> {
    let found: Vec<String> = blocks.iter().map(|b| b.tag().to_owned()).collect();
    if found.len() != N || found.iter().zip(labels).any(|(f, l)| f != l) {
        return Err(StorageError::Corrupt {
            path: path.to_owned(),
            reason: format!("expected PEM blocks {labels:?}, found {found:?}"),
        });
    }
    let contents: Vec<Vec<u8>> = blocks.into_iter().map(pem::Pem::into_contents).collect();
    Ok(contents
        .try_into()
        .expect("the length was checked against N just above"))
}

/// Accepts a certificate or CSR given either as DER or as a single PEM block with `label`.
pub(crate) fn der_from_der_or_pem(bytes: &[u8], label: &str) -> Result<Vec<u8>, String> {
    let trimmed = bytes.trim_ascii_start();
    if !trimmed.starts_with(b"-----BEGIN") {
        return Ok(bytes.to_vec());
    }
    let block = pem::parse(trimmed).map_err(|e| format!("bad PEM: {e}"))?;
    if block.tag() != label {
        return Err(format!(
            "PEM block is {:?}, expected {label:?}",
            block.tag()
        ));
    }
    Ok(block.into_contents())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_pem_file(&path, &[pem::Pem::new(PEM_PRIVATE_KEY, vec![1, 2])]).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_pem_file(&path, Secrecy::PrivateKey).unwrap().len(), 1);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_pem_file(&path, Secrecy::PrivateKey),
            Err(StorageError::InsecurePermissions { mode: 0o640, .. })
        ));
        // Public data may be world-readable.
        assert!(read_pem_file(&path, Secrecy::Public).is_ok());
    }

    #[test]
    fn missing_oversized_and_garbage_files_have_distinct_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.pem");
        assert!(matches!(
            read_pem_file(&missing, Secrecy::Public),
            Err(StorageError::Missing { .. })
        ));
        let big = dir.path().join("big.pem");
        write_atomic(
            &big,
            &vec![b'x'; PEM_FILE_BYTES_MAX as usize + 1],
            MODE_PRIVATE,
        )
        .unwrap();
        assert!(matches!(
            read_pem_file(&big, Secrecy::Public),
            Err(StorageError::TooLarge { .. })
        ));
        let garbage = dir.path().join("garbage.pem");
        write_atomic(
            &garbage,
            b"-----BEGIN CERTIFICATE-----\n!!!\n",
            MODE_PRIVATE,
        )
        .unwrap();
        assert!(matches!(
            read_pem_file(&garbage, Secrecy::Public),
            Err(StorageError::Corrupt { .. })
        ));
    }

    #[test]
    fn block_labels_are_checked() {
        let path = Path::new("x.pem");
        let blocks = vec![
            pem::Pem::new(PEM_CERTIFICATE, vec![1]),
            pem::Pem::new(PEM_PRIVATE_KEY, vec![2]),
        ];
        let [cert, key] =
            expect_blocks(path, blocks.clone(), [PEM_CERTIFICATE, PEM_PRIVATE_KEY]).unwrap();
        assert_eq!((cert, key), (vec![1], vec![2]));
        assert!(expect_blocks(path, blocks.clone(), [PEM_PRIVATE_KEY, PEM_CERTIFICATE]).is_err());
        assert!(expect_blocks(path, blocks, [PEM_CERTIFICATE]).is_err());
    }
}
