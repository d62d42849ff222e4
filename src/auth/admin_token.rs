//! The static admin token: `BROKER_ADMIN_TOKEN`, or on the embedded default a token the broker
//! generates at its first start. Only the generated token's SHA-256 is kept, in a file beside
//! the database (mode 0600, like the key file); the broker re-reads that file when it changes,
//! so `token-broker admin-token --rotate` takes effect on a running broker with its next
//! admin request.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use rand::distributions::{Alphanumeric, DistString};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::StaticToken;
use crate::db::private_file;

/// Generated admin tokens start with this (secret scanners can look for it).
pub const PREFIX: &str = "tbadmin_";

/// A new random admin token: the prefix and 43 base62 characters (256 bits).
pub fn generate() -> SecretString {
    let mut token = String::from(PREFIX);
    Alphanumeric.append_string(&mut rand::thread_rng(), &mut token, 43);
    SecretString::from(token)
}

/// The hash file of the database at `db` (`<db>.admin-token`).
pub fn hash_file_beside(db: &Path) -> PathBuf {
    let mut file = db.as_os_str().to_owned();
    file.push(".admin-token");
    file.into()
}

/// The file's one line for `token`.
fn hash_line(token: &SecretString) -> String {
    let hash = Sha256::digest(token.expose_secret().as_bytes());
    format!("sha256:{}\n", hex::encode(hash))
}

/// Writes `token`'s hash to `path` (mode 0600), replacing the file whole: a reader sees the
/// old hash or the new one, never a torn file.
pub fn write_hash_file(path: &Path, token: &SecretString) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    private_file::create(&tmp, hash_line(token).as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// Writes `token`'s hash to a new file at `path` (mode 0600); `Ok(false)` if the file already
/// exists (another process sharing the database generated one first: its token stands). The
/// file appears whole or not at all: the hash is written and synced to a temporary file of
/// this process first, then hard-linked into place, which fails if `path` exists. (A reader
/// never sees the empty file an exclusive create would show while it is being written.)
pub fn create_hash_file(path: &Path, token: &SecretString) -> std::io::Result<bool> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    private_file::create(&tmp, hash_line(token).as_bytes())?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads a hash file, refusing one that group or others may read or write.
pub fn read_hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    private_file::check_mode(
        path,
        "lets other users change who is admin",
        "run `chmod 600` on it",
    )?;
    let text = std::fs::read_to_string(path)?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "expected one line `sha256:<64 hex digits>`; delete the file to generate a new admin token",
        )
    };
    let hex_part = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// What identifies one version of the hash file (a rotation replaces the file).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = meta.len();
    Some((meta.modified().ok()?, ino))
}

/// A version of the hash file (its modification time and inode), and the token it held.
type Loaded = (Option<(SystemTime, u64)>, StaticToken);

/// The admin token as the broker checks it.
pub enum AdminToken {
    /// `BROKER_ADMIN_TOKEN`, a generated token of an in-memory database, or none (admins sign
    /// in with JWTs only).
    Fixed(StaticToken),
    /// The generated token of the embedded default: its hash file, re-read when it changes.
    File {
        path: PathBuf,
        current: Mutex<Loaded>,
    },
}

impl AdminToken {
    pub fn fixed(token: Option<&SecretString>) -> Self {
        Self::Fixed(StaticToken::new(token))
    }

    /// The hash file at `path`, read now (it must exist and be valid).
    pub fn file(path: PathBuf) -> std::io::Result<Self> {
        let hash = read_hash_file(&path)?;
        Ok(Self::File {
            current: Mutex::new((stamp(&path), StaticToken(Some(hash)))),
            path,
        })
    }

    /// Constant-time comparison of `presented` with the current admin token.
    pub fn verify(&self, presented: &str) -> bool {
        match self {
            Self::Fixed(token) => token.verify(presented),
            Self::File { path, current } => {
                let now = stamp(path);
                let mut held = current.lock().expect("admin token lock");
                if now != held.0 {
                    // A rotated file is read again; one that became unreadable admits nobody
                    // until it is fixed.
                    let hash = read_hash_file(path)
                        .map_err(|e| tracing::error!(file = %path.display(), error = %e, "admin token file unreadable: the static admin token is refused until it is fixed"))
                        .ok();
                    *held = (now, StaticToken(hash));
                }
                held.1.verify(presented)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_differ_and_have_the_prefix() {
        let (a, b) = (generate(), generate());
        assert!(a.expose_secret().starts_with(PREFIX));
        assert_eq!(a.expose_secret().len(), PREFIX.len() + 43);
        assert_ne!(a.expose_secret(), b.expose_secret());
    }

    #[test]
    fn the_hash_file_holds_no_token_and_rotation_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = hash_file_beside(&dir.path().join("broker.db"));
        let first = generate();
        assert!(create_hash_file(&path, &first).unwrap());
        assert!(
            !create_hash_file(&path, &generate()).unwrap(),
            "the first one stands"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(first.expose_secret()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let token = AdminToken::file(path.clone()).unwrap();
        assert!(token.verify(first.expose_secret()));
        assert!(!token.verify("tbadmin_wrong"));
        let second = generate();
        write_hash_file(&path, &second).unwrap();
        assert!(token.verify(second.expose_secret()));
        assert!(!token.verify(first.expose_secret()));
    }

    #[cfg(unix)]
    #[test]
    fn a_loose_or_garbled_hash_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.admin-token");
        write_hash_file(&path, &generate()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_hash_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a hash\n").unwrap();
        assert!(read_hash_file(&path).is_err());
    }
}
