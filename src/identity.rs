//! The node's libp2p identity: an ed25519 key kept in the data dir, so the
//! peer id (what other regions allowlist) survives restarts.

use libp2p::identity::Keypair;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the identity key inside the data dir.
pub const IDENTITY_FILE: &str = "identity.key";

/// Identity key failures; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("identity key {path}: {reason}")]
    Io {
        /// Key file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The file exists but is not a libp2p key.
    #[error("identity key {path} is not a valid libp2p ed25519 key: {reason}; move it away to create a new identity")]
    Corrupt {
        /// Key file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

/// Loads the identity from `data_dir`, creating the directory and a new key
/// (written atomically, mode 0600) on first use.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |e: std::io::Error| IdentityError::Io {
        path: path.clone(),
        reason: e.to_string(),
    };
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            Ok(keypair)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn corrupt_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a valid"), "{err}");
    }
}
