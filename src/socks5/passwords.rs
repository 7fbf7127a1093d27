//! RFC 1929 credentials: a file of salted password hashes.
//!
//! One user per line, `NAME:HASH`, where HASH is an Argon2id PHC string as `veil passwd` prints
//! it; `#` starts a comment. Passwords are never stored, only their salted hashes; a login is
//! checked in constant time by the argon2 crate.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use std::collections::HashMap;
use std::path::Path;

/// Why a password file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// A line is not `NAME:HASH`.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Usernames and their password hashes.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    hashes: HashMap<Vec<u8>, String>,
}

impl PasswordFile {
    /// Parses the text of a password file; `path` is used in errors.
    pub fn parse(path: &str, text: &str) -> Result<Self, Error> {
        let mut hashes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line_error = |message: String| Error::Line {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| line_error("expected NAME:HASH".to_owned()))?;
            if name.is_empty() || name.len() > 255 {
                return Err(line_error("user name must be 1 to 255 bytes".to_owned()));
            }
            PasswordHash::new(hash)
                .map_err(|e| line_error(format!("hash is not a PHC string ({e})")))?;
            if hashes
                .insert(name.as_bytes().to_vec(), hash.to_owned())
                .is_some()
            {
                return Err(line_error(format!("user {name:?} appears twice")));
            }
        }
        Ok(Self { hashes })
    }

    /// Reads and parses a password file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        Self::parse(&shown, &text)
    }

    /// True if `password` is `username`'s. Slow on purpose (Argon2): call off the async runtime.
    pub fn verify(&self, username: &[u8], password: &[u8]) -> bool {
        let Some(hash) = self.hashes.get(username) else {
            // Spend the same effort on unknown users, so timing does not reveal which exist.
            let _ = hash_password(password);
            return false;
        };
        PasswordHash::new(hash)
            .is_ok_and(|parsed| Argon2::default().verify_password(password, &parsed).is_ok())
    }

    /// How many users the file holds.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True if the file holds no users.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// Hashes a password with a fresh random salt, as a PHC string for the password file.
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Ok(Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_right_password() {
        let hash = hash_password(b"s3cret").expect("hash");
        let file = PasswordFile::parse("p", &format!("# users\nalice:{hash}\n")).expect("valid");
        assert_eq!(file.len(), 1);
        assert!(file.verify(b"alice", b"s3cret"));
        assert!(!file.verify(b"alice", b"wrong"));
        assert!(!file.verify(b"bob", b"s3cret"));
        // Salted: the same password hashes differently each time.
        assert_ne!(hash, hash_password(b"s3cret").expect("hash"));
    }

    #[test]
    fn bad_lines_name_their_line() {
        let cases = [
            ("alice\n", "p:1: expected NAME:HASH"),
            ("\n:x\n", "p:2: user name must be 1 to 255 bytes"),
        ];
        for (text, want) in cases {
            assert_eq!(
                PasswordFile::parse("p", text).expect_err("bad").to_string(),
                want
            );
        }
        let e = PasswordFile::parse("p", "alice:plaintext")
            .expect_err("bad")
            .to_string();
        assert!(e.starts_with("p:1: hash is not a PHC string"), "{e}");
    }
}
